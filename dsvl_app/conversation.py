"""Gradio chat history + the new message → chat-template messages that fit the context.

Pure functions. The processor renders and counts; nothing here formats a prompt itself.
Accepts every history shape gradio produces: typed parts from the browser
(`{"type": "text"|"file"|"component", ...}`), plain strings, `{"path": ...}` dicts, `(path, alt)`
tuples and `gr.ChatMessage` objects from gradio_client or Python callers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .media import ImageRejected, display_name, load_image
from .settings import Limits

ROLES = ("user", "assistant")


class ConversationError(ValueError):
    """The request cannot be turned into a prompt; str() is the message for the user."""


class ContextOverflow(ConversationError):
    """Even the newest message alone does not fit the context."""


class TooManyImages(ConversationError):
    """More images than the configured limits allow."""


@dataclass(frozen=True)
class ImageRef:
    """An image part of a message, by file path."""

    path: str

    @property
    def name(self) -> str:
        return display_name(self.path)


Part = str | ImageRef


@dataclass(frozen=True)
class Turn:
    """One speaker's consecutive content, in order."""

    role: str
    parts: tuple[Part, ...]

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImageRef))


# ---------------------------------------------------------------- history shapes → turns


def _file_path(value: Any) -> str | None:
    """The path inside any file-like shape gradio or gradio_client uses, else None."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        if isinstance(value.get("path"), str):
            return value["path"]
        for key in ("path", "file", "value"):  # nested: {"path": FileData}, {"file": ...}, components
            if key in value:
                return _file_path(value[key])
        return None
    path = getattr(value, "path", None)  # FileData / gradio component values
    return path if isinstance(path, str) else None


def _parts(content: Any) -> list[Part]:
    """Parts of one message's content, in order."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, tuple) or (
        isinstance(content, list) and content and all(isinstance(c, str) for c in content) and os.path.isfile(content[0])
    ):
        # gradio's (filepath, alt_text) tuple form, possibly turned into a list by JSON.
        return [ImageRef(str(content[0]))] if content else []
    if isinstance(content, list):
        return [part for item in content for part in _parts(item)]
    if isinstance(content, Mapping):
        kind = content.get("type")
        if kind == "text" or ("text" in content and kind is None):
            return [str(content.get("text") or "")]
        path = _file_path(content)
        if path is not None:
            return [ImageRef(path)]
        raise ConversationError(f"Unrecognised message content: {sorted(content)}")
    path = _file_path(content)
    if path is not None:
        return [ImageRef(path)]
    raise ConversationError(f"Unrecognised message content of type {type(content).__name__}")


def _role_and_content(message: Any) -> tuple[str, Any]:
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    else:  # gr.ChatMessage and similar objects
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    if role not in ROLES:
        raise ConversationError(f"Unsupported message role {role!r}; history messages must be 'user' or 'assistant'")
    return role, content


def parse_history(history: Iterable[Any] | None) -> list[Turn]:
    """Gradio chat history → turns; consecutive messages of one role are merged in order."""
    turns: list[Turn] = []
    for message in history or []:
        metadata = message.get("metadata") if isinstance(message, Mapping) else getattr(message, "metadata", None)
        if metadata and metadata.get("title"):
            continue  # tool-use / thought bubbles are UI decoration, not conversation
        role, content = _role_and_content(message)
        parts = [p for p in _parts(content) if not (isinstance(p, str) and not p.strip())]
        if turns and turns[-1].role == role:
            turns[-1] = Turn(role, turns[-1].parts + tuple(parts))
        else:
            turns.append(Turn(role, tuple(parts)))
    return turns


def parse_message(message: Any) -> Turn:
    """The MultimodalTextbox value ({"text", "files"}) or a plain string → a user turn (images first)."""
    if message is None:
        message = {}
    if isinstance(message, str):
        message = {"text": message}
    if not isinstance(message, Mapping):
        raise ConversationError('The message must be {"text": str, "files": [...]} or a string')
    files = message.get("files") or []
    if isinstance(files, (str, Mapping)):
        files = [files]
    images: list[Part] = []
    for item in files:
        path = item if isinstance(item, str) else _file_path(item)
        if not path:
            raise ConversationError(f"Unrecognised file entry in the message: {item!r}")
        images.append(ImageRef(path))
    text = str(message.get("text") or "")
    parts = images + ([text] if text.strip() else [])
    if not parts:
        raise ConversationError("The message is empty: type a question or attach an image.")
    return Turn("user", tuple(parts))


