"""Draw the example images shipped in assets/examples/ (deterministic; made for this repo, CC0).

    python scripts/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "assets" / "examples"


def shape_image(shape: str, colour: str, size=(480, 360), background="white") -> Image.Image:
    """One centred shape on a plain background."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    w, h = size
    r = min(w, h) // 3
    box = (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(w // 2, h // 2 - r), (w // 2 - r, h // 2 + r), (w // 2 + r, h // 2 + r)], fill=colour)
    return image


EXAMPLES = {
    "red_circle.png": ("circle", "red", (480, 360)),
    "blue_square.png": ("square", "blue", (360, 480)),
    "green_triangle.png": ("triangle", "green", (512, 512)),
    "yellow_circle.png": ("circle", "yellow", (640, 400)),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (shape, colour, size) in EXAMPLES.items():
        shape_image(shape, colour, size, background="#f0f0f0").save(OUT / name, optimize=True)
        print(OUT / name)


if __name__ == "__main__":
    main()
