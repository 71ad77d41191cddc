"""PDFs through `/v1` as OpenAI sends them (a `file` part with `file_data`), with the real `openai` client: pages seen
as images and as text, said in a header and in the prompt; every bad document a specific 400; two at once."""

import base64
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dsvl_app.settings import parse_settings
from tests.conftest import serve
from tests.unit.test_documents import encrypted, make_pdf

pytestmark = pytest.mark.api

MODEL = "tiny-dsvl-hybrid"


def file_part(data: bytes, name: str = "report.pdf", **extra) -> dict:
    return {"type": "file", "file": {"filename": name, "file_data": "data:application/pdf;base64,"
                                     + base64.b64encode(data).decode(), **extra}}


def ask(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What colour is the shape?"}]}]


@pytest.fixture(scope="module")
def client(handle):
    with serve(parse_settings(["--model", "tiny"], environ={}), handle) as served:
        yield openai.OpenAI(base_url=served[1] + "v1", api_key="unused", max_retries=0, timeout=120)


def test_a_pdf_is_answered_and_the_pages_seen_are_said(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ask(file_part(make_pdf(10))),
                                                           max_tokens=20)
    completion = raw.parse()
    assert raw.headers["x-document-pages"] == '"report.pdf", 10 pages: pages 1-4 as images; the text of pages 5-10'
    assert completion.choices[0].message.content == "The shape is red."  # the page's red disc, seen as an image
    assert completion.usage.prompt_tokens > 4 * 576  # four page images and the other pages' text
    chosen = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(file_part(make_pdf(10), pages="7")), max_tokens=20)
    assert chosen.headers["x-document-pages"] == '"report.pdf", 10 pages: page 7 as an image; the text of pages 1-6, 8-10'


@pytest.mark.parametrize("part, words", [
    (file_part(encrypted(make_pdf(2)), "locked.pdf"), "“locked.pdf” is password-protected"),
    (file_part(b"%PDF-1.7 nothing more", "broken.pdf"), "“broken.pdf” is not a readable PDF"),
    (file_part(b"\x89PNG\r\n\x1a\n", "photo.pdf"), "“photo.pdf” is not a PDF document"),
    (file_part(make_pdf(10), pages="1-6"), "are 6 images, and this message has room for 4 more"),
    (file_part(make_pdf(3), pages="5"), "the document has pages 1-3"),
    ({"type": "file", "file": {"file_id": "file-abc123"}}, "Files API, which this server does not have"),
    ({"type": "file", "file": {"filename": "x.pdf", "file_data": "https://example.com/x.pdf"}}, "must be a data: URL"),
])
def test_bad_documents_get_a_specific_400_and_the_next_request_is_answered(client, part, words):
    with pytest.raises(openai.BadRequestError, match=words) as refused:
        client.chat.completions.create(model=MODEL, messages=ask(part), max_tokens=8)
    assert refused.value.status_code == 400
    assert client.chat.completions.create(model=MODEL, messages=ask(file_part(make_pdf(1))), max_tokens=20) \
        .choices[0].message.content == "The shape is red."


def test_two_people_attach_pdfs_at_once(client):
    documents = [make_pdf(5), make_pdf(8)]

    def one(i: int) -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ask(file_part(documents[i], f"doc{i}.pdf")), max_tokens=20)
        return raw.headers["x-document-pages"], raw.parse().choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, [0, 1, 0, 1]))
    assert [text for _, text in answers] == ["The shape is red."] * 4
    assert answers[0][0].startswith('"doc0.pdf", 5 pages') and answers[1][0].startswith('"doc1.pdf", 8 pages')