def conversation_turns(history: Iterable[Any] | None, message: Any) -> list[Turn]:
    """History + new message as turns (a trailing unanswered user turn merges with the new one)."""
    turns = parse_history(history)
    new = parse_message(message)
    if turns and turns[-1].role == "user":
        turns[-1] = Turn("user", turns[-1].parts + new.parts)
    else:
        turns.append(new)
    return turns


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, Mapping) else getattr(message, "role", None)


def _as_message(parts: Iterable[Part]) -> dict:
    parts = list(parts)
    return {
        "text": " ".join(p for p in parts if isinstance(p, str)),
        "files": [p.path for p in parts if isinstance(p, ImageRef)],
    }


def split_last_exchange(history: Sequence[Any]) -> tuple[list[Any], dict]:
    """History without its last user turn (and reply), and that turn as a {"text", "files"} message."""
    end = len(history)
    while end > 0 and _role(history[end - 1]) == "assistant":
        end -= 1
    start = end
    while start > 0 and _role(history[start - 1]) == "user":
        start -= 1
    turns = parse_history(history[start:end])
    return list(history[:start]), _as_message(turns[0].parts if turns else ())


def edit_user_message(history: Sequence[Any], index: int, new_text: str) -> tuple[list[Any], dict]:
    """History before the user turn holding message `index`, and that turn with its text replaced (images kept)."""
    if not 0 <= index < len(history) or _role(history[index]) != "user":
        raise ConversationError("Only your own messages can be edited.")
    start, end = index, index + 1
    while start > 0 and _role(history[start - 1]) == "user":
        start -= 1
    while end < len(history) and _role(history[end]) == "user":
        end += 1
    turns = parse_history(history[start:end])
    images = [p for p in (turns[0].parts if turns else ()) if isinstance(p, ImageRef)]
    return list(history[:start]), _as_message([*images, new_text])


def count_images(history: Iterable[Any] | None) -> int:
    """Images in a chat history (for numbering new ones)."""
    return sum(len(turn.images) for turn in parse_history(history))


# ---------------------------------------------------------------- turns → template messages


def template_messages(turns: Sequence[Turn], images: Mapping[str, Image.Image] | None = None) -> list[dict]:
    """Chat-template messages; with `images` each image part carries its PIL image."""
    messages = []
    for turn in turns:
        content: list[dict] = []
        for part in turn.parts:
            if isinstance(part, ImageRef):
                block: dict = {"type": "image"}
                if images is not None:
                    block["image"] = images[part.path]
                content.append(block)
            else:
                content.append({"type": "text", "text": part})
        if not content:
            content.append({"type": "text", "text": ""})
        messages.append({"role": turn.role, "content": content})
    return messages


def count_prompt_tokens(processor: Any, turns: Sequence[Turn]) -> int:
    """Exact prompt length in tokens: rendered text plus the processor's num_image_tokens per image."""
    prompt = processor.apply_chat_template(template_messages(turns), add_generation_prompt=True, tokenize=False)
    tokenizer = processor.tokenizer
    # The processor skips special tokens when the rendered prompt already starts with BOS.
    add_special = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
    ids = tokenizer(prompt, add_special_tokens=add_special, verbose=False)["input_ids"]
    n_images = sum(len(t.images) for t in turns)
    return len(ids) + n_images * (int(processor.num_image_tokens) - 1)


# ---------------------------------------------------------------- limits and budget


@dataclass
class Prompt:
    """What the model will see: messages (with images), and what the budget dropped."""

    turns: list[Turn]
    messages: list[dict]
    images: list[Image.Image]
    image_names: list[str]
    prompt_tokens: int
    context_tokens: int
    image_tokens: int  # text positions each image costs (the processor's num_image_tokens)
    dropped_turns: int = 0
    dropped_images: int = 0
    notes: list[str] = field(default_factory=list)


