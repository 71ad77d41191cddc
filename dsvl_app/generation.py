"""One request in, a stream of text increments and a final stats record out.

`model.generate` runs on a worker thread and feeds a streamer; a per-request stop `Event`, watched by
a `StoppingCriteria`, really ends that thread when the consumer stops or closes the stream (a
cancelled gradio event only closes the Python generator). CUDA out-of-memory is caught, the cache
emptied and a specific error raised; the model stays usable. No gradio imports.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from . import reuse
from .model import ModelHandle

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A generation that failed; str() is the message for the user."""


class OutOfMemory(GenerationError):
    """The device ran out of memory; the message carries advice."""


class GenerationTimeout(GenerationError):
    """No token arrived within the configured timeout."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one reply (temperature 0 → greedy)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self, max_new_tokens_cap: int) -> GenerationParams:
        """Refuse out-of-range values with a message naming the parameter."""
        if not 1 <= int(self.max_new_tokens) <= max_new_tokens_cap:
            raise GenerationError(f"max_new_tokens must be between 1 and {max_new_tokens_cap}, got {self.max_new_tokens}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise GenerationError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.5 <= float(self.repetition_penalty) <= 2.0:
            raise GenerationError(f"repetition_penalty must be between 0.5 and 2, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= int(self.seed) < 2**63:
            raise GenerationError(f"seed must be a non-negative integer, got {self.seed}")
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "repetition_penalty": float(self.repetition_penalty),
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class GenerationStats:
    """Figures of one reply for the meters."""

    prompt_tokens: int
    images: int
    reused_tokens: int = 0  # prompt tokens whose keys/values came from an earlier turn
    images_reused: int = 0  # images not re-encoded (inside the reused prefix, or their features cached)
    new_tokens: int = 0
    time_to_first_token_s: float | None = None
    decode_s: float = 0.0  # first token → last token, measured where tokens are produced
    total_s: float = 0.0
    stop_reason: str = "running"  # eos | length | stopped | timeout | error | running

    @property
    def tokens_per_s(self) -> float | None:
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s


class _StopOnEvent(StoppingCriteria):
    """Ends generate() at the next step once the event is set; remembers that it did."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.triggered = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        stop = self.event.is_set()
        self.triggered = self.triggered or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _TokenStreamer(TextIteratorStreamer):
    """Emits text per token (not per word) and counts tokens and the time of the first one.

    The stream ends when the worker says so (`close`), not when generate calls `end()`: the worker
    still has to put the turn into the reuse cache, and a client sending its next turn at once must
    find it there.
    """

    def __init__(self, tokenizer: Any, timeout: float):
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
        self.new_tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.last_token_at = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = self.last_token_at
        self.new_tokens += value.numel()
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        printable, self.print_len = text[self.print_len :], len(text)
        if text.endswith("\n"):
            self.token_cache, self.print_len = [], 0  # keep re-decoding bounded
        if printable:
            self.on_finalized_text(printable)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)  # never the stop signal: see close()

    def close(self) -> None:
        """End the stream for the consumer (after the worker's last step)."""
        self.text_queue.put(self.stop_signal, timeout=self.timeout)


def model_inputs(model: Any, inputs: Any) -> dict[str, Any]:
    """Processor outputs on the model's device, floating tensors in its dtype."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(model.device)
            if value.is_floating_point():
                value = value.to(model.dtype)
        moved[key] = value
    return moved


def release_memory(device: torch.device) -> None:
    """Free what a failed generation held, so the next request can run."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_message(prompt_tokens: int, images: int, max_new_tokens: int) -> str:
    return (
        f"Out of memory on the GPU while answering ({images} image(s), {prompt_tokens} prompt tokens, up to "
        f"{max_new_tokens} new tokens). Try fewer or smaller images, fewer new tokens, or clear older turns; "
        "memory was released and the chat is still usable."
    )


