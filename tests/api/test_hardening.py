"""Hardening through the real API: the bad-input catalogue, stop, concurrency, OOM, exposure, timeouts."""

from __future__ import annotations

import base64
import http.server
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from dsvl_app import runner as runner_mod
from dsvl_app.engine import Engine, GenerationParams
from dsvl_app.media import load_image
from dsvl_app.settings import parse_settings
from tests.conftest import generate_text, loopback_http, replying, serve, wait_until

pytestmark = pytest.mark.api
ROOT = Path(__file__).resolve().parents[2]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0}
LONG = {"max_new_tokens": 2000, "temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.0, "seed": 1}


def chat(client, message, history=(), **overrides):
    return client.predict(message, list(history), **{**GREEDY, **overrides}, api_name="/chat")


def engine_reply(handle, images, text, **overrides) -> str:
    content = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]
    inputs = handle.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True, return_tensors="pt")
    return generate_text(handle, inputs, GenerationParams(**{**GREEDY, **overrides}))


def wait_no_generation(engine, limit: float) -> float:
    t0 = time.perf_counter()
    while replying(engine):
        assert time.perf_counter() - t0 < limit, f"a reply still running {limit} s after the stop"
        time.sleep(0.01)
    return time.perf_counter() - t0


# ------------------------------------------------------------------ files for the catalogue


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def noise(fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def ico() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "ICO")
    return buf.getvalue()


REFUSED_FILES = {
    "text renamed .png": ("notes.png", lambda: b"meeting notes\nnot a picture\n", "is a text file"),
    "0-byte file": ("empty.png", lambda: b"", "is empty (0 bytes)"),
    "truncated PNG": ("cut.png", lambda: noise("PNG")[:3000], "cannot be decoded"),
    "truncated JPEG": ("cut.jpg", lambda: noise("JPEG")[:2000], "cannot be decoded"),
    "decompression bomb": ("bomb.png", lambda: png_header(50_000, 50_000), "decompression-bomb"),
    "HTML saved as an image": ("page.jpg", lambda: b"<!DOCTYPE html><html><script>alert(1)</script></html>", "HTML page"),
    "SVG renamed .png": ("drawing.png", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    # (read as a document, not an image: a damaged one)
    "PDF renamed .png": ("doc.png", lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not a readable PDF"),
    "ICO renamed .png": ("icon.png", ico, "supported format"),
}


@pytest.mark.parametrize("case", list(REFUSED_FILES))
def test_catalogue_refusals_are_specific_and_the_session_goes_on(client, tmp_path, make_image, case):
    name, content, reason = REFUSED_FILES[case]
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(AppError) as info:
        chat(client, {"text": "What is this?", "files": [handle_file(str(path))]})
    assert name in str(info.value) and reason in str(info.value)
    assert isinstance(chat(client, {"text": "And this?", "files": [handle_file(make_image("ok.png"))]}), str)


def accepted_files(tmp_path: Path) -> dict[str, str]:
    files = {}

    def save(name, image, **kw):
        image.save(tmp_path / name, **kw)
        files[name] = str(tmp_path / name)

    save("cmyk.jpg", Image.new("CMYK", (120, 80), (0, 255, 255, 0)))
    save("sixteen.png", Image.fromarray(np.full((60, 90), 40000, dtype=np.uint16)))
    save("rgba.png", Image.new("RGBA", (70, 70), (0, 0, 255, 128)))
    save("la.png", Image.new("LA", (70, 70), (90, 200)))
    pal = Image.new("P", (70, 70), 1)
    pal.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    save("palette.png", pal, transparency=0)
    frames = [Image.new("RGB", (50, 50), c) for c in ("red", "blue")]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    save("anim.webp", frames[0], save_all=True, append_images=frames[1:], duration=50, lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", Image.new("RGB", (160, 60), "green"), exif=exif.tobytes())
    save("tall.png", Image.new("RGB", (1, 4000), "orange"))
    save("wide.png", Image.new("RGB", (4000, 1), "purple"))
    save("dot.png", Image.new("RGB", (1, 1), "black"))
    save("ünïcødé 图像.png", Image.new("RGB", (64, 64), "pink"))
    return files


def test_catalogue_odd_but_valid_images_are_accepted_and_seen_as_the_engine_sees_them(client, handle, tmp_path):
    files = accepted_files(tmp_path)
    assert len(files) == 12
    for name, path in files.items():
        reply = chat(client, {"text": "Describe it.", "files": [handle_file(path)]})
        expected = engine_reply(handle, [load_image(path, parse_settings([], environ={}).limits)], "Describe it.")
        assert reply == expected, name


def test_catalogue_limits_and_message_refusals(client, make_image):
    def refused(message, history=(), **kw) -> str:
        with pytest.raises(AppError) as info:
            chat(client, message, history, **kw)
        return str(info.value)

    five = [handle_file(make_image(f"m{i}.png")) for i in range(5)]
    assert "5 images; at most 4 are allowed per message" in refused({"text": "x", "files": five})
    history = [{"role": "user", "content": [{"type": "file", "file": handle_file(make_image(f"h{i}.png"))}
                                            for i in range(4)]}, {"role": "assistant", "content": "ok"}] * 2
    assert "at most 8 are allowed" in refused({"text": "x", "files": [handle_file(make_image("n.png"))]}, history)
    assert "Too many tokens" in refused({"text": "lorem ipsum " * 3000, "files": []})
    assert "empty" in refused({"text": "", "files": []})
    assert "greater than maximum value" in refused({"text": "hi", "files": []}, max_new_tokens=10**6)
    assert isinstance(chat(client, {"text": "still fine?", "files": []}), str)


# ------------------------------------------------------------------ stop


def test_a_cancelled_api_job_ends_the_generation_within_a_second(random_client, random_app_server):
    job = random_client.submit({"text": "Write a long story.", "files": []}, [], **LONG, api_name="/chat")
    deadline = time.time() + 30
    while not job.outputs() or len(job.outputs()[-1]) < 20:
        assert time.time() < deadline
        time.sleep(0.05)
    assert replying(random_app_server.engine)
    job.cancel()
    assert wait_no_generation(random_app_server.engine, 1.0) < 1.0


def test_replies_stopped_while_they_wait_are_never_computed(random_handle, tmp_path):
    """--batch 1, as a new user would try it: a long /v1 stream A runs; a /chat job B and a /v1 stream C wait behind
    it and are given up (the job cancelled, the stream closed); then A is closed. B and C leave the line, their
    prompts are never read, and the server is idle at once (before: both were decoded for nobody)."""
    settings = parse_settings(["--model", "tiny", "--batch", "1"], environ={})
    engine = Engine(random_handle, settings)
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image)
    url_of_image = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url_of_image}}, {"type": "text", "text": "Describe it."}]
    prefills = []

    def count(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            prefills.append(time.perf_counter())

    hook = random_handle.model.model.language_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with serve(settings, random_handle, engine) as (_, url):
            client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
            with client.chat.completions.with_streaming_response.create(
                    model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}],
                    max_tokens=2000, stream=True) as a:
                lines = a.iter_lines()
                next(lines)
                b = Client(url, verbose=False).submit({"text": "Describe it.", "files": [handle_file(str(image))]}, [],
                                                      **LONG, api_name="/chat")
                assert wait_until(lambda: len(engine.scheduler.waiting) == 1, 30)
                gave_up = threading.Event()

                def c():
                    with client.chat.completions.with_streaming_response.create(
                            model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}],
                            max_tokens=2000, stream=True) as response:
                        gave_up.wait(30)  # C waits in line, then its client goes away
                        response.close()

                reader = threading.Thread(target=c)
                reader.start()
                assert wait_until(lambda: len(engine.scheduler.waiting) == 2, 30)
                b.cancel()
                gave_up.set()
                reader.join(30)
                assert wait_until(lambda: not engine.scheduler.waiting, 5), "a given-up request stayed in line"
                for _ in range(5):
                    next(lines)  # A still streams
            assert wait_no_generation(engine, 2.5) < 2.5
            time.sleep(1.0)
            assert not replying(engine) and len(prefills) == 1  # A's prompt only, ever
    finally:
        hook.remove()


