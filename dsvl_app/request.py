"""One reply as the engine sees it: a request that owns its own state, from the line to its last token.

A `Request` holds its prompt (ids, image spans and keys, processor tensors), its sampling (`Sampler`),
its text (`output.ReplyText`), its place in the decode batch (`row`, `pos`), its stats and the queue its
consumer reads. Its `status` (an enum) moves waiting → prefilling → decoding → finished and is written
only by the scheduler's thread, as is everything else here — except `cancel()`, the one thing any
thread may do: it *asks* the scheduler to end the request (idempotent; the first reason given wins), and
the scheduler honours it whatever the status — a waiting request leaves the line unprefilled, one being
read stops at its next layer, one decoding leaves at its next step. The consumer learns the end from
the request's queue and `stats.stop_reason`, both written by the scheduler. No gradio.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from .output import ReplyText
from .reuse import ImageSpan
from .sampling import GenerationError, GenerationParams, Sampler


class OutOfMemory(GenerationError):
    """The device ran out of memory; the message carries advice."""


class GenerationTimeout(GenerationError):
    """The engine made no progress (no token, no prefill step) within the configured timeout."""


class EngineBusy(GenerationError):
    """The line for the model is full; the message says how full, `retry_after_s` when to try again."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


def oom_message(prompt_tokens: int, images: int, max_new_tokens: int) -> str:
    return (
        f"Out of memory on the GPU while answering ({images} image(s), {prompt_tokens} prompt tokens, up to "
        f"{max_new_tokens} new tokens). Try fewer or smaller images, fewer new tokens, or clear older turns; "
        "memory was released and the chat is still usable."
    )


