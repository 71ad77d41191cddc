"""Image URLs → files the normal intake reads (`media.load_image`), for API callers that send URLs.

- `data:` URLs (base64) are decoded into an app-owned, content-addressed folder, so a conversation
  resent every turn writes each image once; the folder keeps its newest `max_files` images;
- this server's own file URLs (`…/gradio_api/file=<path>`, e.g. after an upload) map to their path,
  which must lie in the app's folders;
- `http(s)` URLs are fetched only when the operator allowed it, under `fetch.RemoteImages`' rules.

Used by the OpenAI-compatible `/v1` API and by `/chat` (and so MCP clients). No gradio, no model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .fetch import RemoteImageError, RemoteImages
from .media import ImageRejected, check_location
from .settings import Limits

FILE_ROUTE = "/gradio_api/file="
URL_SCHEMES = ("data:", "http://", "https://")


class ImageUrlError(ValueError):
    """A URL that gives no image file; str() is the message for the user (it names the image)."""


def is_image_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(URL_SCHEMES)


class ImageUrls:
    """Turns the image URLs of one server's requests into local files."""

    def __init__(self, folder: Path, allowed_roots: list[str], limits: Limits, allow_remote: bool,
                 max_files: int = 256):
        self.folder = Path(folder)
        self.allowed_roots = list(allowed_roots)
        self.limits = limits
        self.remote = RemoteImages(limits.upload_bytes) if allow_remote else None
        self.max_files = max_files

    async def resolve(self, url: str, label: str, server_netloc: str | None = None) -> str:
        """The local path of the image at `url`; `label` ("Image 2") names it in refusals."""
        if url.startswith("data:"):
            return self._write(self._decode(url, label))
        parts = urlsplit(url)
        if parts.path.startswith(FILE_ROUTE) and (not parts.netloc or parts.netloc == server_netloc):
            path = unquote(parts.path[len(FILE_ROUTE):])
            try:
                check_location(path, self.allowed_roots)
            except ImageRejected:
                raise ImageUrlError(f"{label} is not a file uploaded to this server") from None
            return path
        if parts.scheme in ("http", "https"):
            if self.remote is None:
                raise ImageUrlError(f"{label}: remote image URLs are not fetched by this server (its operator can "
                                    "allow them with --allow-remote-images); send the image as a base64 data: URL")
            try:
                return self._write(await self.remote.fetch(url))
            except RemoteImageError as exc:
                raise ImageUrlError(f"{label} ({url}) {exc}") from None
        raise ImageUrlError(f"{label}: unsupported image URL; use a data: URL (base64) or an http(s) URL")

    def resolve_blocking(self, url: str, label: str, server_netloc: str | None = None) -> str:
        """`resolve` for synchronous callers (a gradio event runs on a worker thread)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.resolve(url, label, server_netloc))
        with ThreadPoolExecutor(1) as pool:  # this thread already runs a loop: use another one
            return pool.submit(asyncio.run, self.resolve(url, label, server_netloc)).result()

    def decode(self, url: str, label: str) -> bytes:
        """The bytes of a base64 data: URL (a PDF's, say), under the upload cap."""
        return self._decode(url, label)

    def prune(self) -> None:
        self._prune()

    def _decode(self, url: str, label: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageUrlError(f"{label}: a data: URL must be base64 ('data:image/png;base64,...')")
        limit = self.limits.upload_bytes
        if len(payload) * 3 // 4 > limit:
            raise ImageUrlError(f"{label} is {len(payload) * 3 / 4 / 2**20:.1f} MB, over the "
                                f"{limit / 2**20:.0f} MB upload limit")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageUrlError(f"{label}: its data: URL is not valid base64") from None

    def _write(self, data: bytes) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.img"
        if path.exists():
            path.touch()  # recently used: pruned last
        else:
            path.write_bytes(data)
            self._prune()
        return str(path)

    def _prune(self) -> None:
        """Keep the newest `max_files` (decoded images, and PDF pages rendered here: documents.py)."""
        files = sorted([*self.folder.glob("*.img"), *self.folder.glob("*.png")], key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - self.max_files)]:
            old.unlink(missing_ok=True)
