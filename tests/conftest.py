"""Shared fixtures: the bundled tiny checkpoint and image files made on the fly."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from PIL import Image

from dsvl_app.model import get_model
from dsvl_app.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent


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


@contextlib.contextmanager
def serve(settings: Settings, handle):
    """The real app for `handle`, launched in this process on a free port; yields (demo, url)."""
    from dsvl_app.ui import build_demo, launch_kwargs

    demo = build_demo(settings, handle)
    kwargs = launch_kwargs(settings, handle)
    kwargs.update(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    try:
        yield demo, demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="session")
def app_server(settings, handle):
    """The real app with the bundled (trained) tiny checkpoint; yields (demo, url)."""
    with serve(settings, handle) as served:
        yield served


@pytest.fixture(scope="session")
def random_handle(tmp_path_factory):
    """The untrained build of the tiny checkpoint (same classes, processor and template, random weights).

    The trained checkpoint answers in a short sentence and stops; tests of streaming, Stop, cancelled
    jobs and closed tabs need a model that keeps talking, and random weights do.
    """
    from dsvl_app.model import load_model

    path = load_script("build_tiny_checkpoint").build(tmp_path_factory.mktemp("random-tiny") / "ckpt", seed=0)
    return load_model(parse_settings(["--model", str(path)], environ={}))


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


def generate_threads() -> list:
    """Generate worker threads still alive in this process."""
    import threading

    return [t for t in threading.enumerate() if t.name == "dsvl-generate" and t.is_alive()]
