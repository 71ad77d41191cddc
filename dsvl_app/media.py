"""Safe image intake: a path in, an RGB `PIL.Image` out, or an `ImageRejected` naming file and reason.

Pure: no model, no gradio. Sniffs the real format (never trusts the extension), refuses
decompression bombs before decoding, catches truncated/corrupt/empty files, applies EXIF
orientation, takes the first frame of animations and converts every mode to RGB.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .settings import Limits

# Formats Pillow may decode for us. Anything else (PSD, EPS, ICO, SVG, PDF, ...) is refused.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ALLOWED_FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"


class ImageRejected(ValueError):
    """An upload that cannot be used as an image; str() is the message for the user."""

    def __init__(self, filename: str, reason: str):
        self.filename = filename
        self.reason = reason
        super().__init__(f"“{filename}” {reason}")


def display_name(path: str | os.PathLike) -> str:
    """The name a user recognises (gradio keeps the original name as the temp file's basename)."""
    return Path(path).name or str(path)


def _describe_non_image(head: bytes) -> str:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<script")):
        return "is an HTML page, not an image"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "is an SVG drawing; SVG is not supported — export it as PNG"
    if text.startswith(b"%pdf"):
        return "is a PDF document, not an image"
    try:
        head.decode("utf-8")
        return "is a text file, not an image"
    except UnicodeDecodeError:
        return f"is not an image in a supported format ({ALLOWED_FORMATS_TEXT})"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping (a plain convert() turns most pixels white).
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        scale = 255.0 / 65535.0 if top > 255 else (255.0 if image.mode == "F" and top <= 1.0 else 1.0)
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, limits: Limits) -> Image.Image:
    """Open one upload safely and return it as an RGB image, or raise ImageRejected."""
    name = display_name(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ImageRejected(name, "could not be read (the file is missing or unreadable)") from None
    if size == 0:
        raise ImageRejected(name, "is empty (0 bytes)")
    if size > limits.upload_bytes:
        raise ImageRejected(name, f"is {size / 2**20:.1f} MB, over the {limits.upload_bytes / 2**20:.0f} MB upload limit")

    with warnings.catch_warnings():
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice it: treat that as a refusal too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            with open(path, "rb") as handle:
                raise ImageRejected(name, _describe_non_image(handle.read(512))) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(name, f"is too large to decode safely (decompression-bomb guard): {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(name, f"is corrupt and cannot be opened ({exc})") from None

        with image:
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageRejected(name, "has no pixels")
            if width * height > limits.pixels_per_image:
                raise ImageRejected(
                    name,
                    f"is {width}×{height} = {width * height / 1e6:.0f} megapixels, over the "
                    f"{limits.pixels_per_image / 1e6:.0f}-megapixel limit (decompression-bomb guard)",
                )
            try:
                image.seek(0)  # first frame of an animated GIF/WebP/APNG or multi-page TIFF
                image.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageRejected(name, f"is too large to decode safely (decompression-bomb guard): {exc}") from None
            except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
                detail = "truncated" if "truncated" in str(exc).lower() else "corrupt"
                raise ImageRejected(name, f"is {detail} and cannot be decoded ({exc})") from None
            try:
                oriented = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels, skip the rotation
                oriented = image
            try:
                return _to_rgb(oriented).copy()
            except (ValueError, OSError) as exc:
                raise ImageRejected(name, f"uses colour mode {image.mode}, which cannot be converted to RGB ({exc})") from None


def check_location(path: str | os.PathLike, allowed_roots: list[str]) -> None:
    """Refuse paths outside the app's own folders: API clients could name any file on the server."""
    real = os.path.realpath(path)
    for root in allowed_roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return
    raise ImageRejected(display_name(path), "is not a file uploaded to this app, so it cannot be used")
