"""Deployment files are valid and agree with each other."""

import re
import sys
import types
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with Space front matter"
    return yaml.safe_load(match.group(1))


def pinned(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(rf"{re.escape(package)}(\[[\w,]+\])?==([^\s#]+)", line)
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned")


def test_space_front_matter_is_a_valid_gpu_gradio_space():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert str(meta["sdk_version"]) == pinned("gradio")
    assert meta["python_version"] == "3.11" and isinstance(meta["python_version"], str)
    assert meta["suggested_hardware"] in {"t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large", "a100-large"}
    assert "deepseek-community/deepseek-vl-7b-chat" in meta["models"]
    assert "deepseek-community/deepseek-vl-7b-chat" in meta["preload_from_hub"]
    assert len(meta["short_description"]) <= 60


def test_requirements_pin_the_machine_torch():
    assert pinned("torch") == "2.14.1" and pinned("torchvision") == "0.29.1"


def test_spacefile_is_a_valid_deta_v0_manifest():
    spec = yaml.safe_load((ROOT / "Spacefile").read_text())
    assert spec["v"] == 0 and len(spec["micros"]) == 1
    micro = spec["micros"][0]
    assert {"name", "src", "engine", "run"} <= set(micro)
    assert micro["engine"] in {"python3.9", "python3.8", "nodejs16", "static", "custom"}
    assert micro["run"].startswith("python app.py")
    assert all({"name", "description"} <= set(env) for env in micro["presets"]["env"])
    assert "shut down in 2024" in (ROOT / "README.md").read_text()


def test_spaces_gpu_is_applied_only_when_spaces_is_importable(monkeypatch):
    from dsvl_app.ui import _on_gpu

    def fn():
        return "ran"

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed
    assert _on_gpu(fn) is fn
    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda f: calls.append(duration) or (lambda *a, **k: ("gpu", f(*a, **k))))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    wrapped = _on_gpu(fn)
    assert wrapped() == ("gpu", "ran") and calls == [120]
