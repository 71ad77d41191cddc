"""Fixtures of the engine room's tests."""

import pytest


@pytest.fixture
def images(make_image):
    return {"red": make_image("red.png", colour=(220, 30, 30)), "blue": make_image("blue.png", colour=(30, 40, 220)),
            "green": make_image("green.png", colour=(30, 200, 60), size=(90, 60))}