# ------------------------------------------------------------------ concurrency


def test_eight_simultaneous_sessions_complete_without_leaking(app_server, handle, make_image):
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "black", "pink"]
    cases = [(make_image(f"s{i}.png", colour=c, size=(60 + 10 * i, 90)), f"Session {i}: what colour?")
             for i, c in enumerate(colours)]

    def session(case):
        path, text = case
        client = Client(app_server[1], verbose=False)  # each its own session
        return client.predict({"text": text, "files": [handle_file(path)]}, [], **GREEDY, api_name="/chat")

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(session, cases))
    expected = [engine_reply(handle, [Image.open(p).convert("RGB")], t) for p, t in cases]
    assert replies == expected  # each session got exactly its own answer


def test_a_full_line_says_so(strict):
    """--batch 1 --queue-size 1: one reply runs, one waits in the engine's line, one in gradio's queue; the rest
    are told the queue is full."""
    url, auth, engine = strict
    clients = [Client(url, auth=auth, verbose=False) for _ in range(5)]
    jobs = [c.submit({"text": "long", "files": []}, [], **LONG, api_name="/chat") for c in clients]
    errors = []
    for job in jobs:
        try:
            job.result(timeout=0.5)
        except Exception as exc:  # noqa: BLE001 - collecting what each caller saw
            errors.append(f"{type(exc).__name__}: {exc}")
    for job in jobs:
        job.cancel()
    # gradio_client cancels a job still in gradio's queue only on its side: the server may start it once a worker
    # frees, and it then runs to its end (2000 tokens) with nobody reading. Such a job can start a moment after the
    # engine went idle, so wait until it has stayed idle (else it runs into the next test on this app).
    deadline = time.perf_counter() + 120
    while True:
        wait_no_generation(engine, 60)
        time.sleep(2)
        if not replying(engine):
            break
        assert time.perf_counter() < deadline, "leftover replies kept starting"
    refused = [e for e in errors if "busy" in e or "Queue is full" in e]
    assert len(refused) >= 2, errors


