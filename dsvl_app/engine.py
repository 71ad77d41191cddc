"""The one way to the model: submit a conversation, get back a `Reply` that streams text and stats.

The UI, `/chat`, `/v1`, MCP and encode-on-attach all come through here; nothing above this module
builds a prompt or runs the model. `Engine.submit` validates and budgets the conversation (the
processor renders it and counts its tokens), encodes it with the processor, hashes its images and puts
a `Request` in the scheduler's line; the `Reply` it returns is the consumer's side: iterate it (or
`async for` it) for text increments, read `stats` for the meters and the place in line, `cancel()` or
close it to ask the engine to stop that request only. A reply that makes no progress at all (no token,
no prefill step, no layer) for `token_timeout_s` is stopped as stalled; waiting in line behind replies
that are progressing is not a stall. No gradio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import conversation as conv
from . import reuse
from .grammar import Grammars
from .media import load_image
from .metrics import EngineMetrics
from .model import ModelHandle
from .request import DONE, EngineBusy, GenerationStats, GenerationTimeout, OutOfMemory, Request, as_generation_error
from .runner import model_inputs
from .sampling import GenerationError, GenerationParams, checkpoint_defaults
from .scheduler import Scheduler
from .settings import Limits, Settings

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BATCH_CPU", "DEFAULT_BATCH_CUDA", "END", "Engine", "EngineBusy", "GenerationError",
           "GenerationParams", "GenerationStats", "GenerationTimeout", "OutOfMemory", "Prefetcher", "Prepared", "Reply",
           "ReplyStream", "prepare"]

DEFAULT_BATCH_CUDA = 8  # a decode step for 8 rows costs about one row's on a GPU
DEFAULT_BATCH_CPU = 4  # CPUs gain little speed from batching; 4 keeps the wait behind others short
CHUNK_TOKENS = 256  # prompt positions fed per prefill step while other replies decode (a layer of it ~0.3 s on a 2-core CPU)
POLL_S = 0.25  # how often a waiting consumer looks at its place in line and the heartbeat


def default_batch(settings: Settings, device: torch.device) -> tuple[int, str]:
    """Replies decoded together: --batch, else 8 on CUDA and 4 on CPU (1 on ZeroGPU), and why."""
    if settings.zero_gpu:
        return 1, "ZeroGPU lends the GPU one call at a time"
    if settings.batch is not None:
        return settings.batch, "as asked (--batch)"
    if device.type == "cuda":
        return DEFAULT_BATCH_CUDA, "default on CUDA"
    return DEFAULT_BATCH_CPU, "default on CPU"


class Engine:
    """One scheduler owning one model; any number of adapters submit to it (see the module docstring)."""

    def __init__(self, handle: ModelHandle, settings: Settings | None = None, *, batch: int | None = None,
                 decode: str | None = None, chunk_tokens: int = CHUNK_TOKENS):
        self.handle = handle
        self.settings = settings = settings or Settings()
        self.limits: Limits = settings.limits
        self.batch, self.batch_reason = default_batch(settings, handle.device)
        if batch is not None:
            self.batch, self.batch_reason = batch, "as asked"
        self.scheduler = Scheduler(handle, self.batch, handle.kv_budget_bytes, settings.queue_size,
                                   decode or settings.batch_decode, chunk_tokens, inline=settings.zero_gpu)
        # What a request that leaves sampling unset gets (the checkpoint's generation config), and the token ids.
        self.sampling_defaults = checkpoint_defaults(handle.model.generation_config)
        self.vocab_size = int(handle.model.config.get_text_config().vocab_size)
        self._grammars: Grammars | None = None  # made when the first structured answer is asked for
        self._grammar_lock = threading.Lock()

    def describe(self) -> str:
        """One line for the banner: how many replies run at once and how they are decoded."""
        if self.batch == 1:
            return f"one at a time ({self.batch_reason}); others wait in line"
        return (f"up to {self.batch} replies decoded together ({self.batch_reason}); "
                f"decode: {self.scheduler.policy.describe()}")

    # -- requests

    def submit(self, turns: Sequence[conv.Turn], params: GenerationParams, *, new: conv.Turn | None = None,
               stop: Sequence[str] = (), load: Callable[..., Any] = load_image, record_logits: bool = False,
               surface: str = "other") -> Reply:
        """Build the prompt for `turns` (the last one the user's; `new` its newest message, checked first) and
        put it in line. Raises the conversation's refusals (bad image, too many images or tokens) and
        `EngineBusy` when the line is full, each counted by reason and `surface` (ui, chat, v1, mcp); failures
        after this point come out of the Reply."""
        with self.counting_refusals(surface):
            prepared = prepare(self.handle, self.limits, turns, params, new=new, load=load)
            return self.enqueue(prepared, params, stop, record_logits, surface)

    def enqueue(self, prepared: Prepared, params: GenerationParams, stop: Sequence[str] = (),
                record_logits: bool = False, surface: str = "other") -> Reply:
        """Put a prepared prompt in line (raises `EngineBusy` when the line is full)."""
        handle = self.handle
        request = Request(handle.model, handle.processor.tokenizer, prepared.inputs, prepared.keys, prepared.spans,
                          params, tuple(stop), record_logits, surface)
        if params.answer is not None:  # compiled here, in the caller's thread (cached): never on the engine's
            request.sampler.matcher = self.grammars().matcher(params.answer)
        self.scheduler.add(request)
        return Reply(self, request, prepared.prompt, prepared.inputs)

    def grammars(self) -> Grammars:
        """The model's grammar compiler for structured answers (made once)."""
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.handle.processor.tokenizer, self.vocab_size)
            return self._grammars

    @property
    def metrics(self) -> EngineMetrics:
        return self.scheduler.metrics

    def counting_refusals(self, surface: str) -> contextlib.AbstractContextManager[None]:
        """Count a refusal raised inside (a bad image, too many tokens, a full line, …) by its reason."""
        return self.metrics.counting_refusals(surface)

    def metrics_text(self) -> bytes:
        """The Prometheus text of this engine's metrics."""
        return self.metrics.render()

    def health(self) -> tuple[str | None, dict[str, Any]]:
        """(why it cannot take work now — None when it can —, what it is: model, dtype, device, batch, replicas)."""
        handle = self.handle
        about = {"model": handle.label, "dtype": str(handle.dtype).removeprefix("torch."), "device": str(handle.device),
                 "batch": self.batch, "replicas": {"healthy": 1, "total": 1}}
        problem = self.scheduler.health(self.limits.token_timeout_s)
        if problem is not None:
            about["replicas"]["healthy"] = 0
        return problem, about

    def prefetcher(self, load: Callable[[str], Any]) -> Prefetcher:
        """Encodes images attached in the UI while this engine is idle (see Prefetcher)."""
        return Prefetcher(self, load)

    def close(self) -> None:
        """Nothing to release in-process (the scheduler's thread ends when idle); RemoteEngine stops Ray here."""


