"""Where the UI's files live: the image store, the only folders a request may name, the folder for image URLs
and rendered PDF pages.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..image_urls import ImageUrls
from ..settings import Settings
from ..store import ImageStore, default_dir

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
EXAMPLES_DIR = ASSETS / "examples"


def image_store(settings: Settings) -> ImageStore:
    """Saved conversations' images (--store-dir, --store-mb)."""
    store = ImageStore(Path(settings.store_dir) if settings.store_dir else default_dir(), int(settings.store_mb * 2**20))
    store.images.mkdir(parents=True, exist_ok=True)
    return store


def allowed_roots(store: ImageStore | None = None) -> list[str]:
    """The only server folders a request may name: gradio's upload cache, our examples, the image store."""
    return [gr.utils.get_upload_folder(), str(EXAMPLES_DIR), *([str(store.images)] if store else [])]


def image_urls(settings: Settings) -> ImageUrls:
    """Image URLs sent by API and MCP callers → files in an app folder inside gradio's upload cache."""
    folder = Path(gr.utils.get_upload_folder()) / "dsvl-url-images"
    return ImageUrls(folder, allowed_roots(), settings.limits, settings.allow_remote_images)


