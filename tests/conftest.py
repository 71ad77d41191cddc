"""Shared fixtures: the bundled tiny checkpoint and image files made on the fly."""

from __future__ import annotations

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
