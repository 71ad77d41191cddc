"""One reply as the engine sees it: a request that owns its own state, from the line to its last token.

A `Request` holds its prompt (ids, image spans and keys, processor tensors), its sampling (`Sampler`),
its text (`TextStream` cut by `StopText`), its place in the decode batch (`row`, `pos`), its stats and
the queue its consumer reads. The scheduler moves it through waiting → prefilling → decoding → done;
only the scheduler's thread changes it, except `cancel()`, which any thread may call. No gradio.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from .reuse import ImageSpan
from .sampling import GenerationError, GenerationParams, Sampler, StopText, TextStream


class OutOfMemory(GenerationError):
    """The device ran out of memory; the message carries advice."""


class GenerationTimeout(GenerationError):
    """The engine made no progress (no token, no prefill step) within the configured timeout."""


class EngineBusy(GenerationError):
    """The line for the model is full; the message says how full."""


def oom_message(prompt_tokens: int, images: int, max_new_tokens: int) -> str:
    return (
        f"Out of memory on the GPU while answering ({images} image(s), {prompt_tokens} prompt tokens, up to "
        f"{max_new_tokens} new tokens). Try fewer or smaller images, fewer new tokens, or clear older turns; "
        "memory was released and the chat is still usable."
    )


@dataclass
class GenerationStats:
    """Figures of one reply for the meters (updated live by the engine)."""

    prompt_tokens: int
    images: int
    reused_tokens: int = 0  # prompt tokens whose keys/values came from an earlier turn
    images_reused: int = 0  # images not re-encoded (inside the reused prefix, or their features cached)
    new_tokens: int = 0
    queued_s: float = 0.0  # waiting in line before its prefill began
    time_to_first_token_s: float | None = None  # from the request (waiting included) to its first token
    decode_s: float = 0.0  # first token → last token
    total_s: float = 0.0
    place_in_line: int | None = None  # 1 = next; None once it is being served
    prefilled_tokens: int = 0  # of the prompt, including the reused ones
    stop_reason: str = "waiting"  # waiting | prefilling | running | eos | length | stop | stopped | timeout | error
    replica: str = ""  # which engine replica wrote it (with --replicas)

    @property
    def tokens_per_s(self) -> float | None:
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s

    @property
    def finished(self) -> bool:
        return self.stop_reason not in ("waiting", "prefilling", "running")


DONE = object()  # the end of a request's output queue


class Request:
    """A reply in the engine; see the module docstring. `capacity` positions of keys/values are reserved."""

    def __init__(self, model: Any, tokenizer: Any, inputs: Any, keys: list[str], spans: tuple[ImageSpan, ...],
                 params: GenerationParams, stop: tuple[str, ...] = (), record_logits: bool = False):
        self.inputs = inputs  # the processor's output (CPU): ids, pixel values
        self.ids = inputs["input_ids"]  # [1, prompt]
        self.prompt_tokens = int(self.ids.shape[-1])
        self.keys, self.spans = keys, spans
        self.params = params
        self.capacity = self.prompt_tokens + int(params.max_new_tokens)
        self.sampler = Sampler(model, params, self.prompt_tokens)
        self.eos_token_id = tokenizer.eos_token_id
        self.text = TextStream(tokenizer)
        self.stop = StopText(stop)
        # Prompt + generated ids on the model's device, for the repetition penalty's view of this reply's history.
        self.history = torch.zeros((1, self.capacity), dtype=torch.long, device=model.device)
        self.history[0, : self.prompt_tokens] = self.ids[0].to(model.device)
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] | None = [] if record_logits else None  # for exactness checks
        self.stats = GenerationStats(self.prompt_tokens, len(keys))
        self.error: BaseException | None = None
        self.out: queue.Queue = queue.Queue()
        self.notify: Any = None  # set by an async consumer: called (from the engine's thread) after each put
        self.cancelled = threading.Event()
        self._ended = False
        self._text_started = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        # Scheduler-owned state while it runs.
        self.plan: Any = None  # reuse.Plan: the prefill cache and the image features
        self.embeds: torch.Tensor | None = None  # the uncached part of the prompt, embedded, images scattered in
        self.cursor = 0  # prompt positions whose keys/values exist
        self.pos = 0  # where the next fed token goes (= tokens in the row's cache)
        self.row = -1  # index in the decode batch
        self.joined = -1  # order of joining the decode batch (out of memory there ends the newest)

    # -- the consumer side (any thread)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    @property
    def finished(self) -> bool:
        return self.stats.finished

    # -- the engine side (its thread)

    def _put(self, item: Any) -> None:
        self.out.put(item)
        if self.notify is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's event loop has closed
                self.notify()

    def started(self) -> None:
        now = time.perf_counter()
        self.stats.queued_s = now - self.submitted_at
        self.stats.place_in_line = None
        self.stats.stop_reason = "prefilling"

    def accept(self, token: int, logits: torch.Tensor) -> bool:
        """Take the next token; emit its text; False when the reply has ended (EOS, length or a stop string)."""
        now = time.perf_counter()
        self.tokens.append(token)
        self.history[0, self.prompt_tokens + len(self.tokens) - 1] = token
        if self.logits is not None:
            self.logits.append(logits[0].to("cpu"))
        stats = self.stats
        stats.new_tokens = len(self.tokens)
        if self.first_token_at is None:
            self.first_token_at = now
            stats.time_to_first_token_s = now - self.submitted_at
            stats.stop_reason = "running"
        stats.decode_s = now - self.first_token_at
        stats.total_s = now - self.submitted_at
        if piece := self.stop.feed(self._reply_text(self.text.put(token))):
            self._put(piece)
        if self.stop.stopped:
            stats.stop_reason = "stop"
        elif token == self.eos_token_id:
            stats.stop_reason = "eos"
        elif len(self.tokens) >= self.params.max_new_tokens:
            stats.stop_reason = "length"
        return not stats.finished

    def _reply_text(self, piece: str) -> str:
        """The reply as a reply: without the space the chat template leaves after "Assistant:" (every reply's
        first token starts with it) — the template strips it too when the turn comes back as history."""
        if not self._text_started:
            piece = piece.lstrip()
            self._text_started = bool(piece)
        return piece

    def history_view(self) -> torch.Tensor:
        return self.history[:, : self.prompt_tokens + len(self.tokens)]

    def finish(self, reason: str | None = None, error: BaseException | None = None) -> None:
        """End the reply: flush held-back text, record why, wake the consumer (once)."""
        if self._ended:
            return
        self._ended = True
        if error is not None:
            self.error = error
            reason = "timeout" if isinstance(error, GenerationTimeout) else "error"
        if reason is not None and not self.stats.finished:
            self.stats.stop_reason = reason
        elif not self.stats.finished:
            self.stats.stop_reason = "stopped"
        if piece := self.stop.feed(self._reply_text(self.text.flush())):
            self._put(piece)
        if piece := self.stop.flush():
            self._put(piece)
        self.stats.total_s = time.perf_counter() - self.submitted_at
        self.stats.place_in_line = None
        self.plan = self.embeds = None  # the prefill cache and embeddings go back at once
        self._put(DONE)
