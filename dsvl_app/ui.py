"""The Gradio UI: layout, per-session state, event wiring, and errors → gr.Warning / gr.Error.

The only module that imports gradio. The browser's chat and the stateless `/chat` API share one
code path (`ChatApp.stream`), which submits to the engine the `/v1` routes use too: one line for the
model, many replies decoded together. Per-session state lives in the Chatbot value and `gr.State`s;
the only process-wide state is the model handle.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from . import conversation as conv
from . import openai_api, ops, saved
from .documents import DocumentRejected, expand_turns, is_pdf_file, page_count
from .engine import Engine, GenerationError, GenerationParams, GenerationStats
from .grammar import answer_for, pretty
from .image_urls import ImageUrlError, ImageUrls, is_image_url
from .media import ImageRejected, check_location, display_name, load_image
from .model import ModelHandle, get_model
from .preview import ImageView, image_views
from .settings import Limits, Settings
from .store import ImageStore, default_dir

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES_DIR = ASSETS / "examples"
# Every refusal the user can fix; anything else is a bug and is logged with its traceback.
USER_ERRORS = (ImageRejected, DocumentRejected, conv.ConversationError, GenerationError)
UI_FRAME_S = 0.05  # the browser gets at most ~20 updates a second; the API gets every increment
KEEPALIVE_S = 1.0  # a reply waiting in line still yields this often, so that Stop can cancel it

CSS = """
#inspector-lowres .caption-label, #inspector-highres .caption-label { white-space: normal; }
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
OTHER_EVENTS_AT_ONCE = 4  # queued events other than replies (imports, page loads) served at once
# The generation sliders, in the order of their components (saved with a conversation, set on import).
# New ones go last: /chat takes them positionally, and older clients leave them out.
CONTROL_KEYS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed", "top_k", "min_p")
TOP_K_MAX = 500  # the slider's end (the API takes the same range)
SCHEMA_EXAMPLE = json.dumps({"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "green", "blue", "yellow", "other"]},
    "shape": {"type": "string", "enum": ["circle", "square", "triangle", "other"]}},
    "required": ["colour", "shape"]}, indent=2)


def _on_gpu(fn):
    """On a ZeroGPU Space, run `fn` with a GPU attached; elsewhere leave it as it is."""
    try:
        import spaces  # only installed on Hugging Face Spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=120)(fn)


# What the hidden `/chat` inputs tell API and MCP clients. Both are gr.JSON, so every shape a client sends
# reaches our parser (and image URLs our intake): gradio's own schemas are not valid JSON Schema for MCP
# clients — gr.JSON's is {"type": {}}, a MultimodalTextbox's has a `$ref` to a definition it cannot reach.
MESSAGE_SCHEMA = {"type": "object", "required": ["text"], "properties": {
    "text": {"type": "string"},
    "files": {"type": "array", "items": {
        "anyOf": [{"type": "string"}, {"type": "object"}],
        "description": "an image: an http(s) URL or a data: URL (base64), or from gradio_client handle_file(path)"}}}}
HISTORY_SCHEMA = {"type": "array", "items": {"type": "object"},
                  "description": 'chat messages: [{"role": "user" | "assistant", "content": ...}]'}


def _json_input(value: Any, label: str, schema: dict) -> gr.JSON:
    """A gr.JSON input that describes itself with `schema` (an instance override: a subclass of a gradio
    component would make gradio write a .pyi stub next to this module)."""
    component = gr.JSON(value=value, label=label)
    component.api_info = lambda: schema
    return component


# ---------------------------------------------------------------- pure view helpers


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


def display_user_message(message: dict, first_number: int) -> list[dict]:
    """Chatbot messages for a user message: each image as a numbered thumbnail, then the text."""
    out: list[dict] = []
    for offset, path in enumerate(message.get("files") or []):
        if is_pdf_file(path):  # a document: its name and page count (its pages are in the inspector)
            pages = page_count(path)
            label = f"{display_name(path)} · {pages} page{'s' if pages != 1 else ''}" if pages else "PDF"
            out.append({"role": "user", "content": {"path": path, "alt_text": label}})
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
            out += display_user_message({"files": [item.image_path]}, number)
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


# ---------------------------------------------------------------- the app