def check_image_limits(turns: Sequence[Turn], new: Turn, limits: Limits) -> None:
    """Refuse a message with more images than allowed per message or per conversation."""
    if len(new.images) > limits.images_per_message:
        raise TooManyImages(
            f"This message has {len(new.images)} images; at most {limits.images_per_message} are allowed per message."
        )
    total = sum(len(t.images) for t in turns)
    if total > limits.images_per_conversation:
        raise TooManyImages(
            f"The conversation would hold {total} images; at most {limits.images_per_conversation} are allowed. "
            "Clear the chat to start a new conversation."
        )


def fit_to_context(
    turns: Sequence[Turn], count: Callable[[Sequence[Turn]], int], context_tokens: int, max_new_tokens: int
) -> tuple[list[Turn], int, int]:
    """Drop the oldest whole exchanges until prompt + max_new_tokens fits; (turns, dropped, prompt tokens).

    Leading system turns are kept: they are instructions for the whole conversation, not an exchange.
    """
    pinned = 0
    while pinned < len(turns) and turns[pinned].role == "system":
        pinned += 1
    system, kept = list(turns[:pinned]), list(turns[pinned:])
    dropped = 0
    while True:
        tokens = count(system + kept)
        if tokens + max_new_tokens <= context_tokens:
            return system + kept, dropped, tokens
        if len(kept) <= 1:
            images = len(kept[0].images) if kept else 0
            raise ContextOverflow(
                f"Too many tokens: your message needs {tokens} prompt tokens (including {images} image(s)) plus "
                f"{max_new_tokens} new tokens, more than the model's context of {context_tokens} tokens. "
                "Use fewer images, shorten the text or lower 'max new tokens'."
            )
        # One exchange = a user turn and the assistant reply after it.
        cut = 2 if len(kept) > 2 and kept[0].role == "user" and kept[1].role == "assistant" else 1
        kept = kept[cut:]
        dropped += 1


def build_prompt(
    processor: Any,
    history: Iterable[Any] | None,
    message: Any,
    limits: Limits,
    context_tokens: int,
    max_new_tokens: int,
    load: Callable[[str, Limits], Image.Image] = load_image,
) -> Prompt:
    """Validate, budget and load everything the model needs for one reply (gradio history + new message)."""
    return prompt_for_turns(processor, conversation_turns(history, message), limits, context_tokens, max_new_tokens,
                            load, new=parse_message(message))


def prompt_for_turns(
    processor: Any,
    turns: Sequence[Turn],
    limits: Limits,
    context_tokens: int,
    max_new_tokens: int,
    load: Callable[[str, Limits], Image.Image] = load_image,
    new: Turn | None = None,
) -> Prompt:
    """`build_prompt` for turns already parsed (the OpenAI adapter); `new` (default: the last turn) is the message
    being answered, whose images are checked first and count against the per-message limit."""
    turns = list(turns)
    if not turns or turns[-1].role != "user":
        raise ConversationError("The last message must be the user's.")
    new = new or turns[-1]
    check_image_limits(turns, new, limits)
    # New uploads are checked first so a bad file is named even if the budget would drop it.
    images: dict[str, Image.Image] = {ref.path: load(ref.path, limits) for ref in new.images}
    kept, dropped, tokens = fit_to_context(
        turns, lambda ts: count_prompt_tokens(processor, ts), context_tokens, max_new_tokens
    )
    refs = [ref for turn in kept for ref in turn.images]
    for ref in refs:
        if ref.path not in images:
            try:
                images[ref.path] = load(ref.path, limits)
            except ImageRejected as exc:
                raise ImageRejected(exc.filename, f"from earlier in the conversation {exc.reason}") from None
    dropped_images = sum(len(t.images) for t in turns) - len(refs)
    notes = []
    if dropped:
        notes.append(
            f"Dropped the {dropped} oldest exchange(s) ({dropped_images} image(s)) to fit the "
            f"{context_tokens}-token context."
        )
    return Prompt(
        turns=kept,
        messages=template_messages(kept, images),
        images=[images[ref.path] for ref in refs],
        image_names=[ref.name for ref in refs],
        prompt_tokens=tokens,
        context_tokens=context_tokens,
        image_tokens=int(processor.num_image_tokens),
        dropped_turns=dropped,
        dropped_images=dropped_images,
        notes=notes,
    )


def encode(processor: Any, messages: list[dict]) -> Any:
    """The processor's model inputs (input_ids, pixel_values, high_res_pixel_values, ...) for a prompt."""
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
