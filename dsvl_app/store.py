"""The app's own image store: saved conversations keep their images here, by content hash, under a size cap.

A file is named by the SHA-256 of its bytes (64 hex digits, nothing else): putting the same image twice
stores it once, a name cannot be guessed from anything but the image itself, and no name can reach
outside the folder (anything that is not 64 hex digits is refused). When the folder grows past its cap,
the least recently used images go first; an image a conversation still names then loads as a
placeholder, and the chat goes on. The browser keeps the conversations (text and hashes); the images
stay on the server, so they survive a reload and a restart. No gradio, no model.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

HASH = re.compile(r"^[0-9a-f]{64}$")


class StoreError(ValueError):
    """A request the store refuses; str() says why."""


def default_dir() -> Path:
    """Under the user's cache directory ($XDG_CACHE_HOME, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsvl-chat"


class ImageStore:
    """Content-addressed image files under one folder, at most `capacity_bytes` in all."""

    def __init__(self, folder: Path, capacity_bytes: int):
        self.folder = Path(folder)
        self.capacity_bytes = int(capacity_bytes)
        self._lock = threading.Lock()

    @property
    def images(self) -> Path:
        return self.folder / "images"

    def path(self, digest: str) -> Path:
        """Where the image with this hash lives (whether or not it is there); refuses anything but a hash."""
        if not isinstance(digest, str) or not HASH.match(digest):
            raise StoreError("not an image id (64 hexadecimal digits)")
        return self.images / digest

    def get(self, digest: str) -> Path | None:
        """The stored file, marked as used; None when it is not (or no longer) stored."""
        path = self.path(digest)
        try:
            os.utime(path)
        except OSError:
            return None
        return path

    def put_bytes(self, data: bytes) -> str:
        """Store bytes (atomically), make room under the cap, return their hash."""
        digest = hashlib.sha256(data).hexdigest()
        if len(data) > self.capacity_bytes:
            raise StoreError(f"an image of {len(data) / 2**20:.1f} MB is larger than the whole store "
                             f"({self.capacity_bytes / 2**20:.0f} MB)")
        with self._lock:
            if self.get(digest) is None:
                self.images.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=self.images, prefix=".incoming-", delete=False) as tmp:
                    tmp.write(data)
                os.replace(tmp.name, self.images / digest)
                self._evict(keep=digest)
        return digest

    def put_file(self, path: str | os.PathLike) -> str:
        with open(path, "rb") as handle:
            return self.put_bytes(handle.read())

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        if not self.images.is_dir():
            return []
        return [p for p in self.images.iterdir() if HASH.match(p.name)]

    def _evict(self, keep: str) -> None:
        files = sorted(self._files(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.capacity_bytes:
                break
            if old.name != keep:
                total -= old.stat().st_size
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.images, ignore_errors=True)

    def secret(self) -> str:
        """A secret kept beside the images (made once): the browser's saved state stays readable after a restart."""
        path = self.folder / "browser-state-secret"
        try:
            return path.read_text().strip()
        except OSError:
            self.folder.mkdir(parents=True, exist_ok=True)
            value = secrets.token_urlsafe(24)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first
                return path.read_text().strip()
            with os.fdopen(fd, "w") as handle:
                handle.write(value)
            return value
