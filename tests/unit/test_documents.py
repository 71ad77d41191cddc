"""PDFs → page images and text: the page policy, the pages asked for, and every bad document refused by name."""

import io
import threading
from pathlib import Path

import pytest
from fpdf import FPDF
from PIL import Image
from pypdf import PdfReader, PdfWriter

from dsvl_app import conversation as conv
from dsvl_app import documents
from dsvl_app.documents import DocumentRejected, open_pdf, parse_pages
from dsvl_app.settings import Limits


def make_pdf(pages: int = 10, size: tuple[float, float] | None = None) -> bytes:
    """`pages` pages, each with a text layer ("Page N: the total is N0 euros") and a red disc."""
    pdf = FPDF(format=size or "A4")
    for n in range(1, pages + 1):
        pdf.add_page()
        pdf.set_font("helvetica", size=24)
        pdf.cell(text=f"Page {n}: the total is {n * 10} euros")
        pdf.set_fill_color(220, 30, 30)
        pdf.ellipse(20, 40, 60, 60, style="F")
    return bytes(pdf.output())


def encrypted(data: bytes) -> bytes:
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(data)))
    writer.encrypt("secret")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_the_first_pages_that_fit_are_images_and_the_rest_is_text(tmp_path):
    doc = open_pdf(make_pdf(10), "ten.pdf", tmp_path, Limits(), image_slots=4)
    assert [n for n, _ in doc.images] == [1, 2, 3, 4] and [n for n, _ in doc.texts] == [5, 6, 7, 8, 9, 10]
    assert doc.texts[0][1] == "Page 5: the total is 50 euros" and not doc.left_out
    image = Image.open(doc.images[0][1])
    assert max(image.size) == 1024 and image.getpixel((image.width * 50 // 210, image.height * 70 // 297))[0] > 180
    assert doc.summary() == "“ten.pdf”, 10 pages: pages 1-4 as images; the text of pages 5-10"
    parts = doc.parts()
    assert parts[0] == "[Document “ten.pdf”, 10 pages: pages 1-4 as images; the text of pages 5-10.]"
    assert [type(p) for p in parts[1:5]] == [conv.ImageRef] * 4
    assert parts[-1] == "[Text of page 10 of “ten.pdf”]\nPage 10: the total is 100 euros"
    again = open_pdf(make_pdf(10), "ten.pdf", tmp_path, Limits(), image_slots=4)
    assert again.images == doc.images  # content-addressed: written once


def test_pages_asked_for_the_text_budget_and_pages_left_out(tmp_path):
    doc = open_pdf(make_pdf(10), "ten.pdf", tmp_path, Limits(), image_slots=4, pages="9-10, 2", text_budget=70)
    assert [n for n, _ in doc.images] == [9, 10, 2]
    assert [n for n, _ in doc.texts] == [1, 3, 4]  # the budget runs out inside page 4 (cut, marked)
    assert doc.texts[-1][1].endswith("…[cut]") and doc.left_out == (5, 6, 7, 8)
    assert doc.summary().endswith("not included: pages 5-8")
    no_room = open_pdf(make_pdf(3), "three.pdf", tmp_path, Limits(), image_slots=0)
    assert not no_room.images and [n for n, _ in no_room.texts] == [1, 2, 3]  # no image room left: text only
    assert parse_pages("1-3,5, 3", 9) == [1, 2, 3, 5] and parse_pages("", 9) is None
    for bad, words in [("0", "pages 1-9"), ("4-2", "pages 1-9"), ("12", "pages 1-9"), ("one", "e.g.")]:
        with pytest.raises(DocumentRejected, match=words):
            parse_pages(bad, 9)
    with pytest.raises(DocumentRejected, match="room for 4 more"):
        open_pdf(make_pdf(10), "ten.pdf", tmp_path, Limits(), image_slots=4, pages="1-5")


@pytest.mark.parametrize("data, words", [
    (b"%PDF-1.7\nnot really", "not a readable PDF"),
    (b"\x89PNG\r\n\x1a\n", "not a PDF document"),
    (b"", "not a PDF document"),
])
def test_bad_documents_are_refused_by_name(tmp_path, data, words):
    with pytest.raises(DocumentRejected, match=f"“bad.pdf” .*{words}"):
        open_pdf(data, "bad.pdf", tmp_path, Limits(), image_slots=4)


def test_a_password_a_size_over_the_cap_and_huge_pages(tmp_path):
    with pytest.raises(DocumentRejected, match="password-protected"):
        open_pdf(encrypted(make_pdf(2)), "locked.pdf", tmp_path, Limits(), image_slots=4)
    with pytest.raises(DocumentRejected, match="over the 0 MB upload limit"):
        open_pdf(make_pdf(2), "big.pdf", tmp_path, Limits(upload_bytes=1000), image_slots=4)
    # A page 5 metres wide: rendered within the pixel cap, never at its own size.
    huge = open_pdf(make_pdf(1, size=(5000, 5000)), "huge.pdf", tmp_path, Limits(pixels_per_image=200_000),
                    image_slots=1)
    width, height = Image.open(huge.images[0][1]).size
    assert width * height <= 200_000


def test_a_long_document_opens_only_the_pages_it_needs(tmp_path):
    long = make_pdf(600)
    doc = open_pdf(long, "long.pdf", tmp_path, Limits(), image_slots=2, text_budget=300)
    assert doc.page_count == 600 and len(doc.images) == 2 and len(doc.texts) < 20
    assert doc.left_out[-1] == 600 and "not included" in doc.summary()


def test_pdfium_never_runs_two_calls_at_once(tmp_path, monkeypatch):
    """Two people attaching PDFs at once: every PDFium call happens under the one lock."""
    import pypdfium2

    inside, overlaps, real = [0], [], pypdfium2.PdfDocument

    class Watched(real):
        def __init__(self, *args, **kwargs):
            overlaps.append(not documents._PDFIUM.locked())
            inside[0] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pypdfium2, "PdfDocument", Watched)
    data = [make_pdf(6), make_pdf(7)]
    errors = []

    def attach(i: int) -> None:
        try:
            for _ in range(3):
                open_pdf(data[i], f"doc{i}.pdf", Path(tmp_path) / str(i), Limits(), image_slots=3)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=attach, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and inside[0] == 6 and not any(overlaps)