@dataclass
class Prepared:
    """A conversation made ready for the model: the prompt, the processor's tensors and its images' keys."""

    prompt: conv.Prompt
    inputs: Any  # the processor's BatchFeature (CPU tensors): what travels to a replica
    keys: list[str]  # each image's content hash ("" when not hashed)
    spans: tuple[reuse.ImageSpan, ...]


def prepare(handle: ModelHandle, limits: Limits, turns: Sequence[conv.Turn], params: GenerationParams, *,
            new: conv.Turn | None = None, load: Callable[..., Any] = load_image,
            hash_images: bool | None = None) -> Prepared:
    """Validate and budget `turns`, render them with the processor and hash their images (by default only when
    reuse is on: keys tell images apart by content). Needs the processor and the config, not the weights."""
    prompt = conv.prompt_for_turns(handle.processor, turns, limits, handle.context_tokens, params.max_new_tokens,
                                   load, new=new)
    inputs = conv.encode(handle.processor, prompt.messages)
    n_images = int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0
    hash_images = handle.reuse.enabled if hash_images is None else hash_images
    keys = reuse.image_keys(inputs) if hash_images else [""] * n_images
    spans = reuse.image_spans(inputs["input_ids"][0], handle.model.config.image_token_id,
                              int(handle.processor.num_image_tokens), keys)
    return Prepared(prompt, inputs, keys, spans)


END = object()  # what `ReplyStream._read` returns for the end of a reply


