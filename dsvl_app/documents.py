"""PDFs → what the model can read: some pages as images, the text layer of others, and a line saying which.

Each page image costs 576 tokens of the context, and a message holds at most `--max-images` images, so a document
is never sent whole. The **page policy**: the pages asked for (`pages`, e.g. "2-4,7") — by default the first
pages that fit the message's image allowance — are rendered as images at the size the high-res (1024) view
wants; the text layer of the other pages follows as text, in page order, up to `TEXT_BUDGET_CHARS`; pages
beyond that are named as left out. The opening line tells the model (and the reply's reader) exactly which
pages it sees how.

Safety: pypdfium2 (PDFium, BSD/Apache) renders in this process. PDFium is not thread-safe at all — no two calls
at once in one process, even on different documents — so every call runs under one process-wide lock
(`_PDFIUM`, the one module-level object here: it mirrors the library's own process-wide state). A file is
untrusted input: its size is capped before opening, only the pages needed are loaded (a 10,000-page file costs
what its first pages cost), the render scale is capped like the image-bomb guard, and rendering stops after
`RENDER_TIME_S`. PDFium never runs a document's JavaScript or follows its links (no form environment is made).
Corrupt, password-protected and empty documents are refused with a specific message (`DocumentRejected`).
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import conversation as conv
from .settings import Limits

PDF_MAGIC = b"%PDF-"
RENDER_LONG_SIDE = 1024  # the high-res (SAM) view's size: more pixels would be thrown away by the processor
TEXT_BUDGET_CHARS = 6000  # the other pages' text, in order (~1,500 tokens)
TEXT_PAGES_MAX = 200  # pages whose text is read at most (the rest are named)
RENDER_TIME_S = 30.0
_PDFIUM = threading.Lock()  # PDFium: one call at a time in the whole process (see the module docstring)


class DocumentRejected(ValueError):
    """A document that cannot be used; str() is the message for the user (it names the document)."""


def is_pdf(data: bytes) -> bool:
    return data[:1024].lstrip().startswith(PDF_MAGIC)


@dataclass(frozen=True)
class Document:
    """A PDF made ready for the model: page images (paths), other pages' text, and what was left out."""

    name: str
    page_count: int
    images: tuple[tuple[int, str], ...]  # (page number, PNG path)
    texts: tuple[tuple[int, str], ...]  # (page number, its text layer)
    left_out: tuple[int, ...]  # pages neither seen as images nor read as text

    def summary(self) -> str:
        """Which pages the model sees how ("pages 1-3 as images; text of pages 4-9; left out: 10-40")."""
        parts = []
        if self.images:
            parts.append(f"{_ranges([n for n, _ in self.images])} as {'images' if len(self.images) > 1 else 'an image'}")
        if self.texts:
            parts.append(f"the text of {_ranges([n for n, _ in self.texts])}")
        if self.left_out:
            parts.append(f"not included: {_ranges(list(self.left_out))}")
        return f"“{self.name}”, {self.page_count} page{'s' if self.page_count != 1 else ''}: " + "; ".join(parts)

    def parts(self) -> list[conv.Part]:
        """The document as message parts: a line saying what is included, the page images, the pages' text."""
        parts: list[conv.Part] = [f"[Document {self.summary()}.]"]
        parts += [conv.ImageRef(path) for _, path in self.images]
        parts += [f"[Text of page {n} of “{self.name}”]\n{text}" for n, text in self.texts]
        return parts


def is_pdf_file(path: str) -> bool:
    """Whether the file at `path` is a PDF (by its first bytes: uploads and the store keep no reliable extension)."""
    try:
        with open(path, "rb") as handle:
            return is_pdf(handle.read(1024))
    except OSError:
        return False


def page_count(path: str) -> int | None:
    """A PDF file's number of pages (None: unreadable), for its thumbnail."""
    import pypdfium2 as pdfium

    with _PDFIUM:
        try:
            document = pdfium.PdfDocument(path)
        except pdfium.PdfiumError:
            return None
        try:
            return len(document)
        finally:
            document.close()


def expand_turns(turns: Sequence[conv.Turn], folder: Path, limits: Limits, pages: str | None = None,
                 check: Callable[[str], None] | None = None) -> tuple[list[conv.Turn], list[Document]]:
    """`turns` with each attached PDF (an ImageRef to a PDF file) replaced by its document's parts, in order, each
    given the image room its message and the conversation still have; `pages` is the newest message's choice
    (earlier ones get the default). `check(path)` vets a file's location before it is read (raises)."""
    out: list[conv.Turn] = []
    found: list[Document] = []
    before = 0  # images of the earlier user messages (pages included)
    last = max((i for i, t in enumerate(turns) if t.role == "user"), default=-1)
    for index, turn in enumerate(turns):
        pdfs = [p for p in turn.parts if isinstance(p, conv.ImageRef) and is_pdf_file(p.path)]
        in_message = sum(isinstance(p, conv.ImageRef) for p in turn.parts) - len(pdfs)
        if not pdfs:
            out.append(turn)
            before += in_message
            continue
        parts: list[conv.Part] = []
        for part in turn.parts:
            if part not in pdfs:
                parts.append(part)
                continue
            if check is not None:
                check(part.path)
            size = Path(part.path).stat().st_size
            if size > limits.upload_bytes:
                raise DocumentRejected(f"“{part.name}” is {size / 2**20:.1f} MB, over the "
                                       f"{limits.upload_bytes / 2**20:.0f} MB upload limit")
            slots = min(limits.images_per_message - in_message, limits.images_per_conversation - before - in_message)
            document = open_pdf(Path(part.path).read_bytes(), part.name, folder, limits, slots,
                                pages if index == last else None)
            in_message += len(document.images)
            found.append(document)
            parts += document.parts()
        out.append(conv.Turn(turn.role, tuple(parts)))
        before += in_message
    return out, found