# ------------------------------------------------------------------ out of memory


@pytest.mark.parametrize("phase,step", [("prefill", 1), ("decode", 3)])
def test_simulated_cuda_oom_gives_advice_releases_memory_and_the_next_request_is_served(client, handle, monkeypatch,
                                                                                        make_image, phase, step):
    released = []
    real_release = runner_mod.release_memory
    monkeypatch.setattr(runner_mod, "release_memory", lambda device: released.append(device) or real_release(device))

    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    remove = handle.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(AppError) as info:
            chat(client, {"text": f"oom in {phase}", "files": [handle_file(make_image("big.png"))]})
    finally:
        remove.remove()
    message = str(info.value)
    assert "Out of memory" in message and "fewer or smaller images" in message and "fewer new tokens" in message
    assert released == [handle.device]
    assert isinstance(chat(client, {"text": "after the OOM", "files": [handle_file(make_image("ok.png"))]}), str)


# ------------------------------------------------------------------ timeouts


def test_a_stalled_generation_ends_with_a_clear_message(strict, random_handle):
    url, auth, engine = strict
    handle = random_handle  # the model the strict app serves

    def hook(module, args, kwargs):
        if hook.calls == 2:
            time.sleep(2.5)
        hook.calls += 1

    hook.calls = 0
    remove = handle.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(AppError, match="stalled"):
            Client(url, auth=auth, verbose=False).predict({"text": "hi", "files": []}, [], **GREEDY, api_name="/chat")
    finally:
        remove.remove()
    wait_no_generation(engine, 5)


# ------------------------------------------------------------------ exposure


@pytest.fixture(scope="module")
def strict(random_handle):
    """A second app with tight limits, one reply at a time, a line of 1 and a password (random weights: replies
    run long)."""
    settings = parse_settings(["--model", "tiny", "--max-upload-mb", "1", "--batch", "1", "--queue-size", "1",
                               "--token-timeout", "1", "--auth", "ann:secret"], environ={})
    with serve(settings, random_handle) as served:
        yield served[1], ("ann", "secret"), served.engine


def test_auth_is_required_and_works(strict):
    url, auth, _ = strict
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different types per version
        Client(url, verbose=False)
    with pytest.raises(Exception):  # noqa: B017
        Client(url, auth=("ann", "wrong"), verbose=False)
    assert isinstance(Client(url, auth=auth, verbose=False).predict({"text": "hi", "files": []}, [], **GREEDY,
                                                                    api_name="/chat"), str)


def test_upload_cap_is_enforced_by_the_server(strict, tmp_path):
    url, auth, _ = strict
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * 1024 * 1024))
    with httpx.Client(base_url=url) as http:
        assert http.post("/login", data={"username": auth[0], "password": auth[1]}).status_code == 200
        response = http.post("/gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")})
    assert response.status_code == 413 and "exceeded maximum allowed size" in response.text


@pytest.mark.parametrize("target", [
    "/etc/passwd",
    "../../../../../../etc/passwd",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "{root}/app.py",
    "{root}/assets/tiny-dsvl-hybrid/config.json",
    "{root}/../shared/notes/design.md",
])
def test_no_file_outside_the_app_folders_can_be_fetched(app_server, target):
    url = app_server[1].rstrip("/")
    target = target.format(root=ROOT)
    for prefix in ("/gradio_api/file=", "/file="):
        response = httpx.get(url + prefix + target)
        assert response.status_code in (400, 403, 404, 405), (prefix, target, response.status_code)
        assert "root:" not in response.text and "model_type" not in response.text


def test_example_images_are_still_served(app_server):
    url = app_server[1].rstrip("/")
    response = httpx.get(f"{url}/gradio_api/file={ROOT / 'assets' / 'examples' / 'red_circle.png'}")
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


def test_image_urls_in_user_text_are_never_fetched(client):
    hits = []

    class Spy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    with loopback_http(Spy) as base:
        text = f"Look at ![cat]({base}/md.png) and <img src='{base}/html.png'> and {base}/bare.png"
        assert isinstance(chat(client, {"text": text, "files": []}), str)
        history = [{"role": "user", "content": {"path": f"{base}/history.png"}}, {"role": "assistant", "content": "ok"}]
        with pytest.raises(AppError, match="not a file uploaded to this app"):
            chat(client, {"text": "and?", "files": []}, history)
        time.sleep(0.3)
    assert hits == []