class ReplyStream:
    """What every reply offers its consumer — a local `Reply`, or a replica's `replicas.RemoteReply` — with one
    reading path for both: text increments (`for`, `updates()`, or `async for` over `aiter()` without holding a
    thread), live `stats`, `finished`, and `cancel()`, which only *asks* the engine to stop (closing the stream
    asks too). The end reason comes from the engine.

    A subclass fills `_items` (from the scheduler, or from a replica's stream), says what an item means
    (`_read`), when the engine last showed progress (`_progress_at`), and what a stall does (`_stalled`).
    """

    stats: GenerationStats
    prompt: conv.Prompt | None
    inputs: Any  # the processor's tensors for this prompt (the inspector's views), until the reply is read

    def __init__(self, timeout_s: float, items: queue.Queue | None = None):
        self.timeout_s = timeout_s
        self._items: queue.Queue = items if items is not None else queue.Queue()
        self._last_seen = time.monotonic()

    # -- what a subclass provides

    @property
    def finished(self) -> bool:
        raise NotImplementedError

    def cancel(self, reason: str = "stopped") -> None:
        """Ask the engine to stop this reply (idempotent; honoured wherever the reply is)."""
        raise NotImplementedError

    def _read(self, item: Any) -> Any:
        """The text `item` carries ("" for progress only), or END; raises the reply's error at its end."""
        raise NotImplementedError

    def _stalled(self) -> GenerationTimeout:
        """No progress for `timeout_s`: ask to stop, and return the error the consumer gets."""
        raise NotImplementedError

    def _progress_at(self) -> float:
        return self._last_seen

    def _listen(self, notify: Callable[[], None] | None) -> None:
        """Have `notify` called (from any thread) whenever an item arrives; None stops it."""
        raise NotImplementedError

    def _wait(self) -> None:
        """Before blocking on `_items` (an engine without a thread of its own is stepped here)."""

    @property
    def _blocking(self) -> bool:
        """Whether waiting for an item needs a thread (an inline engine runs in its reader)."""
        return False

    # -- the one reading path

    @property
    def finish_reason(self) -> str:
        """OpenAI's word: 'length' when max_new_tokens cut the reply, else 'stop'."""
        return "length" if self.stats.stop_reason == "length" else "stop"

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        for piece in self.updates():
            if piece is not None:
                yield piece

    def _next(self, timeout: float) -> Any | None:
        """The next item, or None when nothing came within `timeout` (0: do not wait)."""
        if timeout:
            self._wait()
        try:
            item = self._items.get(timeout=timeout) if timeout else self._items.get_nowait()
        except queue.Empty:
            return None
        self._last_seen = time.monotonic()
        return item

    def _check_stall(self) -> None:
        if time.monotonic() - self._progress_at() > self.timeout_s and not self.finished:
            raise self._stalled()

    def updates(self, poll_s: float = POLL_S) -> Iterator[str | None]:
        """Text increments, and None every `poll_s` while nothing arrives (to refresh a place in line)."""
        self.inputs = None  # read from now on: the image tensors go (~15 MB an image; the inspector took its views)
        try:
            while True:
                item = self._next(poll_s)
                if item is None:
                    self._check_stall()
                    yield None
                    continue
                piece = self._read(item)
                if piece is END:
                    return
                yield piece or None
        finally:
            self.close()

    async def aiter(self, poll_s: float = POLL_S, ticks: bool = False) -> AsyncIterator[str | None]:
        """Text increments for an asyncio consumer, without holding a thread while it waits (with `ticks`,
        also None every `poll_s` while nothing arrives, as `updates` gives)."""
        self.inputs = None  # as in updates()
        loop, arrived = asyncio.get_running_loop(), asyncio.Event()
        if not self._blocking:
            # A lambda, not a method: the engine holds it while the reply runs, and must not hold the reply.
            self._listen(lambda: loop.call_soon_threadsafe(arrived.set))
        try:
            while True:
                arrived.clear()
                item = self._next(0)
                if item is None:
                    if self._blocking:
                        item = await asyncio.to_thread(self._next, poll_s)
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(arrived.wait(), poll_s)
                        item = self._next(0)
                if item is None:
                    self._check_stall()
                    if ticks:
                        yield None
                    continue
                piece = self._read(item)
                if piece is END:
                    return
                if piece or ticks:
                    yield piece or None
        finally:
            if not self._blocking:
                self._listen(None)
            self.close()


