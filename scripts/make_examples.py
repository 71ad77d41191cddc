"""Draw the example images shipped in assets/examples/ (deterministic; made for this repo, CC0).

They use the colours and shapes the bundled tiny checkpoint was trained on (scripts/shapes.py),
so it answers the colour and shape examples right offline (see its accuracy.json for the others).

    python scripts/make_examples.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "assets" / "examples"
BACKGROUND = (240, 240, 240)


def shape_image(size: tuple[int, int], placed: list[tuple[str, str, float, float]], side: float = 0.4) -> Image.Image:
    """Shapes (kind, colour, centre x, centre y as fractions) `side` x the short side wide, on a plain background."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    w, h = size
    r = int(min(w, h) * side / 2)
    for kind, colour, fx, fy in placed:
        x, y = int(w * fx), int(h * fy)
        shapes.draw_shape(draw, kind, (x - r, y - r, x + r, y + r), shapes.COLOURS[colour])
    return image


EXAMPLES = {
    "red_circle.png": ((480, 360), [("circle", "red", 0.5, 0.5)]),
    "blue_square.png": ((360, 480), [("square", "blue", 0.5, 0.5)]),
    "green_triangle.png": ((512, 512), [("triangle", "green", 0.5, 0.5)]),
    "yellow_circle.png": ((640, 480), [("circle", "yellow", 0.5, 0.5)]),
    "three_shapes.png": ((640, 480), [("square", "purple", 0.22, 0.3), ("circle", "orange", 0.75, 0.3),
                                      ("triangle", "blue", 0.45, 0.75)]),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (size, placed) in EXAMPLES.items():
        side = 0.4 if len(placed) == 1 else 0.3
        shape_image(size, placed, side).save(OUT / name, optimize=True)
        print(OUT / name)


if __name__ == "__main__":
    main()
