import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dsvl_app.media import ImageRejected, load_image
from dsvl_app.settings import Limits

LIMITS = Limits()


def write_bytes(tmp_path, name, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but carries almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def rejected(path, limits=LIMITS) -> str:
    with pytest.raises(ImageRejected) as info:
        load_image(path, limits)
    return str(info.value)


# ------------------------------------------------------------------ refused


def test_text_renamed_png(tmp_path):
    msg = rejected(write_bytes(tmp_path, "notes.png", b"just some notes\nnot an image\n"))
    assert "notes.png" in msg and "text file" in msg


def test_html_saved_as_image(tmp_path):
    msg = rejected(write_bytes(tmp_path, "page.jpg", b"<!DOCTYPE html><html><body>hi</body></html>"))
    assert "page.jpg" in msg and "HTML" in msg


def test_empty_file(tmp_path):
    msg = rejected(write_bytes(tmp_path, "empty.png", b""))
    assert "empty.png" in msg and "empty (0 bytes)" in msg


@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated_png_and_jpeg(tmp_path, fmt, name):
    full = tmp_path / ("full." + fmt.lower())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(full, fmt)
    data = full.read_bytes()
    msg = rejected(write_bytes(tmp_path, name, data[: len(data) // 2]))
    assert name in msg and ("truncated" in msg or "corrupt" in msg)


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    msg = rejected(write_bytes(tmp_path, "bomb.png", png_header_only(50_000, 50_000)))
    assert "bomb.png" in msg and "decompression-bomb" in msg and "2500000000" in msg
    # Under Pillow's own limit but over ours: refused by our cap, with the size.
    msg = rejected(write_bytes(tmp_path, "bomb2.png", png_header_only(8_000, 8_000)))
    assert "8000×8000 = 64 megapixels" in msg


def test_pixel_cap_is_configurable(make_image):
    msg = rejected(make_image("big.png", size=(100, 100)), replace(LIMITS, pixels_per_image=5_000))
    assert "100×100" in msg


def test_upload_over_size_cap(tmp_path):
    path = write_bytes(tmp_path, "huge.png", b"\x89PNG" + b"\0" * 3000)
    msg = rejected(path, replace(LIMITS, upload_bytes=1024))
    assert "huge.png" in msg and "upload limit" in msg


def test_unsupported_binary_format(tmp_path):
    path = tmp_path / "icon.ico"
    Image.new("RGB", (32, 32), "red").save(path, "ICO")
    msg = rejected(str(path))
    assert "icon.ico" in msg and "supported format" in msg


def test_svg_and_missing_file(tmp_path):
    assert "SVG" in rejected(write_bytes(tmp_path, "d.png", b'<svg xmlns="http://www.w3.org/2000/svg"></svg>'))
    assert "could not be read" in rejected(str(tmp_path / "gone.png"))


def test_unicode_name_is_kept_in_messages(tmp_path):
    msg = rejected(write_bytes(tmp_path, "ünïcødé 图像.png", b"hello"))
    assert "ünïcødé 图像.png" in msg


# ------------------------------------------------------------------ accepted


def pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    r, g, b = pixel(load_image(str(path), LIMITS), (20, 15))
    assert r > 200 and g < 60 and b < 60


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    r, g, b = pixel(load_image(str(path), LIMITS))
    assert 120 <= r <= 136 and r == g == b


@pytest.mark.parametrize("mode,colour", [("RGBA", (255, 0, 0, 0)), ("LA", (0, 0))])
def test_transparency_is_flattened_on_white(make_image, mode, colour):
    image = load_image(make_image(f"t_{mode}.png", colour=colour, mode=mode), LIMITS)
    assert pixel(image) == (255, 255, 255)


def test_palette_and_greyscale_and_bilevel(make_image):
    assert pixel(load_image(make_image("p.png", colour=3, mode="P"), LIMITS)) is not None
    assert pixel(load_image(make_image("g.png", colour=200, mode="L"), LIMITS)) == (200, 200, 200)
    assert pixel(load_image(make_image("b.bmp", colour=1, mode="1"), LIMITS)) == (255, 255, 255)


@pytest.mark.parametrize("fmt,name", [("GIF", "anim.gif"), ("WEBP", "anim.webp")])
def test_animation_takes_first_frame(tmp_path, fmt, name):
    frames = [Image.new("RGB", (30, 30), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / name
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    r, g, b = pixel(load_image(str(path), LIMITS), (15, 15))
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    Image.new("RGB", (80, 40), "blue").save(path, exif=exif.tobytes())
    assert load_image(str(path), LIMITS).size == (40, 80)


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (1, 1)])
def test_extreme_aspect_ratios_and_single_pixel(make_image, size):
    assert load_image(make_image(f"s{size[0]}x{size[1]}.png", size=size), LIMITS).size == size


def test_unicode_file_name_accepted(make_image):
    assert load_image(make_image("ünïcødé 图像.png"), LIMITS).size == (64, 48)