def as_generation_error(exc: BaseException) -> GenerationError:
    """The error a consumer sees for `exc`: a GenerationError as it is, anything else named in the one
    "Generation failed" message (every path that reports an unexpected failure uses this)."""
    if isinstance(exc, GenerationError):
        return exc
    error = GenerationError(f"Generation failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class Status(enum.Enum):
    """Where a request is in the engine (written only by the scheduler's thread)."""

    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "running"
    FINISHED = "finished"


# Why a reply ended (`GenerationStats.stop_reason` once finished): the end of sentence, max_new_tokens, a stop
# string, a cancel (Stop, a closed tab, a dropped client), the stall timeout, or a failure.
END_REASONS = ("eos", "length", "stop", "stopped", "timeout", "error")


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
    stop_reason: str = "waiting"  # the status while it runs (waiting | prefilling | running), then an END_REASON
    replica: str = ""  # which engine replica wrote it (with --replicas)

    @property
    def tokens_per_s(self) -> float | None:
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s

    @property
    def finished(self) -> bool:
        return self.stop_reason in END_REASONS


DONE = object()  # the end of a request's output queue


class Request:
    """A reply in the engine; see the module docstring. `capacity` positions of keys/values are reserved."""

    def __init__(self, model: Any, tokenizer: Any, inputs: Any, keys: list[str], spans: tuple[ImageSpan, ...],
                 params: GenerationParams, stop: tuple[str, ...] = (), record_logits: bool = False,
                 surface: str = "other"):
        self.inputs = inputs  # the processor's output (CPU): ids, pixel values — dropped once its images are encoded
        self.ids = inputs["input_ids"]  # [1, prompt]
        self.prompt_tokens = int(self.ids.shape[-1])
        self.keys, self.spans = keys, spans
        self.params = params
        self.capacity = self.prompt_tokens + int(params.max_new_tokens)
        self.sampler = Sampler(model, params, self.prompt_tokens)
        self.eos_token_id = tokenizer.eos_token_id
        self.output = ReplyText(tokenizer, stop)
        # Prompt + generated ids on the model's device, for the repetition penalty's view of this reply's history.
        self.history = torch.zeros((1, self.capacity), dtype=torch.long, device=model.device)
        self.history[0, : self.prompt_tokens] = self.ids[0].to(model.device)
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] | None = [] if record_logits else None  # for exactness checks
        self.stats = GenerationStats(self.prompt_tokens, len(keys))
        self.status = Status.WAITING
        self.error: BaseException | None = None
        self.out: queue.Queue = queue.Queue()
        self.notify: Any = None  # set by an async consumer: called (from the engine's thread) after each put
        self.cancelled = threading.Event()
        self.cancel_reason: str | None = None
        self.surface = surface  # where it came from (metrics): ui, chat, v1, mcp, other
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.last_gap_s: float | None = None  # between its last two tokens (None after the first)
        self.admitted = False  # it left the line to be read
        self.on_end: Any = None  # set by the scheduler: called as it finishes, before its consumer hears of it
        # Scheduler-owned state while it runs.
        self.plan: Any = None  # reuse.Plan: the reused prefix's length and the image features
        self.taken: Any = None  # reuse.Taken: the reuse prefix taken out of the store (given back if never used)
        self.need: Any = None  # planner.Need: the bytes reserved for it when it was admitted
        self.embeds: torch.Tensor | None = None  # the uncached part of the prompt, embedded, images scattered in
        self.cursor = 0  # prompt positions whose keys/values exist
        self.pos = 0  # where the next fed token goes (= tokens in the row's cache)
        self.row = -1  # index in the decode batch
        self.joined = -1  # order of joining the decode batch (out of memory there ends the newest)

    # -- the consumer side (any thread)

    def cancel(self, reason: str = "stopped") -> None:
        """Ask the scheduler to end this request (Stop, a closed tab, a dropped client: "stopped"; the stall
        timeout: "timeout"). Idempotent; the first reason wins; harmless once finished."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancelled.set()

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    # -- the engine side (its thread)

    def _put(self, item: Any) -> None:
        self.out.put(item)
        if self.notify is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's event loop has closed
                self.notify()

    def _set(self, status: Status) -> None:
        self.status = status
        self.stats.stop_reason = status.value

    def started(self) -> None:
        """Its prefill begins: it has left the line."""
        self.stats.queued_s = time.perf_counter() - self.submitted_at
        self.stats.place_in_line = None
        self.admitted = True
        self._set(Status.PREFILLING)

    def decoding(self) -> None:
        self._set(Status.DECODING)

    def accept(self, token: int, logits: torch.Tensor | None = None) -> str | None:
        """Take the next token and emit its text; the end reason when this token ends the reply ("stop", "eos",
        "length"), else None. May raise (a tokenizer failure): that ends this request only."""
        now = time.perf_counter()
        self.tokens.append(token)
        self.history[0, self.prompt_tokens + len(self.tokens) - 1] = token
        if self.logits is not None and logits is not None:
            self.logits.append(logits.to("cpu"))
        stats = self.stats
        stats.new_tokens = len(self.tokens)
        self.last_gap_s = None if self.first_token_at is None else now - self.last_token_at
        self.last_token_at = now
        if self.first_token_at is None:
            self.first_token_at = now
            stats.time_to_first_token_s = now - self.submitted_at
        stats.decode_s = now - self.first_token_at
        stats.total_s = now - self.submitted_at
        if piece := self.output.put(token):
            self._put(piece)
        if (matcher := self.sampler.matcher) is not None:
            if not matcher.accept_token(token):
                raise GenerationError("The structured answer's grammar refused a token it had allowed")
            if matcher.is_terminated():
                return "stop"  # its JSON is complete
        if self.output.stopped:
            return "stop"
        if token == self.eos_token_id:
            return "eos"
        if len(self.tokens) >= self.params.max_new_tokens:
            return "length"
        return None

    def history_view(self) -> torch.Tensor:
        return self.history[:, : self.prompt_tokens + len(self.tokens)]

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """End the reply (once): flush held-back text, record why, drop its tensors, wake the consumer."""
        if self.status is Status.FINISHED:
            return
        if error is not None:
            self.error = as_generation_error(error)
            reason = "timeout" if isinstance(error, GenerationTimeout) else "error"
        elif reason not in END_REASONS:
            raise ValueError(f"not an end reason: {reason!r}")
        try:
            if error is None and (piece := self.output.flush()):
                self._put(piece)
        except Exception as exc:  # noqa: BLE001 - the text so far stands; the failure is this reply's
            self.error, reason = as_generation_error(exc), "error"
        self.stats.total_s = time.perf_counter() - self.submitted_at
        self.stats.place_in_line = None
        self.stats.stop_reason = reason  # before the status: whoever sees it finished sees why
        self.status = Status.FINISHED
        # The tensors go back at once, whoever still holds this request (a consumer's frame, a log line).
        self.plan = self.embeds = self.inputs = self.taken = None
        if self.on_end is not None:
            self.on_end(self)  # (its metrics: counted before a reader of the reply can scrape)
        self._put(DONE)