class Reply(ReplyStream):
    """The consumer's side of one request in this process: its output queue, its stats, a cancel that asks."""

    def __init__(self, engine: Engine, request: Request, prompt: conv.Prompt, inputs: Any):
        super().__init__(engine.limits.token_timeout_s, request.out)
        self.engine, self.request, self.prompt = engine, request, prompt
        self.inputs = inputs

    @property
    def stats(self) -> GenerationStats:  # type: ignore[override]
        return self.request.stats

    @property
    def finished(self) -> bool:
        return self.request.finished

    def cancel(self, reason: str = "stopped") -> None:
        """Stop this request only: a waiting one leaves the line, one being read stops at its next layer, one
        decoding at its next step."""
        self.request.cancel(reason)
        if not self.request.finished:
            self.engine.scheduler.wake()

    def _read(self, item: Any) -> Any:
        if item is not DONE:
            return item
        if self.request.error is not None:
            raise as_generation_error(self.request.error)
        return END

    def _progress_at(self) -> float:
        return max(self.engine.scheduler.heartbeat, self._last_seen)

    def _stalled(self) -> GenerationTimeout:
        self.cancel("timeout")
        return GenerationTimeout(f"Generation stalled: the model made no progress for {self.timeout_s:.0f} s "
                                 "(no new token, no step of reading the prompt), so the reply was stopped.")

    def _listen(self, notify: Callable[[], None] | None) -> None:
        self.request.notify = notify

    @property
    def _blocking(self) -> bool:
        return self.engine.scheduler.inline

    def _wait(self) -> None:
        scheduler = self.engine.scheduler
        if scheduler.inline:
            scheduler.drive(lambda: not self.request.out.empty() or self.request.finished)


class Prefetcher:
    """Encodes images attached in the UI while the model is idle, so their features wait in the reuse
    cache when the user presses Enter (on the 7B's CPU path an image costs ~5 s to encode).

    Loading and preprocessing run on this prefetcher's thread; the encode itself is a background job of
    the scheduler, which runs it only when no reply runs or waits, so it never delays a reply. A job
    older than `max_wait_s` is dropped. Images it cannot load are skipped: the reply names the problem.
    """

    def __init__(self, engine: Engine, load: Callable[[str], Any], max_wait_s: float = 300.0):
        self.engine = engine
        self._load = load
        self._max_wait_s = max_wait_s
        self._jobs: queue.Queue[tuple[str, float]] = queue.Queue(maxsize=64)
        self._seen: OrderedDict[str, float] = OrderedDict()  # path → when it was queued (deduplicates events)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.encoded = 0  # images this prefetcher encoded (for the meters' tests and logs)

    def submit(self, paths: Iterable[str]) -> int:
        """Queue images for encoding; returns how many were new. Never blocks."""
        if not self.engine.handle.reuse.enabled:
            return 0
        queued, now = 0, time.monotonic()
        with self._lock:
            for path in paths:
                if path in self._seen and now - self._seen[path] < self._max_wait_s:
                    continue
                try:
                    self._jobs.put_nowait((path, now))
                except queue.Full:
                    break  # a flood of attachments: the rest are encoded when their reply needs them
                self._seen[path] = now
                self._seen.move_to_end(path)
                while len(self._seen) > 256:
                    self._seen.popitem(last=False)
                queued += 1
            if queued and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dsvl-prefetch", daemon=True)
                self._thread.start()
        return queued

    def _run(self) -> None:
        while True:
            path, queued_at = self._jobs.get()
            try:
                self._prepare(path, queued_at + self._max_wait_s)
            except Exception:  # noqa: BLE001 - background help only: the reply path reports real errors
                log.exception("preparing %s ahead of its reply failed", path)

    def _prepare(self, path: str, deadline: float) -> None:
        handle = self.engine.handle
        try:
            image = self._load(path)
        except ValueError:  # ImageRejected and the like: the reply will name the problem
            return
        pixels = handle.processor.image_processor(images=[image], return_tensors="pt")
        key = reuse.image_keys(pixels)[0]

        def encode() -> None:
            if time.monotonic() > deadline or handle.reuse.get_features(key) is not None:
                return
            features = reuse.encode_images(handle.model, model_inputs(handle.model, pixels))
            handle.reuse.put_features(key, features[0])
            self.encoded += 1

        self.engine.scheduler.add_background(encode)
