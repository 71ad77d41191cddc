"""The image store: content addressing, the size cap, path safety, the persistent browser-state secret."""

import hashlib
import os
import time

import pytest

from dsvl_app.store import ImageStore, StoreError, default_dir


def test_the_same_bytes_are_stored_once_under_their_hash(tmp_path):
    store = ImageStore(tmp_path, 10_000)
    digest = store.put_bytes(b"an image")
    assert digest == hashlib.sha256(b"an image").hexdigest() and store.put_bytes(b"an image") == digest
    assert store.get(digest).read_bytes() == b"an image" and len(list(store.images.iterdir())) == 1
    assert store.put_bytes(b"another") != digest


def test_the_cap_evicts_the_least_recently_used(tmp_path):
    store = ImageStore(tmp_path, 3_000)
    digests = []
    for n in range(3):
        digests.append(store.put_bytes(bytes([n]) * 1000))
        time.sleep(0.02)  # distinct modification times
    store.get(digests[0])  # used: now the most recent
    newest = store.put_bytes(b"\xff" * 1000)
    assert store.nbytes() <= 3_000
    assert store.get(digests[1]) is None  # the least recently used went
    assert store.get(digests[0]) is not None and store.get(newest) is not None
    with pytest.raises(StoreError, match="larger than the whole store"):
        store.put_bytes(b"x" * 5_000)


@pytest.mark.parametrize("name", ["../../etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/x", "", None, ".." + "0" * 62])
def test_only_hashes_name_files(tmp_path, name):
    with pytest.raises(StoreError):
        ImageStore(tmp_path, 1000).path(name)


def test_the_browser_state_secret_is_made_once_and_kept(tmp_path):
    first = ImageStore(tmp_path, 1000).secret()
    assert len(first) >= 24 and ImageStore(tmp_path, 1000).secret() == first
    assert oct(os.stat(tmp_path / "browser-state-secret").st_mode & 0o777) == "0o600"


def test_default_folder_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dir() == tmp_path / "dsvl-chat"
