"""Saved conversations: what the browser keeps, and the export file — pure conversions and checks.

The browser's record (`gr.BrowserState`, so it survives a reload) holds every conversation as text and
image *hashes*; the images themselves live in the server's `ImageStore`. The export file is one JSON
document with the images embedded (base64), the model id and the generation settings, and a format
version:

    {"format": "dsvl-chat conversation", "version": 1, "exported_at": "2026-12-01T10:00:00Z",
     "title": "...", "model": "deepseek-community/deepseek-vl-7b-chat",
     "generation": {"max_new_tokens": 512, "temperature": 0.0, "top_p": 0.95, "repetition_penalty": 1.0, "seed": 0,
                    "top_k": 50, "min_p": 0.0},
     "messages": [
       {"role": "user", "content": [{"type": "image", "name": "cat.png", "media_type": "image/png", "data": "<base64>"},
                                    {"type": "text", "text": "What is this?"}]},
       {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

No gradio. Images are put in and read from the store given; their pixels are checked by the caller's
intake (`check_image`), the same as an upload's.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import conversation as conv
from .store import ImageStore, StoreError

FORMAT = "dsvl-chat conversation"
VERSION = 1
MAX_CONVERSATIONS = 200  # the browser keeps this many (the oldest go first); text and hashes only
TITLE_CHARS = 48
MEDIA_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"BM": "image/bmp",
               b"RIFF": "image/webp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff",
               b"%PDF-": "application/pdf"}  # (a PDF is kept like an image: content-addressed, exported inline)


class ImportRefused(ValueError):
    """A conversation file that cannot be imported; str() is the reason for the user."""


# ---------------------------------------------------------------- the browser's record


def empty_record() -> dict:
    return {"version": VERSION, "current": None, "conversations": []}


def valid_record(record: Any) -> dict:
    """The browser's record, or an empty one when it is missing or not ours (e.g. written by an older app)."""
    if not isinstance(record, dict) or record.get("version") != VERSION or not isinstance(record.get("conversations"), list):
        return empty_record()
    conversations = [c for c in record["conversations"] if isinstance(c, dict) and isinstance(c.get("messages"), list)
                     and isinstance(c.get("id"), str)]
    current = record.get("current") if any(c["id"] == record.get("current") for c in conversations) else None
    return {"version": VERSION, "current": current, "conversations": conversations}


def messages_from_history(history: Iterable[Any], store: ImageStore) -> list[dict]:
    """A chat history (any shape gradio gives) → saved messages; images go into the store, by hash."""
    saved: list[dict] = []
    for turn in conv.parse_history(history):
        for part in turn.parts:
            if isinstance(part, conv.ImageRef):
                saved.append({"role": turn.role, "image": store.put_file(part.path), "name": part.name})
            else:
                saved.append({"role": turn.role, "text": part})
    return saved


def keep_names(messages: list[dict], previous: Sequence[dict]) -> list[dict]:
    """`messages` with each stored file's original name kept from the conversation's previous save (a reopened
    conversation's files live in the store under their hash, which is all its history shows)."""
    names = {m["image"]: m.get("name") for m in previous if m.get("image") and m.get("name") != m.get("image")}
    return [{**m, "name": names[m["image"]]} if m.get("image") and m.get("name") == m["image"] and names.get(m["image"])
            else m for m in messages]


def title_of(messages: Sequence[dict]) -> str:
    for message in messages:
        if message["role"] == "user" and message.get("text", "").strip():
            text = " ".join(message["text"].split())
            return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"
    names = [m["name"] for m in messages if m.get("image")]
    return f"Image: {names[0]}" if names else "New chat"


def upsert(record: dict, conversation_id: str | None, messages: list[dict], now: float | None = None) -> tuple[dict, str | None]:
    """The record with this conversation's messages saved (created when new, dropped when emptied)."""
    record = valid_record(record)
    now = time.time() if now is None else now
    others = [c for c in record["conversations"] if c["id"] != conversation_id]
    if not messages:
        return {**record, "current": None, "conversations": others}, None
    old = next((c for c in record["conversations"] if c["id"] == conversation_id), None)
    conversation_id = conversation_id or uuid.uuid4().hex
    entry = {"id": conversation_id, "title": title_of(messages), "created": old["created"] if old else now,
             "updated": now, "messages": messages}
    conversations = sorted([entry, *others], key=lambda c: c.get("updated", 0), reverse=True)[:MAX_CONVERSATIONS]
    return {**record, "current": conversation_id, "conversations": conversations}, conversation_id


def find(record: dict, conversation_id: str | None) -> dict | None:
    return next((c for c in valid_record(record)["conversations"] if c["id"] == conversation_id), None)


def remove(record: dict, conversation_id: str | None) -> dict:
    record = valid_record(record)
    rest = [c for c in record["conversations"] if c["id"] != conversation_id]
    return {**record, "current": rest[0]["id"] if rest else None, "conversations": rest}


def list_label(conversation: dict, now: float | None = None) -> str:
    """'Title · 10:21' today, 'Title · 3 Nov' earlier (the server's clock)."""
    now = time.time() if now is None else now
    when = time.localtime(conversation.get("updated", now))
    today = time.localtime(now)[:3] == when[:3]
    return f"{conversation['title']} · {time.strftime('%H:%M' if today else '%d %b', when)}"