def parse_pages(spec: str | None, count: int) -> list[int] | None:
    """"2-4, 7" → [2, 3, 4, 7] (1-based, in order, no repeats); None for no choice. Raises DocumentRejected."""
    if spec is None or not str(spec).strip():
        return None
    pages: list[int] = []
    for item in str(spec).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise DocumentRejected(f"pages {spec!r}: write page numbers and ranges, e.g. \"1-3, 5\"")
        first, last = int(match[1]), int(match[2] or match[1])
        if not 1 <= first <= last <= count:
            raise DocumentRejected(f"pages {spec!r}: the document has pages 1-{count}")
        pages += [n for n in range(first, last + 1) if n not in pages]
    return pages


def open_pdf(data: bytes, name: str, folder: Path, limits: Limits, image_slots: int, pages: str | None = None,
             text_budget: int = TEXT_BUDGET_CHARS) -> Document:
    """Render the chosen pages of a PDF (at most `image_slots` of them) into `folder` and read the others' text."""
    if len(data) > limits.upload_bytes:
        raise DocumentRejected(f"“{name}” is {len(data) / 2**20:.1f} MB, over the {limits.upload_bytes / 2**20:.0f} MB "
                               "upload limit")
    if not is_pdf(data):
        raise DocumentRejected(f"“{name}” is not a PDF document")
    import pypdfium2 as pdfium

    digest = hashlib.sha256(data).hexdigest()[:24]
    began = time.monotonic()
    with _PDFIUM:
        try:
            document = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                raise DocumentRejected(f"“{name}” is password-protected: remove the password and attach it again") \
                    from None
            raise DocumentRejected(f"“{name}” is not a readable PDF (damaged or not a PDF)") from None
        try:
            count = len(document)
            if count < 1:
                raise DocumentRejected(f"“{name}” has no pages")
            chosen = parse_pages(pages, count)
            if chosen is None:
                chosen = list(range(1, min(count, max(0, image_slots)) + 1))
            elif len(chosen) > image_slots:
                raise DocumentRejected(f"pages {pages!r} of “{name}” are {len(chosen)} images, and this message has "
                                       f"room for {max(0, image_slots)} more (each page is an image of 576 tokens): "
                                       "choose fewer pages")
            images = tuple((n, _render(document, n, digest, folder, limits, name, began)) for n in chosen)
            texts, left_out, used = [], [], 0
            for n in range(1, count + 1):
                if n in chosen:
                    continue
                if used >= text_budget or len(texts) >= TEXT_PAGES_MAX:
                    left_out.append(n)
                    continue
                text = _text(document, n)
                if not text:
                    continue  # (a scanned page has no text layer: nothing to read)
                if used + len(text) > text_budget:
                    text = text[: max(0, text_budget - used)].rstrip() + " …[cut]"
                used += len(text)
                texts.append((n, text))
        finally:
            document.close()
    return Document(name, count, images, tuple(texts), tuple(left_out))


def _render(document, number: int, digest: str, folder: Path, limits: Limits, name: str, began: float) -> str:
    """Page `number` as a PNG (content-addressed: the same document's page is written once)."""
    if time.monotonic() - began > RENDER_TIME_S:
        raise DocumentRejected(f"“{name}” took over {RENDER_TIME_S:.0f} s to render: choose fewer pages")
    stem = re.sub(r"[^\w.-]+", "_", Path(name).stem)[:40] or "document"
    path = Path(folder) / f"{digest}-{stem}-p{number}.png"  # (the inspector names a page by its file)
    if path.exists():
        return str(path)
    page = document[number - 1]
    try:
        width, height = page.get_size()
        if not (width > 0 and height > 0):
            raise DocumentRejected(f"page {number} of “{name}” has no size")
        scale = RENDER_LONG_SIDE / max(width, height)
        scale = min(scale, (limits.pixels_per_image / (width * height)) ** 0.5)  # the image-bomb guard
        while math.ceil(width * scale) * math.ceil(height * scale) > limits.pixels_per_image:
            scale *= 0.99  # (PDFium rounds the bitmap's size up)
        image = page.render(scale=scale, may_draw_forms=False).to_pil().convert("RGB")
    finally:
        page.close()
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    image.save(partial, format="PNG")
    partial.replace(path)
    return str(path)


def _text(document, number: int) -> str:
    page = document[number - 1]
    try:
        textpage = page.get_textpage()
        try:
            return " ".join(textpage.get_text_range().split())
        finally:
            textpage.close()
    finally:
        page.close()


def _ranges(numbers: Sequence[int]) -> str:
    """[1, 2, 3, 5] → "pages 1-3, 5"."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
    return f"page{'s' if len(numbers) > 1 else ''} {text}"