class Generation:
    """A running reply: iterate for text increments; `stats` when done; `stop()` to halt it.

    Usable as a context manager; leaving it (or closing the iterator) stops the worker thread.
    """

    def __init__(self, handle: ModelHandle, inputs: Any, params: GenerationParams, token_timeout_s: float):
        self.handle = handle
        self.params = params
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        n_images = int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0
        self.stats = GenerationStats(prompt_tokens=int(inputs["input_ids"].shape[-1]), images=n_images)
        self._inputs = inputs
        self._streamer = _TokenStreamer(handle.processor.tokenizer, timeout=token_timeout_s)
        self._criteria = _StopOnEvent(self.stop_event)
        self._token_timeout_s = token_timeout_s
        self.thread = threading.Thread(target=self._work, name="dsvl-generate", daemon=True)
        self._started = False

    # -- worker side


    def _work(self) -> None:
        handle = self.handle
        slots = handle.generation_slots
        try:
            if self.stop_event.is_set():
                return
            tokenizer = handle.processor.tokenizer
            with torch.inference_mode():
                inputs, plan = model_inputs(handle.model, self._inputs), None
                max_new = self.params.max_new_tokens
                if handle.reuse.enabled:
                    # Earlier turns' keys/values and image features, taken out of the shared store for this call.
                    keys = reuse.image_keys(self._inputs)  # of the processor's CPU tensors, as Prefetcher hashes them
                    plan = reuse.plan(handle.model, handle.reuse, inputs, keys, handle.model.config.image_token_id,
                                      int(handle.processor.num_image_tokens), max_new)
                    inputs = plan.kwargs
                    self.stats.reused_tokens, self.stats.images_reused = plan.reused_tokens, plan.images_reused
                else:
                    inputs["past_key_values"] = reuse.new_cache(handle.model.config, self.stats.prompt_tokens + max_new)
                if self.params.seed is not None:
                    torch.manual_seed(int(self.params.seed))  # seeds CUDA too; safe: we hold the slot
                sequences = handle.model.generate(
                    **inputs,
                    **self.params.generate_kwargs(),
                    streamer=self._streamer,
                    stopping_criteria=StoppingCriteriaList([self._criteria]),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    disable_compile=True,  # a static cache would make generate torch.compile on CUDA, per shape
                )
                if plan is not None:
                    self._keep(plan, sequences)
        except torch.OutOfMemoryError as exc:
            handle.reuse.clear()  # the cached turns are the first memory to give back
            self.error = OutOfMemory(oom_message(self.stats.prompt_tokens, self.stats.images, self.params.max_new_tokens))
            self.error.__cause__ = exc
        except BaseException as exc:  # noqa: BLE001 - reported to the consumer, never lost on the thread
            log.exception("generation failed")
            self.error = exc
        finally:
            if self.error is not None:
                release_memory(self.handle.device)
            slots.release()
            if self.error is not None:
                self._streamer.end()  # flush what was decoded (generate did not get to)
            self._streamer.close()

    def _keep(self, plan: reuse.Plan, sequences: torch.Tensor) -> None:
        """Put this turn's keys/values back for the next turn (only after a generate call that succeeded)."""
        try:
            reuse.keep(self.handle.reuse, plan, sequences)
        except Exception:  # noqa: BLE001 - the reply is complete; losing its cache entry only costs speed
            log.exception("could not keep this turn for reuse")

    # -- consumer side

    def start(self) -> Generation:
        """Wait for a free generation slot (one generate call per model by default), then start."""
        if not self._started:
            if not self.handle.generation_slots.acquire(timeout=self._token_timeout_s):
                raise GenerationTimeout(
                    f"The model stayed busy with other requests for {self._token_timeout_s:.0f} s; try again shortly."
                )
            self._started = True
            self._t0 = time.perf_counter()
            self.thread.start()
        return self

    def stop(self, wait: float | None = None) -> None:
        """Ask the worker to end at the next token; optionally wait for the thread."""
        self.stop_event.set()
        if wait is not None and self._started:
            self.thread.join(wait)

    def __iter__(self) -> Iterator[str]:
        self.start()
        completed = False
        try:
            while True:
                try:
                    text = next(self._streamer)
                except StopIteration:
                    break
                except queue.Empty:
                    self.stats.stop_reason = "timeout"
                    raise GenerationTimeout(
                        f"Generation stalled: no new token for {self._token_timeout_s:.0f} s, so it was stopped."
                    ) from None
                if text:  # the streamer's end() flushes an empty string
                    self._refresh_stats()
                    yield text
            completed = True
        finally:
            # Runs on normal end, on error, and when the consumer closes us (gradio cancel, dropped client).
            self.stop_event.set()
            if completed:
                self.thread.join(5.0)  # it closed the stream as its last act: it is returning now
            self._finish(stopped=not completed or self._criteria.triggered)
        if self.error is not None:
            if isinstance(self.error, GenerationError):
                raise self.error
            raise GenerationError(f"Generation failed: {type(self.error).__name__}: {self.error}") from self.error

    def _refresh_stats(self) -> None:
        """Live figures while streaming (the meters update with every increment)."""
        streamer = self._streamer
        self.stats.new_tokens = streamer.new_tokens
        self.stats.total_s = time.perf_counter() - self._t0
        if streamer.first_token_at is not None:
            self.stats.time_to_first_token_s = streamer.first_token_at - self._t0
            self.stats.decode_s = streamer.last_token_at - streamer.first_token_at

    def _finish(self, stopped: bool) -> None:
        self._refresh_stats()
        streamer = self._streamer
        if self.stats.stop_reason == "running":
            if self.error is not None:
                self.stats.stop_reason = "error"
            elif stopped:
                self.stats.stop_reason = "stopped"
            elif streamer.new_tokens >= self.params.max_new_tokens:
                self.stats.stop_reason = "length"
            else:
                self.stats.stop_reason = "eos"

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Prefetcher:
    """Encodes images attached in the UI while the model is idle, so their features wait in the reuse
    cache when the user presses Enter (on the 7B's CPU path an image costs ~5 s to encode).

    It never delays a reply: it takes the model only when no generate call runs or waits
    (`GenerationSlots.acquire_if_idle`), one image at a time, and gives up on an image after
    `max_wait_s`. Images it cannot load are skipped: the reply refuses them with its own message.
    """

    def __init__(self, handle: ModelHandle, load: Callable[[str], Any], max_wait_s: float = 300.0,
                 poll_s: float = 0.1):
        self.handle = handle
        self._load = load
        self._max_wait_s = max_wait_s
        self._poll_s = poll_s
        self._jobs: queue.Queue[tuple[str, float]] = queue.Queue(maxsize=64)
        self._seen: OrderedDict[str, float] = OrderedDict()  # path → when it was queued (deduplicates events)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.encoded = 0  # images this prefetcher encoded (for the meters' tests and logs)

    def submit(self, paths: Iterable[str]) -> int:
        """Queue images for encoding; returns how many were new. Never blocks."""
        if not self.handle.reuse.enabled:
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
                self._encode(path, queued_at + self._max_wait_s)
            except Exception:  # noqa: BLE001 - background help only: the reply path reports real errors
                log.exception("encoding %s ahead of its reply failed", path)

    def _encode(self, path: str, deadline: float) -> None:
        handle = self.handle
        try:
            image = self._load(path)
        except ValueError:  # ImageRejected and the like: the reply will name the problem
            return
        pixels = handle.processor.image_processor(images=[image], return_tensors="pt")
        key = reuse.image_keys(pixels)[0]
        slots = handle.generation_slots
        while handle.reuse.get_features(key) is None:
            if slots.acquire_if_idle():
                try:
                    with torch.inference_mode():
                        features = reuse.encode_images(handle.model, model_inputs(handle.model, pixels))
                    handle.reuse.put_features(key, features[0])
                    self.encoded += 1
                except torch.OutOfMemoryError:
                    release_memory(handle.device)
                finally:
                    slots.release()
                return
            if time.monotonic() > deadline:
                return
            time.sleep(self._poll_s)


def generate_stream(handle: ModelHandle, inputs: Any, params: GenerationParams, token_timeout_s: float) -> Generation:
    """A Generation for the encoded inputs; iterate it to stream the reply."""
    return Generation(handle, inputs, params, token_timeout_s)
