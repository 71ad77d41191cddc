"""What the UI shows, as pure functions: the meters, the banner, the inspector's captions, the chat's
thumbnails; and the page's CSS and JS. No events, no state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from .. import conversation as conv
from .. import saved
from ..documents import is_pdf_file, page_count
from ..engine import Engine, GenerationStats
from ..media import display_name
from ..model import ModelHandle
from ..preview import ImageView

CSS = """
/* The inspector shows what the model sees: each view whole, its caption below it (not over it). */
#inspector-lowres .thumbnail-item, #inspector-highres .thumbnail-item { display: flex; flex-direction: column;
  height: auto; aspect-ratio: auto; overflow: visible; }
#inspector-lowres .thumbnail-item img, #inspector-highres .thumbnail-item img { aspect-ratio: 1 / 1; height: auto;
  width: 100%; object-fit: contain; }
#inspector-lowres .grid-wrap, #inspector-highres .grid-wrap { height: auto; min-height: 0; max-height: none; }
#inspector-lowres .grid-container, #inspector-highres .grid-container { padding-top: 36px; }
#inspector-lowres .caption-label, #inspector-highres .caption-label { position: static; white-space: normal;
  max-width: 100%; transform: none; margin: 4px 0 0; padding: 2px 4px; background: transparent; box-shadow: none;
  border: none; font-size: 0.8em; line-height: 1.3; }
#meters table { font-size: 0.9em; }
#chat-list { max-height: 420px; overflow-y: auto; }
/* Images in the chat as compact thumbnails (a click opens them full screen, see JS), numbered "Image N". */
#chatbot [data-testid="user"]:has(.image-container) { width: auto; max-width: 220px; }
#chatbot [data-testid="user"] .image-container { width: auto; height: auto; }
#chatbot [data-testid="user"] .image-container img { max-height: 96px; max-width: 200px; width: auto; object-fit: contain;
  cursor: zoom-in; }
#chatbot [data-testid="user"] :fullscreen img, #chatbot [data-testid="user"] img:fullscreen {
  max-height: 100vh; max-width: 100vw; height: 100vh; cursor: auto; }
