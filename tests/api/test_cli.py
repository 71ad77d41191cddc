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
                 "--max-images", "--queue-size", "--batch", "--batch-decode", "--concurrency", "--generations",
                 "DSVL_MODEL", "DSVL_BATCH"]:
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
        assert "up to 4 replies decoded together (default on CPU)" in text  # the banner names the batch
    finally:
        proc.terminate()
        proc.wait(30)


def test_without_replicas_ray_is_never_imported():
    # --replicas is opt-in: the one-process app must not pay Ray's import (seconds, hundreds of MB) or start its processes.
    script = ("import sys, app; from dsvl_app.settings import parse_settings; s = parse_settings(['--model', 'tiny'], "
              "environ={}); e = app.start_engine(s); app.build_demo(s, e); e.close(); "
              "print('ray:', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ray: []"


def test_waiting_and_reading_are_shown_before_the_first_token():
    from dsvl_app.engine import GenerationStats
    from dsvl_app.ui import meters_markdown, ordinal, waiting_note

    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]
    waiting = GenerationStats(prompt_tokens=700, images=1, place_in_line=2)
    assert "2nd in line" in waiting_note(waiting)
    reading = GenerationStats(prompt_tokens=700, images=1, prefilled_tokens=350, stop_reason="prefilling")
    assert "50% of 700 prompt tokens" in waiting_note(reading)
    assert waiting_note(GenerationStats(prompt_tokens=700, images=1, stop_reason="running")) == ""

    class Prompt:
        prompt_tokens, context_tokens, images, image_tokens, dropped_turns, dropped_images = 700, 4096, [1], 576, 0, 0

    assert "| Place in line | 2nd |" in meters_markdown(Prompt, waiting)
    done = GenerationStats(prompt_tokens=700, images=1, queued_s=3.0, time_to_first_token_s=5.0, stop_reason="eos")
    assert "5.00 s (3.00 s of it in line)" in meters_markdown(Prompt, done)


def test_binding_and_share_warning():
    assert parse_settings([], environ={}).server_name == "127.0.0.1"
    assert parse_settings([], environ={"SPACE_ID": "me/space"}).server_name == "0.0.0.0"
    assert "PUBLIC" in share_warning(parse_settings(["--share"], environ={}))
    assert share_warning(parse_settings(["--share", "--auth", "a:b"], environ={})) is None
    assert share_warning(parse_settings([], environ={})) is None
