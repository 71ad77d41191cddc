"""The bundled tiny checkpoint really answers visual questions, through the real /chat endpoint."""

import random

import pytest
from gradio_client import handle_file

from dsvl_app.ui import EXAMPLES_DIR
from tests.conftest import load_script

pytestmark = pytest.mark.api

GREEDY = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def shapes():
    return load_script("shapes")


def ask(client, text: str, files=(), history=()) -> str:
    return client.predict({"text": text, "files": [handle_file(str(f)) for f in files]}, list(history), **GREEDY,
                          api_name="/chat")


def save(tmp_path, drawn, name: str) -> str:
    path = tmp_path / name
    drawn.image.save(path)
    return str(path)


def test_the_examples_get_right_one_sentence_answers(client):
    red = ask(client, "What colour is the shape?", [EXAMPLES_DIR / "red_circle.png"])
    assert red.strip() == "The shape is red."  # the whole reply: it stopped by itself after one sentence
    assert ask(client, "What shape is it?", [EXAMPLES_DIR / "green_triangle.png"]).strip() == "It is a triangle."
    assert "square" in ask(client, "What shape is it?", [EXAMPLES_DIR / "blue_square.png"])
    assert "three" in ask(client, "How many shapes are there?", [EXAMPLES_DIR / "three_shapes.png"]).split()
    assert ask(client, "What colour is the second image?",
               [EXAMPLES_DIR / "blue_square.png", EXAMPLES_DIR / "yellow_circle.png"]).strip() == "The second image is yellow."


def test_it_counts_shapes(client, shapes, tmp_path):
    """Seven of eight held-out counts right (93 % over 300 in accuracy.json; issue 5 asks 90 %)."""
    rng = random.Random(11)
    right = 0
    for i in range(8):
        drawn = shapes.draw_image(rng, "heldout", count=i % 4 + 1)
        reply = ask(client, "How many shapes are there?", [save(tmp_path, drawn, f"count{i}.png")])
        right += shapes.NUMBERS[len(drawn.shapes)] in reply
    assert right >= 7, f"{right}/8 right"


def test_a_red_shape_it_has_never_seen_is_red(client, shapes, tmp_path):
    rng = random.Random(2026)
    for i, kind in enumerate(shapes.SHAPES):
        drawn = shapes.draw_image(rng, "heldout", colour="red", shape=kind)
        reply = ask(client, "What colour is the shape?", [save(tmp_path, drawn, f"red{i}.png")])
        assert "red" in reply and reply.endswith("."), reply


def test_first_and_second_image_in_one_message_and_across_turns(client, shapes, tmp_path):
    rng = random.Random(7)
    right = total = 0
    for i in range(4):
        first_colour, second_colour = rng.sample(list(shapes.COLOURS), 2)
        first = save(tmp_path, shapes.draw_image(rng, "heldout", colour=first_colour), f"first{i}.png")
        second = save(tmp_path, shapes.draw_image(rng, "heldout", colour=second_colour), f"second{i}.png")
        # Both images in one message.
        for nth, colour in (("first", first_colour), ("second", second_colour)):
            reply = ask(client, f"What colour is the {nth} image?", [first, second])
            right += colours_named(shapes, reply) == {colour}
            total += 1
        # The first image in an earlier turn (history), the second in this message.
        history = [{"role": "user", "content": [{"type": "file", "file": handle_file(first)},
                                                {"type": "text", "text": "What colour is the shape?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": f"The shape is {first_colour}."}]}]
        for nth, colour in (("first", first_colour), ("second", second_colour)):
            reply = ask(client, f"What colour is the {nth} image?", [second], history)
            right += colours_named(shapes, reply) == {colour}
            total += 1
    assert right == total, f"{right}/{total} right"


def colours_named(shapes, reply: str) -> set[str]:
    """The colour words a reply names."""
    return {w.strip(".,!?").lower() for w in reply.split()} & set(shapes.COLOURS)
