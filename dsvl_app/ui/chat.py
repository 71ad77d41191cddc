"""The chat flow — the one code path for the browser's chat and the stateless `/chat` API (and MCP): parameters
checked, PDFs expanded, the reply submitted to the engine and streamed, refusals rolled back; retry, undo, edit,
Stop and Clear.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from .. import conversation as conv
from ..documents import DocumentRejected, expand_turns
from ..engine import Engine, GenerationError, GenerationParams
from ..grammar import answer_for, pretty
from ..image_urls import ImageUrlError, ImageUrls, is_image_url
from ..media import ImageRejected, check_location, load_image
from ..model import ModelHandle
from ..preview import image_views
from ..settings import Limits
from .views import Update, _file_paths, display_user_message, gallery_items, meters_markdown, waiting_note

USER_ERRORS = (ImageRejected, DocumentRejected, conv.ConversationError, GenerationError)
UI_FRAME_S = 0.05  # the browser gets at most ~20 updates a second; the API gets every increment
KEEPALIVE_S = 1.0  # a reply waiting in line still yields this often, so that Stop can cancel it


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

class ChatFlow:
    """The chat's event functions (mixed into ChatApp, which sets these up)."""

    limits: Limits
    engine: Engine
    handle: ModelHandle
    allowed_roots: list[str]  # the only folders a request may name
    image_urls: ImageUrls  # image URLs and rendered PDF pages → files
    prefetcher: Any  # encodes attached images while the model is idle

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

