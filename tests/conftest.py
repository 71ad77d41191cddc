"""Shared fixtures: the bundled tiny checkpoint and image files made on the fly."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from PIL import Image

from dsvl_app.model import get_model
from dsvl_app.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"


def pytest_configure(config):
    """Keep the app's image store (saved conversations) out of the user's real cache directory."""
    import os
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dsvl-test-cache-")


def load_script(name: str):
    """Import scripts/<name>.py (the checkpoint builder, trainer and shape drawer are scripts, not a package)."""
    import importlib
    import sys

    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return parse_settings(["--model", "tiny"], environ={})


@pytest.fixture(scope="session")
def handle(settings):
    return get_model(settings)


@pytest.fixture
def make_image(tmp_path: Path):
    """Write an image file and return its path: make_image("red.png", colour=(255, 0, 0), size=(64, 48))."""

    def make(name: str = "image.png", colour=(255, 0, 0), size=(64, 48), mode: str = "RGB", **save) -> str:
        path = tmp_path / name
        Image.new(mode, size, colour).save(path, **save)
        return str(path)

    return make


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_text(handle, inputs, params, **kwargs):
    """`model.generate`'s reply to processor `inputs` — the oracle the engine is held to (tests only).

    A static cache of prompt + max_new_tokens positions, as the app used before its engine decoded replies
    itself, and the seed set as generate's users set it. With `return_dict_in_generate=True` etc. in
    `kwargs`, the generate output itself is returned."""
    import torch
    from transformers import StaticCache

    from dsvl_app.runner import model_inputs

    tokenizer = handle.processor.tokenizer
    prompt = int(inputs["input_ids"].shape[1])
    if params.seed is not None:
        torch.manual_seed(int(params.seed))
    with torch.inference_mode():
        out = handle.model.generate(
            **model_inputs(handle.model, inputs), **params.generate_kwargs(),
            past_key_values=StaticCache(config=handle.model.config, max_cache_len=prompt + params.max_new_tokens),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, disable_compile=True, **kwargs)
    if kwargs:
        return out
    return tokenizer.decode(out[0, prompt:], skip_special_tokens=True).lstrip()  # replies drop the separator space


class Served(tuple):
    """(demo, url) of a launched app, with its `engine` (to see what runs on the model)."""

    engine: object


@contextlib.contextmanager
def serve(settings: Settings, handle, engine=None):
    """The real app for `handle` (or `engine`), launched in this process on a free port; yields (demo, url)."""
    from dsvl_app.engine import Engine
    from dsvl_app.ui import build_demo, launch_kwargs

    engine = engine or Engine(handle, settings)
    demo = build_demo(settings, engine)
    kwargs = launch_kwargs(settings, engine)
    kwargs.update(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    served = Served((demo, demo.local_url))
    served.engine = engine
    try:
        yield served
    finally:
        demo.close()


@pytest.fixture(scope="session")
def app_server(settings, handle):
    """The real app with the bundled (trained) tiny checkpoint; yields (demo, url)."""
    with serve(settings, handle) as served:
        yield served


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """The untrained build of the tiny checkpoint (same classes, processor and template, random weights).

    The trained checkpoint answers in a short sentence and stops; tests of streaming, Stop, cancelled
    jobs and closed tabs need a model that keeps talking, and random weights do.
    """
    return load_script("build_tiny_checkpoint").build(tmp_path_factory.mktemp("random-tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def random_handle(random_checkpoint):
    """The random-weight build, loaded as the app loads it (sdpa attention)."""
    from dsvl_app.model import load_model

    return load_model(parse_settings(["--model", str(random_checkpoint)], environ={}))


@pytest.fixture(scope="session")
def random_app_server(settings, random_handle):
    """The real app serving the random-weight build; yields (demo, url)."""
    with serve(settings, random_handle) as served:
        yield served


@pytest.fixture(scope="session")
def client(app_server):
    from gradio_client import Client

    return Client(app_server[1], verbose=False)


@pytest.fixture(scope="session")
def random_client(random_app_server):
    from gradio_client import Client

    return Client(random_app_server[1], verbose=False)


@contextlib.contextmanager
def loopback_http(handler: type):
    """Serve `handler` (a BaseHTTPRequestHandler subclass) on 127.0.0.1; yields the base URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def wait_until(condition, timeout: float = 10.0, poll: float = 0.02) -> bool:
    """Poll `condition()` until it holds or `timeout` passes; its last value."""
    import time

    deadline = time.monotonic() + timeout
    while not (ok := condition()) and time.monotonic() < deadline:
        time.sleep(poll)
    return bool(ok)


def replying(engine) -> bool:
    """Whether the engine has a reply in line, reading its prompt, or decoding."""
    return engine.scheduler.busy