class ChatApp:
    """Builds the Blocks and owns the event functions; one instance per server."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.limits: Limits = settings.limits
        self.engine = engine or Engine(get_model(settings), settings)
        self.handle = self.engine.handle
        self.store = image_store(settings)
        # Only gradio's upload cache, our examples and the image store may be read (API clients could name any path).
        self.allowed_roots = allowed_roots(self.store)
        self.image_urls = image_urls(settings)
        self.export_dir = Path(tempfile.mkdtemp(prefix="dsvl-exports-"))
        self.prefetcher = self.engine.prefetcher(lambda path: self._load(path, self.limits))

    # -- the one code path for UI and API

    def _load(self, path: str, limits: Limits):
        check_location(path, self.allowed_roots)
        return load_image(path, limits)

    def params(self, max_new_tokens: Any, temperature: Any, top_p: Any, repetition_penalty: Any, seed: Any,
               top_k: Any = None, min_p: Any = None, answer_format: Any = "text",
               json_schema: Any = None) -> GenerationParams:
        answer = answer_for(answer_format, json_schema)  # (raises SchemaError naming what cannot be enforced)
        try:
            params = GenerationParams(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                repetition_penalty=float(repetition_penalty),
                seed=None if seed in (None, "") else int(seed),
                top_k=None if top_k in (None, "") else int(top_k),
                min_p=None if min_p in (None, "") else float(min_p),
                answer=answer,
            )
        except (TypeError, ValueError) as exc:
            raise GenerationError(f"Invalid generation parameter: {exc}") from None
        return params.validate(self.limits.max_new_tokens)

    @_on_gpu
    def stream(self, message: Any, history: Any, params: GenerationParams, with_views: bool = True,
               min_interval_s: float = 0.0, surface: str = "ui", pdf_pages: str | None = None) -> Iterator[Update]:
        """Submit one reply to the engine and stream it; raises USER_ERRORS with specific messages.

        `min_interval_s` coalesces increments: re-rendering the whole chat per token would cap the
        browser's stream far below the model's speed. While the reply waits in line or its prompt is
        read, an update comes every few tenths of a second (the place in line and progress change).
        `surface` (ui, chat, mcp) labels its metrics. Attached PDFs become page images and text (documents.py;
        `pdf_pages` chooses the newest message's pages); the first update says which pages in `documents`.
        """
        with self.engine.counting_refusals(surface):  # a malformed conversation (the engine counts its own refusals)
            if history is not None and not isinstance(history, list):
                raise conv.ConversationError("history must be a list of chat messages")
            turns, new = conv.conversation_turns(history, message), conv.parse_message(message)
            turns, documents = expand_turns(turns, self.image_urls.folder, self.limits, pdf_pages,
                                            check=lambda path: check_location(path, self.allowed_roots))
            if documents:
                new = turns[-1]
                self.image_urls.prune()
        reply = self.engine.submit(turns, params, new=new, load=self._load, surface=surface)
        prompt = reply.prompt
        views = []
        if with_views:
            sizes = [image.size for image in prompt.images]
            views = image_views(self.handle.processor, reply.inputs, prompt.image_names, sizes,
                                first_number=prompt.dropped_images + 1)
        text, sent, status = "", time.perf_counter(), None
        yield Update(text, prompt, reply.stats, views, [d.summary() for d in documents])
        with reply:
            for piece in reply.updates():
                text += piece or ""
                now = time.perf_counter()
                if piece is None:
                    # Nothing new to read: an update only when the place in line or the prompt's progress changed,
                    # or after KEEPALIVE_S — gradio can cancel a reply (Stop, a closed tab) only between updates.
                    stats = reply.stats
                    current = (stats.place_in_line, stats.stop_reason, stats.prefilled_tokens)
                    if current == status and now - sent < KEEPALIVE_S:
                        continue
                    status = current
                elif now - sent < min_interval_s:
                    continue
                sent = now
                yield Update(text, prompt, reply.stats)
        yield Update(text, prompt, reply.stats)

    def chat(self, message: dict, history: list, max_new_tokens: float, temperature: float, top_p: float,
             repetition_penalty: float, seed: float | None, top_k: float | None = None,
             min_p: float | None = None, answer_format: str = "text", json_schema: str = "", pdf_pages: str = "",
             request: gr.Request = None) -> Iterator[str]:
        """Ask DeepSeek-VL about one or more images (stateless: send the earlier turns in `history`).

        Images go in `message["files"]`, in the order the question refers to them (first, second, ...):
        each a base64 data: URL of a PNG, JPEG, WebP, GIF, BMP or TIFF image (an http(s) URL only where the
        server allows remote images). A reply streams as the full text so far; a refusal (unreadable image,
        too many images or tokens) says why.

        Args:
            message: {"text": the question, "files": [image URLs]}, e.g. {"text": "What colour is the second image?", "files": ["data:image/png;base64,...", "data:image/jpeg;base64,..."]}.
            history: the conversation so far as [{"role": "user" | "assistant", "content": text}, ...]; [] to start.
            max_new_tokens: the longest reply, in tokens (1 to the server's cap; 512 is plenty for a paragraph).
            temperature: 0 for the most likely (repeatable) answer; up to 2 for more varied ones.
            top_p: nucleus sampling, 0.05 to 1 (only used when temperature > 0).
            repetition_penalty: 1 for none; up to 2 to discourage repeating.
            seed: makes sampling repeatable (any non-negative integer).
            top_k: sample among the k most likely tokens, 0 (off) to 500 (only used when temperature > 0).
            min_p: drop tokens less likely than min_p times the most likely one, 0 (off) to 1 (only when temperature > 0).
            answer_format: "text" (default); "json" for a JSON object; "json_schema" for JSON matching json_schema (the reply is held to it token by token).
            json_schema: the JSON schema (as JSON text) when answer_format is "json_schema", e.g. {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}.
            pdf_pages: for a PDF in message["files"] (a data:application/pdf;base64 URL): the pages the model sees as images, e.g. "2-4" ("" = the first that fit); the other pages' text is read, and the reply's prompt says which pages it got how.

        Returns:
            The assistant's reply.
        """
        # gradio's MCP server calls this endpoint through its own client, which names itself in a header.
        surface = "mcp" if request is not None and request.headers.get("x-gradio-user") == "mcp" else "chat"
        try:
            with self.engine.counting_refusals(surface):  # refusals before the engine (it counts its own)
                params = self.params(max_new_tokens, temperature, top_p, repetition_penalty, seed, top_k, min_p,
                                     answer_format, json_schema)
                message = self._resolve_urls(message)
            for update in self.stream(message, history or [], params, with_views=False, surface=surface,
                                      pdf_pages=pdf_pages or None):
                yield update.reply  # while it waits in line, the same (empty) reply now and then
        except (*USER_ERRORS, ImageUrlError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def _resolve_urls(self, message: Any) -> dict:
        """The API message with image URLs (MCP clients send them) replaced by the files the intake reads."""
        if not isinstance(message, dict):
            raise conv.ConversationError('The message must be {"text": str, "files": [...]}')
        files = [self.image_urls.resolve_blocking(f, f"Image {n}") if is_image_url(f) else f
                 for n, f in enumerate(message.get("files") or [], 1)]
        return _file_paths({**message, "files": files})

    # -- UI event functions

    def add_user_message(self, message: Any, history: list) -> tuple:
        """Show the user's message at once, lock the input, remember what to answer."""
        message = _file_paths(message)
        if not message["text"].strip() and not message["files"]:
            gr.Warning("The message is empty: type a question or attach an image.")
            return gr.skip(), gr.skip(), None, gr.skip()
        shown = history + display_user_message(message, conv.count_images(history) + 1)
        return shown, gr.MultimodalTextbox(value=None, interactive=False), message, history

    def respond(self, message: dict | None, history_before: list, max_new_tokens, temperature, top_p,
                repetition_penalty, seed, top_k, min_p, answer_format="Text", json_schema="",
                pdf_pages="") -> Iterator[tuple]:
        """Stream the assistant's reply into the chat and the side panel; roll back on refusal."""
        if message is None:  # add_user_message refused it
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.MultimodalTextbox(interactive=True), gr.skip()
            return
        shown_user = history_before + display_user_message(message, conv.count_images(history_before) + 1)
        update = None
        try:
            with self.engine.counting_refusals("ui"):
                params = self.params(max_new_tokens, temperature, top_p, repetition_penalty, seed, top_k, min_p,
                                     answer_format, json_schema)
            documents = ""
            for i, update in enumerate(self.stream(message, history_before, params, min_interval_s=UI_FRAME_S,
                                                   pdf_pages=pdf_pages or None)):
                chat = shown_user + [{"role": "assistant", "content": update.reply or waiting_note(update.stats)}]
                if i == 0 and update.documents:  # the user is never silently answered about part of a document
                    documents = "\n\n" + "\n".join(f"**Document** {summary}" for summary in update.documents)
                meters = meters_markdown(update.prompt, update.stats, reuse_on=self.handle.reuse.enabled) + documents
                state = {"prompt": update.prompt, "stats": update.stats}
                if i == 0:
                    low, high = gallery_items(update.views, False), gallery_items(update.views, True)
                    yield chat, low, high, meters, gr.skip(), state
                    if update.prompt.notes or update.documents:
                        gr.Info(" ".join([*update.prompt.notes, *(f"Document {s}." for s in update.documents)]))
                else:
                    yield chat, gr.skip(), gr.skip(), meters, gr.skip(), state
            if params.answer is not None and update is not None and (formatted := pretty(update.reply)):
                # A complete JSON answer, shown indented (a cut one stays as written).
                chat = shown_user + [{"role": "assistant", "content": f"```json\n{formatted}\n```"}]
                yield chat, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except USER_ERRORS as exc:
            gr.Warning(str(exc))
            if update is not None and update.reply:
                # Keep what was already generated (e.g. a stall after some tokens) and say why it ended.
                meters = meters_markdown(update.prompt, update.stats, reuse_on=self.handle.reuse.enabled)
                yield gr.skip(), gr.skip(), gr.skip(), meters, gr.skip(), gr.skip()
            else:
                # Nothing answered: the conversation goes back to how it was and the message back into the box.
                yield history_before, gr.skip(), gr.skip(), gr.skip(), gr.MultimodalTextbox(value=message), gr.skip()

    @staticmethod
    def unlock_input() -> tuple:
        return gr.MultimodalTextbox(interactive=True), gr.Button(visible=False)

    @staticmethod
    def retry(history: list) -> tuple:
        """Answer the last user message again."""
        before, message = conv.split_last_exchange(history)
        if not message["text"] and not message["files"]:
            return gr.skip(), None, gr.skip()
        return before + display_user_message(message, conv.count_images(before) + 1), message, before

    @staticmethod
    def undo(history: list) -> tuple:
        """Remove the last exchange and put its message back into the input box."""
        before, message = conv.split_last_exchange(history)
        return before, gr.MultimodalTextbox(value=message, interactive=True)

    @staticmethod
    def edit(history: list, edit: gr.EditData) -> tuple:
        """Replace a user message's text (its images stay) and answer again from there."""
        index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
        try:
            before, message = conv.edit_user_message(history, int(index), str(edit.value))
        except conv.ConversationError as exc:
            gr.Warning(str(exc))
            return history, None, history
        return before + display_user_message(message, conv.count_images(before) + 1), message, before

    def stopped(self, state: dict | None) -> str:
        """Meters after the Stop button: the last figures, marked as stopped."""
        state = state or {}
        return meters_markdown(state.get("prompt"), state.get("stats"), stop_reason="stopped (by you)",
                               reuse_on=self.handle.reuse.enabled)

    def prefetch(self, message: Any) -> None:
        """Attached images are encoded in the background while the model is idle (ready at Enter)."""
        self.prefetcher.submit(_file_paths(message)["files"])

    @staticmethod
    def cleared() -> tuple:
        return [], [], [], meters_markdown(None, None), gr.MultimodalTextbox(value=None, interactive=True), None

    # -- saved conversations (the browser keeps text and image hashes; the store keeps the images)

    @staticmethod
    def _generation(controls: tuple) -> dict:
        return dict(zip(CONTROL_KEYS, controls, strict=True))

    def _keep(self, chatbot: list, record: Any, generation: dict) -> dict:
        """The record with the open conversation saved as the chat shows it (created on its first message)."""
        record = saved.valid_record(record)
        messages = saved.messages_from_history(chatbot or [], self.store)
        record, current = saved.upsert(record, record["current"], messages)
        entry = saved.find(record, current)
        if entry is not None:
            entry["generation"] = generation
        return record

    def _list(self, record: dict) -> dict:
        choices = [(saved.list_label(c), c["id"]) for c in record["conversations"]]
        return gr.Radio(choices=choices, value=record["current"])

    def _export(self, record: dict) -> dict:
        """The Export button's file: the open conversation, written now so that one click downloads it."""
        entry = saved.find(record, record["current"])
        if entry is None:
            return gr.DownloadButton(value=None, interactive=False)
        path = saved.write_export(entry, self.store, openai_api.model_id_of(self.handle), self.export_dir)
        return gr.DownloadButton(value=str(path), interactive=True)

    def _open(self, record: dict) -> tuple:
        """What the chat shows for the record's open conversation: (chatbot, record, list, export)."""
        entry = saved.find(record, record["current"])
        chat = display_saved(saved.to_display(entry["messages"], self.store)) if entry else []
        return chat, record, self._list(record), self._export(record)

    def restore(self, record: Any) -> tuple:
        """On page load: the conversation that was open, from the browser's record."""
        return self._open(saved.valid_record(record))

    def save(self, chatbot: list, record: Any, *controls: Any) -> tuple:
        """After every change: the open conversation into the record; (record, list, export)."""
        record = self._keep(chatbot, record, self._generation(controls))
        return record, self._list(record), self._export(record)

    def switch(self, chosen: str | None, chatbot: list, record: Any, *controls: Any) -> tuple:
        """Open another conversation (the one open is saved first)."""
        record = self._keep(chatbot, record, self._generation(controls))
        if saved.find(record, chosen) is None:  # deleted in another tab meanwhile: show the list as it is
            return gr.skip(), record, self._list(record), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self._open({**record, "current": chosen}) + self._reset_panel()

    def new_chat(self, chatbot: list, record: Any, *controls: Any) -> tuple:
        record = self._keep(chatbot, record, self._generation(controls))
        return self._open({**record, "current": None}) + self._reset_panel()

    def delete_chat(self, record: Any) -> tuple:
        """Delete the open conversation; the most recent other one opens."""
        record = saved.valid_record(record)
        return self._open(saved.remove(record, record["current"])) + self._reset_panel()

    def delete_all(self, record: Any, confirmed: str) -> tuple:
        if confirmed != "yes":
            return (gr.skip(),) * 7
        return self._open(saved.empty_record()) + self._reset_panel()

    def import_chat(self, upload: Any, chatbot: list, record: Any, *controls: Any) -> tuple:
        """A conversation file → a new conversation, opened; a refusal leaves the open one as it was."""
        path = upload if isinstance(upload, str) else getattr(upload, "name", None) or getattr(upload, "path", None)
        limits = self.limits
        try:
            data = Path(path).read_bytes()
            messages, generation, title = saved.parse_export(
                data, max_bytes=limits.images_per_conversation * limits.upload_bytes * 4 // 3 + 2**20,
                max_images=limits.images_per_conversation, store=self.store, check_image=self._check_imported)
        except (saved.ImportRefused, OSError) as exc:
            gr.Warning(f"Not imported: {exc}")
            return (gr.skip(),) * (7 + len(controls))
        record = self._keep(chatbot, record, self._generation(controls))
        record, current = saved.upsert({**record, "current": None}, None, messages)
        saved.find(record, current)["generation"] = generation
        gr.Info(f"Imported “{title}” as a new conversation.")
        return self._open(record) + self._reset_panel() + self._controls(generation, controls)

    def _check_imported(self, path: str, name: str) -> None:
        try:
            load_image(path, self.limits)
        except ImageRejected as exc:
            raise ValueError(f"“{name}” {exc.reason}") from None

    def _controls(self, generation: dict, current: tuple) -> tuple:
        """The sliders set from an imported file's settings, within this server's limits."""
        bounds = ((1, self.limits.max_new_tokens), (0.0, 2.0), (0.05, 1.0), (0.5, 2.0), (0, 2**63 - 1), (0, TOP_K_MAX),
                  (0.0, 1.0))
        values = []
        for key, (low, high), now in zip(CONTROL_KEYS, bounds, current, strict=True):
            value = generation.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
            values.append(value if ok else now)
        return tuple(values)

    @staticmethod
    def _reset_panel() -> tuple:
        return [], [], meters_markdown(None, None)

    def feedback(self, chatbot: list, like: gr.LikeData) -> None:
        """Like/dislike: one JSON line with the reply and the whole conversation (images by hash)."""
        index = like.index[0] if isinstance(like.index, (list, tuple)) else like.index
        saved.record_feedback(Path(self.settings.feedback_file), like.liked, index, like.value,
                              openai_api.model_id_of(self.handle), saved.messages_from_history(chatbot or [], self.store))

    # -- layout

    def _render_chat_column(self) -> None:
        self.chatbot = gr.Chatbot(
            elem_id="chatbot",
            label="Conversation",
            height=560,
            editable="user",
            # One bubble per message: gradio 6.31's edit breaks on a bubble that mixes images and text.
            group_consecutive_messages=False,
            buttons=["copy", "copy_all"],
            latex_delimiters=[
                {"left": "$$", "right": "$$", "display": True},
                {"left": "$", "right": "$", "display": False},
                {"left": "\\(", "right": "\\)", "display": False},
                {"left": "\\[", "right": "\\]", "display": True},
            ],
            sanitize_html=True,
            render_markdown=True,
            placeholder="**Attach one or more images and ask about them.** Images are numbered in the order the "
            "model sees them (Image 1, Image 2, …).",
        )
        self.chat_input = gr.MultimodalTextbox(
            elem_id="chat-input",
            file_count="multiple",
            file_types=["image", ".pdf"],
            sources=["upload"],
            placeholder="Ask about your images… (Enter to send, Shift+Enter for a new line; drop or paste images)",
            show_label=False,
            submit_btn=True,
            max_plain_text_length=20_000,
        )
        with gr.Row():
            self.stop_btn = gr.Button("⏹ Stop", elem_id="stop", variant="stop", size="sm", visible=False)
            self.clear_btn = gr.Button("🗑 Clear", elem_id="clear", size="sm")
        # Questions the bundled tiny checkpoint was trained on (its colour, shape and first/second answers
        # are right; its counts about nine times in ten (three_shapes.png: "three") — as its banner says);
        # real weights answer them all.
        examples = [
            {"text": "What colour is the shape?", "files": [str(EXAMPLES_DIR / "red_circle.png")]},
            {"text": "What shape is it?", "files": [str(EXAMPLES_DIR / "green_triangle.png")]},
            {"text": "How many shapes are there?", "files": [str(EXAMPLES_DIR / "three_shapes.png")]},
            {"text": "What colour is the second image?",
             "files": [str(EXAMPLES_DIR / "blue_square.png"), str(EXAMPLES_DIR / "yellow_circle.png")]},
        ]
        gr.Examples(examples=examples, inputs=[self.chat_input], label="Examples", examples_per_page=6)

    def _render_conversations(self) -> None:
        self.new_btn = gr.Button("+ New chat", elem_id="new-chat", variant="primary", size="sm")
        self.chat_list = gr.Radio(choices=[], label="Saved conversations", elem_id="chat-list",
                                  info="Kept in this browser (the images on the server).")
        with gr.Row():
            self.export_btn = gr.DownloadButton("⬇ Export", elem_id="export-chat", size="sm", interactive=False)
            self.import_btn = gr.UploadButton("⬆ Import", elem_id="import-chat", size="sm", file_types=[".json"],
                                              file_count="single")
        with gr.Row():
            self.delete_btn = gr.Button("Delete", elem_id="delete-chat", size="sm")
            self.delete_all_btn = gr.Button("Delete all", elem_id="delete-all-chats", size="sm", variant="stop")

    def _render_side_panel(self) -> None:
        self.banner = gr.Markdown(banner_markdown(self.handle, self.engine), elem_id="model-banner")
        with gr.Accordion("Generation", open=True):
            cap = self.limits.max_new_tokens
            self.max_new_tokens = gr.Slider(1, cap, value=min(512, cap), step=1, label="Max new tokens",
                                            elem_id="max-new-tokens")
            self.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                         elem_id="temperature")
            self.top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", elem_id="top-p")
            self.repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Repetition penalty",
                                                elem_id="repetition-penalty")
            self.seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (for sampling)", elem_id="seed")
            # What other servers offer too (Open WebUI's Advanced Params); the checkpoint's top-k unless changed.
            top_k = min(self.engine.sampling_defaults["top_k"], TOP_K_MAX)
            self.top_k = gr.Slider(0, TOP_K_MAX, value=top_k, step=1, label="Top-k (0 = off)", elem_id="top-k")
            self.min_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Min-p (0 = off)", elem_id="min-p")
            # Structured answers: the reply held to JSON (or a schema) token by token, shown indented.
            self.answer_format = gr.Radio(["Text", "JSON", "JSON schema"], value="Text", label="Answer format",
                                          elem_id="answer-format")
            self.json_schema = gr.Code(language="json", label="JSON schema", elem_id="json-schema", visible=False,
                                       interactive=True, value=SCHEMA_EXAMPLE)
            # An attached PDF: which pages the model sees as images (the others' text is read).
            self.pdf_pages = gr.Textbox(label="PDF pages seen as images", placeholder="e.g. 2-4 (empty: the first "
                                        "that fit)", elem_id="pdf-pages", max_lines=1)
        self.meters = gr.Markdown(meters_markdown(None, None), elem_id="meters")
        with gr.Accordion("Inspector: what the model sees", open=True):
            self.inspector_low = gr.Gallery(label="Low-res view, 384×384 (SigLIP)", elem_id="inspector-lowres",
                                            columns=3, height=300, object_fit="contain", show_label=True)
            self.inspector_high = gr.Gallery(label="High-res view, 1024×1024 (SAM)", elem_id="inspector-highres",
                                             columns=3, height=300, object_fit="contain", show_label=True,
                                             visible=self.handle.has_high_res)

    def _render_api(self) -> None:
        # Hidden components behind the public `/chat` endpoint: history is JSON so that every shape a client
        # sends (plain strings, {"path": ...}, typed parts) reaches our parser instead of a schema error.
        with gr.Group(visible=False):
            self.api_message = _json_input({"text": "", "files": []}, "message", MESSAGE_SCHEMA)
            self.api_history = _json_input([], "history", HISTORY_SCHEMA)
            self.api_answer_format = gr.Textbox(value="text", label="answer_format")
            self.api_json_schema = gr.Textbox(value="", label="json_schema")
            self.api_pdf_pages = gr.Textbox(value="", label="pdf_pages")
            self.api_reply = gr.Textbox(label="reply")
            self.api_button = gr.Button("chat")

    def _setup_events(self, demo: gr.Blocks) -> None:
        controls = [self.max_new_tokens, self.temperature, self.top_p, self.repetition_penalty, self.seed, self.top_k,
                    self.min_p]
        private: dict[str, Any] = {"api_visibility": "private"}
        answer = [self.answer_format, self.json_schema, self.pdf_pages]  # per reply, not saved with the conversation
        respond = {
            "fn": self.respond,
            "inputs": [self.pending, self.history_before, *controls, *answer],
            "outputs": [self.chatbot, self.inspector_low, self.inspector_high, self.meters, self.chat_input,
                        self.last_meters],
            # UI and /chat share one limit, high enough that every reply reaches the engine, whose one line
            # (shared with /v1) decides who is answered: --batch at once, the rest waiting with their place shown.
            "concurrency_id": "generate",
            "concurrency_limit": self.concurrency_limit,
            "show_progress": "minimal",
            **private,
        }
        unlock = {"fn": self.unlock_input, "outputs": [self.chat_input, self.stop_btn], "queue": False, **private}
        # Stop is shown only while a reply runs.
        show_stop = {"fn": lambda: gr.Button(visible=True), "outputs": [self.stop_btn], "queue": False, **private}
        # Every change is saved in the browser as it happens (and the Export file rewritten).
        save = {"fn": self.save, "inputs": [self.chatbot, self.saved, *controls],
                "outputs": [self.saved, self.chat_list, self.export_btn], "queue": False, **private}

        submit = self.chat_input.submit(
            self.add_user_message, [self.chat_input, self.chatbot],
            [self.chatbot, self.chat_input, self.pending, self.history_before], queue=False, **private,
        ).then(**show_stop).then(**respond)
        submit.then(**save).then(**unlock)

        retry = self.chatbot.retry(
            self.retry, [self.chatbot], [self.chatbot, self.pending, self.history_before], queue=False, **private
        ).then(**show_stop).then(**respond)
        retry.then(**save).then(**unlock)

        edit = self.chatbot.edit(
            self.edit, [self.chatbot], [self.chatbot, self.pending, self.history_before], queue=False, **private
        ).then(**show_stop).then(**respond)
        edit.then(**save).then(**unlock)
        replies = [submit, retry, edit]

        # Encode on attach: the handler only queues the images (a background thread does the work when the
        # model is idle), so it answers at once; it also runs on typing, where it finds nothing new.
        self.chat_input.change(self.prefetch, [self.chat_input], None, queue=False, show_progress="hidden",
                               trigger_mode="always_last", **private)

        self.chatbot.undo(self.undo, [self.chatbot], [self.chatbot, self.chat_input], queue=False,
                          **private).then(**save)

        # Cancelling closes the reply generator; its cleanup sets the stop event the generate thread watches.
        self.stop_btn.click(None, None, None, cancels=replies, **private).then(
            self.stopped, [self.last_meters], [self.meters], queue=False, **private
        ).then(**save).then(**unlock)

        clear_outputs = [self.chatbot, self.inspector_low, self.inspector_high, self.meters, self.chat_input,
                         self.last_meters]
        self.clear_btn.click(self.cleared, None, clear_outputs, cancels=replies, queue=False,
                             **private).then(**save).then(**unlock)
        self.chatbot.clear(self.cleared, None, clear_outputs, cancels=replies, queue=False,
                           **private).then(**save).then(**unlock)

        # Saved conversations: switching, a new chat, deleting and importing first stop a running reply.
        opened = [self.chatbot, self.saved, self.chat_list, self.export_btn, self.inspector_low, self.inspector_high,
                  self.meters]
        conversation = {"outputs": opened, "cancels": replies, "queue": False, **private}
        self.chat_list.input(self.switch, [self.chat_list, self.chatbot, self.saved, *controls],
                             **conversation).then(**unlock)
        self.new_btn.click(self.new_chat, [self.chatbot, self.saved, *controls], **conversation).then(**unlock)
        self.delete_btn.click(self.delete_chat, [self.saved], **conversation).then(**unlock)
        self.delete_all_btn.click(
            self.delete_all, [self.saved, self.confirm], **conversation,
            js="(record) => [record, confirm('Delete all saved conversations in this browser?') ? 'yes' : 'no']",
        ).then(**unlock)
        # Queued (its own line, not the model's): only queued events can show the refusal's toast.
        self.import_btn.upload(self.import_chat, [self.import_btn, self.chatbot, self.saved, *controls],
                               **{**conversation, "outputs": opened + controls, "queue": True}).then(**unlock)
        if self.settings.feedback_file:  # like/dislike buttons appear only with a listener
            self.chatbot.like(self.feedback, [self.chatbot], None, queue=False, **private)

        self.answer_format.change(lambda choice: gr.Code(visible=choice == "JSON schema"), [self.answer_format],
                                  [self.json_schema], queue=False, **private)

        # A reload (or a restart) brings back the conversation that was open, with its images.
        demo.load(self.restore, [self.saved], [self.chatbot, self.saved, self.chat_list, self.export_btn], **private)

        self.api_button.click(
            self.chat,
            [self.api_message, self.api_history, *controls, self.api_answer_format, self.api_json_schema,
             self.api_pdf_pages],
            [self.api_reply],
            api_name="chat",  # its docstring describes it on the API page and to MCP clients
            concurrency_id="generate",
            concurrency_limit=self.concurrency_limit,
        )

    @property
    def concurrency_limit(self) -> int:
        return self.engine.batch + self.settings.queue_size

    def build(self) -> gr.Blocks:
        """The whole UI."""
        with gr.Blocks(title="dsvl-chat — chat with DeepSeek-VL about images", fill_height=True) as demo:
            self.pending = gr.State(None)  # the message being answered
            self.history_before = gr.State([])  # the chat before it (for rollback on refusal)
            self.last_meters = gr.State(None)
            # Saved conversations: a fixed key and secret, so that they survive a reload and a server restart.
            self.saved = gr.BrowserState(saved.empty_record(), storage_key="dsvl-chat-conversations",
                                         secret=self.settings.state_secret or self.store.secret())
            self.confirm = gr.Textbox(visible=False)  # "yes" when the browser's confirm() dialog was accepted
            gr.Markdown("## dsvl-chat — chat with DeepSeek-VL about images")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=220):
                    self._render_conversations()
                with gr.Column(scale=3):
                    self._render_chat_column()
                with gr.Column(scale=2, min_width=320):
                    self._render_side_panel()
            self._render_api()
            self._setup_events(demo)
        return demo


