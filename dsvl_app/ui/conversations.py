"""Saved conversations' event functions: the browser keeps each conversation's text and image hashes, the
server's store keeps the images (`saved.py`, `store.py`); switch, new, delete, import, export, feedback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from .. import openai_api, saved
from ..documents import is_pdf_file, page_count
from ..media import ImageRejected, load_image
from .views import display_saved, meters_markdown

CONTROL_KEYS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed", "top_k", "min_p")
TOP_K_MAX = 500  # the top-k slider's end (the API takes the same range)


class SavedConversations:
    """Saved conversations' event functions (mixed into ChatApp)."""

    @staticmethod
    def _generation(controls: tuple) -> dict:
        return dict(zip(CONTROL_KEYS, controls, strict=True))

    def _keep(self, chatbot: list, record: Any, generation: dict) -> dict:
        """The record with the open conversation saved as the chat shows it (created on its first message)."""
        record = saved.valid_record(record)
        messages = saved.messages_from_history(chatbot or [], self.store)
        previous = saved.find(record, record["current"])
        messages = saved.keep_names(messages, previous["messages"] if previous else [])
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
        if is_pdf_file(path):  # a document: it must open (its pages are rendered when the conversation goes on)
            if page_count(path) is None:
                raise ValueError(f"“{name}” is not a readable PDF")
            return
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

