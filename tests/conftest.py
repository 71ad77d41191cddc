"""Shared fixtures: the bundled tiny checkpoint and image files made on the fly."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from PIL import Image

from dsvl_app.model import get_model
from dsvl_app.settings import Settings, parse_settings


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


@pytest.fixture(scope="session")
def app_server(settings, handle):
    """The real app (tiny checkpoint) launched in this process; yields (demo, url)."""
    from dsvl_app.ui import build_demo, launch_kwargs

    demo = build_demo(settings, handle)
    kwargs = launch_kwargs(settings)
    kwargs.update(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    yield demo, demo.local_url
    demo.close()


@pytest.fixture(scope="session")
def client(app_server):
    from gradio_client import Client

    return Client(app_server[1], verbose=False)


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