@dataclass(frozen=True)
class Shown:
    """One message to show: text, an image file, or (`missing`) an image no longer stored."""

    role: str
    text: str | None = None
    image_path: str | None = None
    name: str | None = None
    missing: bool = False


def to_display(messages: Sequence[dict], store: ImageStore) -> list[Shown]:
    shown = []
    for message in messages:
        if message.get("image"):
            try:
                path = store.get(message["image"])
            except StoreError:
                path = None
            if path is None:
                shown.append(Shown(message["role"], name=message.get("name") or "an image", missing=True))
            else:
                shown.append(Shown(message["role"], image_path=str(path), name=message.get("name")))
        else:
            shown.append(Shown(message["role"], text=str(message.get("text", ""))))
    return shown


# ---------------------------------------------------------------- the export file


def _media_type(data: bytes) -> str:
    return next((t for magic, t in MEDIA_TYPES.items() if data.startswith(magic)), "application/octet-stream")


def export_document(conversation: dict, store: ImageStore, model: str, generation: dict,
                    now: float | None = None) -> dict:
    """The export file's JSON for one saved conversation (images read from the store and embedded)."""
    turns: list[dict] = []
    for message in conversation["messages"]:
        if message.get("image"):
            path = store.get(message["image"])
            if path is None:
                part = {"type": "text", "text": f"[{message.get('name') or 'an image'}: no longer stored]"}
            else:
                data = path.read_bytes()
                part = {"type": "image", "name": message.get("name") or "image", "media_type": _media_type(data),
                        "data": base64.b64encode(data).decode()}
        else:
            part = {"type": "text", "text": message.get("text", "")}
        if turns and turns[-1]["role"] == message["role"]:
            turns[-1]["content"].append(part)
        else:
            turns.append({"role": message["role"], "content": [part]})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    return {"format": FORMAT, "version": VERSION, "exported_at": stamp, "title": conversation.get("title", ""),
            "model": model, "generation": generation, "messages": turns}


def write_export(conversation: dict, store: ImageStore, model: str, folder: Path) -> Path:
    """The export file of a conversation, written under `folder/<its id>/` (one per conversation)."""
    document = export_document(conversation, store, model, conversation.get("generation", {}))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", conversation.get("title", "")).strip("-")[:40] or "conversation"
    target = Path(folder) / conversation["id"]
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"dsvl-chat-{slug}.json"
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def record_feedback(path: Path, liked: Any, index: Any, reply: Any, model: str, messages: list[dict]) -> None:
    """Append one like/dislike as a JSON line: when, which reply, and the conversation it belongs to."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "liked": liked, "message_index": index,
            "reply": reply, "model": model, "conversation": messages}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def parse_export(data: bytes, max_bytes: int, max_images: int, store: ImageStore,
                 check_image: Callable[[str, str], None]) -> tuple[list[dict], dict, str]:
    """(saved messages, generation settings, title) from an export file; refuses with the reason.

    Every embedded image is stored, then checked by `check_image(path, name)` — the upload intake,
    which raises with its own reason (not an image, too many pixels, …).
    """
    if len(data) > max_bytes:
        raise ImportRefused(f"The file is {len(data) / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB a "
                            "conversation's images can take.")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"The file is not JSON, so not a dsvl-chat conversation ({exc}).") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ImportRefused(f"The file is JSON but not a dsvl-chat conversation (its \"format\" is not {FORMAT!r}).")
    version = document.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise ImportRefused(f"The file is format version {version!r}; this dsvl-chat reads version {VERSION}"
                            + (" — it was written by a newer dsvl-chat." if newer else "."))
    turns = document.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ImportRefused("The file holds no messages.")
    messages: list[dict] = []
    images = 0
    for n, turn in enumerate(turns, 1):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in conv.ROLES or not isinstance(content, list):
            raise ImportRefused(f"Message {n} is not a user or assistant message with a list of content parts.")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                messages.append({"role": role, "text": part["text"]})
            elif kind == "image" and role == "user":
                images += 1
                if images > max_images:
                    raise ImportRefused(f"The file holds more than {max_images} images, this server's limit for "
                                        "one conversation.")
                name = str(part.get("name") or f"image {images}")
                try:
                    raw = base64.b64decode(str(part.get("data", "")), validate=True)
                except (binascii.Error, ValueError):
                    raise ImportRefused(f"Image {images} ({name}) in message {n} is not valid base64.") from None
                try:
                    digest = store.put_bytes(raw)
                except StoreError as exc:
                    raise ImportRefused(f"Image {images} ({name}): {exc}.") from None
                try:
                    check_image(str(store.path(digest)), name)
                except ValueError as exc:
                    store.path(digest).unlink(missing_ok=True)  # refused by the intake: not worth keeping
                    raise ImportRefused(f"Image {images} of the file: {exc}.") from None
                messages.append({"role": role, "image": digest, "name": name})
            else:
                raise ImportRefused(f"Message {n} has a part of type {kind!r}; a conversation holds text, and images "
                                    "in user messages.")
    generation = document.get("generation") if isinstance(document.get("generation"), dict) else {}
    return messages, generation, str(document.get("title") or title_of(messages))