def build_demo(settings: Settings, engine: Engine | None = None) -> gr.Blocks:
    """The queued Blocks app for these settings (without `engine`, the model is loaded here, once)."""
    demo = ChatApp(settings, engine).build()
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=OTHER_EVENTS_AT_ONCE)
    return demo


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


def launch_kwargs(settings: Settings, engine: Engine) -> dict[str, Any]:
    """Arguments for demo.launch(): bind address, share, auth, upload cap, allowed files, theme, threads,
    and the OpenAI-compatible /v1 routes, /metrics and /health over the same engine on the same server."""
    api = openai_api.Api(engine, settings, image_urls(settings))
    return {
        # A reply waiting in line or streaming holds one of gradio's worker threads; leave room for the rest.
        "max_threads": engine.batch + settings.queue_size + 16,
        # Before gradio's own routes: /v1, and /metrics and /health for operators.
        "app_kwargs": {"routes": openai_api.router(api).routes + ops.router(engine, settings).routes},
        "mcp_server": settings.mcp,
        "server_name": settings.server_name,
        "server_port": settings.port,
        "share": settings.share,
        "auth": settings.auth,
        "max_file_size": settings.limits.upload_bytes,
        # The store's files are named by the hash of their content: served only to who knows it.
        "allowed_paths": [str(EXAMPLES_DIR), str(image_store(settings).images)],
        "js": JS,
        "css": CSS,
        "theme": gr.themes.Soft(),
        "footer_links": ["api", "gradio"],
    }


def share_warning(settings: Settings) -> str | None:
    """The loud warning for a public link without a password."""
    if settings.share and not settings.auth:
        return (
            "\n" + "!" * 78 + "\n"
            "!! WARNING: --share creates a PUBLIC link (valid for a week) and no --auth is set:\n"
            "!! anyone with the link can use this app and your GPU. Add --auth USER:PASSWORD.\n" + "!" * 78
        )
    return None
