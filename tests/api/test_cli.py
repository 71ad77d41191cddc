"""`python app.py` as a user runs it: help, defaults, offline fallback, share warning."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dsvl_app.settings import parse_settings
from dsvl_app.ui import share_warning

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.api


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ["--model", "--device", "--dtype", "--quantize", "--host", "--port", "--share", "--auth",
                 "--max-images", "--queue-size", "--concurrency", "DSVL_MODEL"]:
        assert flag in out.stdout


def test_no_arguments_offline_serves_the_bundled_checkpoint_and_says_so(tmp_path):
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "DSVL_PORT": str(port), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "app did not start"
                time.sleep(0.5)
        config = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10))
        banner = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "model-banner")
        text = banner["props"]["value"]
        assert "bundled tiny demo checkpoint" in text and "Offline fallback" in text and "cannot be reached" in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_binding_and_share_warning():
    assert parse_settings([], environ={}).server_name == "127.0.0.1"
    assert parse_settings([], environ={"SPACE_ID": "me/space"}).server_name == "0.0.0.0"
    assert "PUBLIC" in share_warning(parse_settings(["--share"], environ={}))
    assert share_warning(parse_settings(["--share", "--auth", "a:b"], environ={})) is None
    assert share_warning(parse_settings([], environ={})) is None