#chat-list label { width: 100%; }
"""
# A click on a chat thumbnail opens it full screen (gr.Image's own fullscreen button, made the whole picture).
JS = """
() => {
  document.addEventListener("click", (event) => {
    const image = event.target.closest("#chatbot .image-container img, #chatbot [data-testid='image'] img");
    if (!image) return;
    const frame = image.closest("[data-testid='image'], .image-container")?.parentElement;
    frame?.querySelector("button[aria-label='Fullscreen'], button[title='Fullscreen']")?.click();
  });
}
"""
THUMBNAIL_PX = 96


@dataclass
class Update:
    """One step of a reply: the text so far and what the side panel shows."""

    reply: str
    prompt: conv.Prompt
    stats: GenerationStats | None = None
    views: list[ImageView] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)  # which pages of each PDF the model sees how


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def waiting_note(stats: GenerationStats | None) -> str:
    """What the reply bubble says before the first token: the place in line, or how far the prompt is read."""
    if stats is None:
        return ""
    if stats.place_in_line is not None:
        return (f"*⏳ Waiting for the model: {ordinal(stats.place_in_line)} in line. Other people's replies are "
                "being written; yours starts as soon as there is room.*")
    if stats.stop_reason == "prefilling":
        share = stats.prefilled_tokens / max(stats.prompt_tokens, 1)
        return f"*⏳ Reading your message and images… ({share:.0%} of {stats.prompt_tokens:,} prompt tokens)*"
    return ""


def banner_markdown(handle: ModelHandle, engine: Engine | None = None) -> str:
    """Which weights run, where, in which dtype — and whether the offline fallback engaged."""
    what = f"**Model:** {handle.label}"
    if handle.is_tiny:
        what += (" — a tiny demo checkpoint for offline use and tests, *not* DeepSeek-VL. It only knows simple "
                 "shapes: it names a shape's colour and kind and the colour of the first/second image reliably; "
                 "its counts of 1-4 shapes are right about nine times in ten")
    dtype = str(handle.dtype).removeprefix("torch.") + (f" ({handle.dtype_reason})" if handle.dtype_reason else "")
    lines = [what, f"**Device:** {handle.device} · **dtype:** {dtype}"
             + (f" · **weights:** {handle.quantized}" if handle.quantized else ""),
             f"**Reuse across turns:** {handle.describe_cache()}"]
    if engine is not None:
        lines.append(f"**Serving:** {engine.describe()}")
    if not handle.has_high_res:
        lines.append("This model family uses the low-res (384) view only.")
    if handle.offline_fallback:
        lines.append(f"⚠️ **Offline fallback:** {handle.fallback_reason}.")
    return "\n\n".join(lines)


def reuse_meter(stats: GenerationStats, reuse_on: bool) -> str:
    """How much of this prompt earlier turns had already computed."""
    if not reuse_on:
        return "off"
    images = f"{stats.images_reused} of {stats.images} image(s) not re-encoded" if stats.images else "no images"
    return f"{stats.reused_tokens:,} of {stats.prompt_tokens:,} prompt tokens · {images}"


def meters_markdown(prompt: conv.Prompt | None, stats: GenerationStats | None, stop_reason: str | None = None,
                    reuse_on: bool = True) -> str:
    """Prompt tokens against the context, time to first token, tokens/s, stop reason, dropped turns."""
    if prompt is None:
        return "No reply yet."
    images = len(prompt.images)
    used = prompt.prompt_tokens / max(prompt.context_tokens, 1)
    rows = [
        ("Prompt tokens", f"{prompt.prompt_tokens:,} / {prompt.context_tokens:,} ({used:.0%}) — {images} image(s) × {prompt.image_tokens}"),
        ("Turns dropped by the budget", f"{prompt.dropped_turns} ({prompt.dropped_images} image(s))"),
    ]
    if stats is not None:
        ttft = "—" if stats.time_to_first_token_s is None else f"{stats.time_to_first_token_s:.2f} s"
        if stats.time_to_first_token_s is not None and stats.queued_s >= 0.05:
            ttft += f" ({stats.queued_s:.2f} s of it in line)"
        speed = "—" if stats.tokens_per_s is None else f"{stats.tokens_per_s:.1f}"
        if stats.place_in_line is not None:
            rows.append(("Place in line", ordinal(stats.place_in_line)))
        rows += [
            ("Reused from earlier turns", reuse_meter(stats, reuse_on)),
            ("Time to first token", ttft),
            ("Tokens/s", speed),
            ("New tokens", str(stats.new_tokens)),
            ("Stop reason", stop_reason or stats.stop_reason),
        ]
        if stats.replica:
            rows.append(("Replica", stats.replica))
    return "| Meter | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def gallery_items(views: list[ImageView], high_res: bool) -> list[tuple[Any, str]]:
    """(image, caption) pairs for one inspector gallery."""
    items = []
    for view in views:
        image = view.high_res if high_res else view.low_res
        if image is not None:
            items.append((image, f"{view.caption} → {image.width}×{image.height}"))
    return items


def display_user_message(message: dict, first_number: int, name: str | None = None) -> list[dict]:
    """Chatbot messages for a user message: each image as a numbered thumbnail, a PDF as the document with its
    page count (its pages are in the inspector), then the text. `name`: a stored file's original name."""
    out: list[dict] = []
    for offset, path in enumerate(message.get("files") or []):
        if is_pdf_file(path):
            pages = page_count(path)
            title = name or display_name(path)
            label = f"{title} · {pages} page{'s' if pages != 1 else ''}" if pages else title
            out.append({"role": "user", "content": {"file": {"path": path, "orig_name": label,
                                                             "mime_type": "application/pdf"}, "alt_text": label}})
            continue
        label = f"Image {first_number + offset}"
        image = gr.Image(value=path, label=label, show_label=True, type="filepath", height=THUMBNAIL_PX,
                         buttons=["fullscreen"], interactive=False, elem_classes=["chat-thumbnail"])
        out.append({"role": "user", "content": image})
    if (message.get("text") or "").strip():
        out.append({"role": "user", "content": message["text"]})
    return out


def display_saved(shown: list[saved.Shown]) -> list[dict]:
    """Chatbot messages for a saved conversation: images numbered in order; a lost image as a note the
    model does not see (its title marks it as decoration)."""
    out: list[dict] = []
    number = 1
    for item in shown:
        if item.image_path:
            out += display_user_message({"files": [item.image_path]}, number, item.name)
            number += 1
        elif item.missing:
            note = (f"*{item.name} is no longer stored on this server (the image store is full or was cleared); "
                    "the conversation goes on without it.*")
            out.append({"role": "user", "content": note, "metadata": {"title": f"🖼️ Image {number} unavailable"}})
            number += 1
        else:
            out.append({"role": item.role, "content": item.text or ""})
    return out


def _file_paths(message: Any) -> dict:
    """The MultimodalTextbox value with plain path strings for files."""
    message = message or {}
    files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
             for f in message.get("files") or []]
    return {"text": message.get("text") or "", "files": [f for f in files if f]}


