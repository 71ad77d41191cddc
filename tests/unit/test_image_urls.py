"""Image URLs → files: data: URLs (content-addressed, capped), this server's file URLs, remote ones refused."""

import base64

import pytest

from dsvl_app.image_urls import ImageUrlError, ImageUrls, is_image_url
from dsvl_app.settings import Limits


@pytest.fixture
def urls(tmp_path):
    allowed = tmp_path / "uploads"
    allowed.mkdir()
    return ImageUrls(allowed / "from-urls", [str(allowed)], Limits(upload_bytes=1000), allow_remote=False, max_files=3)


def resolve(urls, url, netloc=None):
    return urls.resolve_blocking(url, "Image 1", netloc)


def data(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def test_data_urls_are_written_once_per_content_and_pruned(urls):
    first = resolve(urls, data(b"one"))
    assert open(first, "rb").read() == b"one" and resolve(urls, data(b"one")) == first
    for n in range(5):
        resolve(urls, data(f"image {n}".encode()))
    assert len(list(urls.folder.glob("*.img"))) == 3  # only the newest three are kept


@pytest.mark.parametrize("url, words", [
    ("data:image/png,notbase64", "must be base64"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    (data(b"x" * 2000), "over the 0 MB upload limit"),
    ("http://example.com/cat.png", "--allow-remote-images"),
    ("ftp://example.com/cat.png", "unsupported image URL"),
])
def test_refusals_name_the_image_and_the_reason(urls, url, words):
    with pytest.raises(ImageUrlError, match=words) as raised:
        resolve(urls, url)
    assert str(raised.value).startswith("Image 1")


def test_this_servers_file_urls_map_to_their_path_inside_the_app_folders(urls, tmp_path):
    inside = urls.allowed_roots[0] + "/a.png"
    open(inside, "wb").write(b"png")
    assert resolve(urls, f"http://127.0.0.1:7860/gradio_api/file={inside}", "127.0.0.1:7860") == inside
    with pytest.raises(ImageUrlError, match="not a file uploaded to this server"):
        resolve(urls, "http://127.0.0.1:7860/gradio_api/file=/etc/passwd", "127.0.0.1:7860")
    # Another host's file URL is a remote URL (refused here: remote fetching is off).
    with pytest.raises(ImageUrlError, match="remote image URLs"):
        resolve(urls, f"http://elsewhere:7860/gradio_api/file={inside}", "127.0.0.1:7860")


def test_what_counts_as_an_image_url():
    assert is_image_url("data:image/png;base64,AA") and is_image_url("https://x/y.png")
    assert not is_image_url("/tmp/gradio/a.png") and not is_image_url({"path": "a.png"})
