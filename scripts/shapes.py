"""Synthetic shape images and conversations in the real chat format (for training and evaluation).

Shapes (circle, square, triangle) in 8 colours, 1–4 per image, on plain or gradient backgrounds,
at varied sizes, positions and image sizes. Training and held-out splits use different background
palettes, so the held-out images have backgrounds never seen in training.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "black": (20, 20, 20),
    "pink": (250, 120, 190),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
ORDINALS = {1: "first", 2: "second"}

# Pale backgrounds far from every shape colour; the held-out split uses its own palette.
BACKGROUNDS = {
    "train": [(255, 255, 255), (240, 240, 240), (250, 245, 230), (230, 240, 250), (235, 250, 235), (220, 220, 225)],
    "heldout": [(245, 235, 245), (250, 250, 215), (215, 235, 235)],
}

QUESTIONS = {
    "colour": ["What colour is the shape?", "What color is the shape?", "Which colour is the shape?",
               "What is the colour of the shape?", "Tell me the colour of the shape.", "What colour is it?"],
    "shape": ["What shape is it?", "What shape is this?", "Which shape is in the image?",
              "What kind of shape is it?", "Name the shape.", "What shape do you see?"],
    "count": ["How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
              "How many shapes do you see?", "What is the number of shapes?"],
    "order": ["What colour is the {nth} image?", "What color is the {nth} image?",
              "Which colour is the {nth} image?", "What is the colour of the {nth} image?"],
}


@dataclass(frozen=True)
class Drawn:
    """A drawn image and what is in it."""

    image: Image.Image
    shapes: tuple[tuple[str, str], ...]  # (shape, colour) per drawn shape
    boxes: tuple[tuple[int, int, int, int], ...] = ()  # bounding box per drawn shape

    def cell_instances(self, grid: int = 24) -> list[int]:
        """Which shape (1-based, 0 = background) covers the centre of each cell of the model's grid.

        The processor pads an image to a centred square and scales it, so cell (r, c) of a
        `grid` x `grid` view is centred at ((c + .5) * side / grid, (r + .5) * side / grid) of the
        padded square; tests check this against the processor's own tensors.
        """
        w, h = self.image.size
        side = max(w, h)
        left, top = (side - w) // 2, (side - h) // 2
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        for i, ((kind, _), box) in enumerate(zip(self.shapes, self.boxes, strict=True)):
            draw_shape(draw, kind, box, i + 1)
        cells = []
        for r in range(grid):
            for c in range(grid):
                x, y = int((c + 0.5) * side / grid) - left, int((r + 0.5) * side / grid) - top
                cells.append(mask.getpixel((x, y)) if 0 <= x < w and 0 <= y < h else 0)
        return cells


def _background(rng: random.Random, size: tuple[int, int], split: str) -> Image.Image:
    palette = BACKGROUNDS[split]
    first = rng.choice(palette)
    if rng.random() < 0.5:
        return Image.new("RGB", size, first)
    second = rng.choice(palette)
    w, h = size
    horizontal = rng.random() < 0.5
    steps = w if horizontal else h
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for i in range(steps):
        t = i / max(steps - 1, 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(first, second, strict=True))
        draw.line([(i, 0), (i, h)] if horizontal else [(0, i), (w, i)], fill=colour)
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)


def draw_image(rng: random.Random, split: str, count: int = 1, colour: str | None = None,
               shape: str | None = None, scale: tuple[float, float] = (0.25, 0.5)) -> Drawn:
    """An image with `count` non-overlapping shapes at random sizes and positions."""
    # Aspect ratios up to 3:2 and shapes at least a quarter of the short side keep every shape a
    # few patches wide in the model's 24x24 grid (the image is padded to a square first).
    long_side = rng.randint(256, 1024)
    short_side = int(long_side / rng.uniform(1.0, 1.5))
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    image = _background(rng, (w, h), split)
    draw = ImageDraw.Draw(image)
    side = min(w, h)
    placed: list[tuple[int, int, int, int]] = []
    shapes = []
    for _ in range(count):
        for _attempt in range(200):
            s = int(side * rng.uniform(*scale) / (1 if count == 1 else 1.6))
            x, y = rng.randint(0, w - s), rng.randint(0, h - s)
            box = (x, y, x + s, y + s)
            margin = side // 30
            if all(x + s + margin < a or a + (c - a) + margin < x or y + s + margin < b or b + (d - b) + margin < y
                   for a, b, c, d in placed):
                break
        else:
            raise RuntimeError("could not place shapes")
        placed.append(box)
        kind = shape or rng.choice(SHAPES)
        name = colour or rng.choice(list(COLOURS))
        draw_shape(draw, kind, box, COLOURS[name])
        shapes.append((kind, name))
    return Drawn(image, tuple(shapes), tuple(placed))


def answer(kind: str, drawn: Drawn, nth: int = 1) -> str:
    """The short reference answer for a question type about a drawn image."""
    if kind == "colour":
        return f"The shape is {drawn.shapes[0][1]}."
    if kind == "shape":
        return f"It is a {drawn.shapes[0][0]}."
    if kind == "count":
        n = len(drawn.shapes)
        return "There is one shape." if n == 1 else f"There are {NUMBERS[n]} shapes."
    return f"The {ORDINALS[nth]} image is {drawn.shapes[0][1]}."


def keyword(kind: str, drawn: Drawn, nth: int = 1) -> str:
    """The word an answer must contain to be right."""
    if kind == "shape":
        return drawn.shapes[0][0]
    if kind == "count":
        return NUMBERS[len(drawn.shapes)]
    return drawn.shapes[0][1]


def _user(images: list[Image.Image], text: str) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@dataclass
class Sample:
    """A conversation ending in a user question, its expected answer and the keyword that must be in it."""

    kind: str
    messages: list[dict]
    answer: str
    keyword: str
    drawn: tuple[Drawn, ...] = ()  # the images, in the order they appear in the conversation


def sample(rng: random.Random, split: str, kind: str | None = None, scale: tuple[float, float] = (0.25, 0.5),
           shape: str | None = None, draw: Callable[..., Drawn] = draw_image) -> Sample:
    """One conversation of a given (or random) question type, possibly multi-image / multi-turn.

    `draw` makes the images (same signature as `draw_image`); training passes one that picks from a
    pool of images whose vision features are already computed.
    """
    kind = kind or rng.choice(["colour", "shape", "count", "order", "order_turns"])
    if kind in ("colour", "shape"):
        drawn = draw(rng, split, scale=scale, shape=shape)
        q = rng.choice(QUESTIONS[kind])
        messages = [_user([drawn.image], q)]
        if rng.random() < 0.3:  # a second turn about the same image
            other = "shape" if kind == "colour" else "colour"
            messages = [_user([drawn.image], rng.choice(QUESTIONS[other])), _assistant(answer(other, drawn)),
                        {"role": "user", "content": [{"type": "text", "text": q}]}]
        return Sample(kind, messages, answer(kind, drawn), keyword(kind, drawn), (drawn,))
    if kind == "count":
        drawn = draw(rng, split, count=rng.randint(1, 4))
        return Sample(kind, [_user([drawn.image], rng.choice(QUESTIONS["count"]))], answer("count", drawn),
                      keyword("count", drawn), (drawn,))
    # Image order: two images with different colours, in one message or spread over two turns.
    first_colour, second_colour = rng.sample(list(COLOURS), 2)
    first = draw(rng, split, colour=first_colour, scale=scale)
    second = draw(rng, split, colour=second_colour, scale=scale)
    nth = rng.choice([1, 2])
    q = rng.choice(QUESTIONS["order"]).format(nth=ORDINALS[nth])
    target = first if nth == 1 else second
    if kind == "order":
        messages = [_user([first.image, second.image], q)]
    else:
        messages = [_user([first.image], rng.choice(QUESTIONS["colour"])), _assistant(answer("colour", first)),
                    _user([second.image], q)]
    return Sample("order", messages, answer("order", target, nth), keyword("order", target, nth), (first, second))
