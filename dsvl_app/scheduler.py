"""The engine room's scheduler: one thread owns the model and moves every reply through it.

Each turn of its loop (`step`):

1. drops what was cancelled (Stop, a closed tab, a dropped `/v1` client) — only that request;
2. admits the next request in line when a decode row is free (`batch`) and the keys/values it needs
   fit in the memory budget beside the replies running (the reuse cache gives way first); a request
   that does not fit waits, first come first served — it never runs another out of memory;
3. feeds part of that request's prompt (the **prefill**): its images are encoded (or their cached
   features used), the part of the prompt an earlier turn computed is taken from the reuse cache, and
   the rest goes through the model — all of it at once when no other reply is decoding (exactly
   today's computation), else `chunk_tokens` at a time;
4. runs one **decode step**: one token for every decoding reply, in one forward over all their rows
   (`slots.SlotPool`) — or one forward per row where that measures faster (`DecodePolicy`).

A prefill chunk or an image encode can take seconds on a CPU, far longer than a decode step, so the
scheduler also *yields* inside them: a hook before every decoder and vision layer runs a decode step
for the replies already streaming whenever one is due. Running streams keep flowing at about half
their speed while a newcomer's prompt is read, whatever the device. The same hook is the engine's
heartbeat: a long prefill is progress, not a stall.

A reply that ends gives its row back and its keys/values to the reuse cache. A failure ends only its
own request; out of memory in a shared decode step ends the newest joiner and the others go on.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import reuse
from .request import EngineBusy, OutOfMemory, Request, oom_message
from .sampling import GenerationError
from .slots import SlotPool

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "together", "rows")
# While a prompt is read, a decode step for the streaming replies is due once this many decode steps' worth of
# time went to the prompt: they keep ~57 % of the machine, their gaps stay under ~2 steps plus one layer.
PREFILL_SLICE = 0.75
IDLE_EXIT_S = 10.0  # an idle scheduler's thread ends; the next request starts another


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
    """Free what a failed step held, so the next one can run."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the three model calls


def embed_prompt(model: Any, ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings of `ids` ([1, n]) with image features scattered into their placeholders, as the
    model's own forward does it — once, so that the prompt can then be fed in chunks (the model's forward
    refuses a chunk that splits an image)."""
    embeds = model.get_input_embeddings()(ids)
    if features is not None:
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype))
    return embeds


def prefill(model: Any, embeds: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
    """Feed prompt positions `[start, start + n)`; the last position's logits ([1, vocab])."""
    positions = torch.arange(start, start + embeds.shape[1], device=embeds.device).unsqueeze(0)
    out = model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def decode(model: Any, pool: SlotPool, rows: list[Request], start: int) -> torch.Tensor:
    """One token for each of `rows` (pool rows `[start, start + len(rows))`); their logits ([n, vocab])."""
    device = pool.device
    positions = torch.tensor([r.pos for r in rows], device=device)
    view_len = max(r.capacity for r in rows)
    ids = torch.tensor([[r.last_token] for r in rows], device=device)
    # A 4D boolean mask is used as given (a 2D one would share one causal offset across rows).
    mask = (torch.arange(view_len, device=device)[None, :] <= positions[:, None])[:, None, None, :]
    cache = pool.view(start, start + len(rows), positions, view_len)
    out = model(input_ids=ids, position_ids=positions[:, None], attention_mask=mask, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def layer_owners(model: Any) -> dict[int, Scheduler]:
    """The schedulers running forwards on `model`, by thread. One pre-hook per decoder and vision layer is
    installed once per model and calls the scheduler of the thread running the forward (none: no-op), so
    engines that come and go never add or remove hooks while another thread may be inside a forward."""
    owners = getattr(model, "_dsvl_layer_owners", None)
    if owners is None:
        owners = {}

        def before_layer(module: Any, args: Any) -> None:
            scheduler = owners.get(threading.get_ident())
            if scheduler is not None:
                scheduler._on_layer()

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
                for layer in module:
                    layer.register_forward_pre_hook(before_layer)
        model._dsvl_layer_owners = owners
    return owners


# ---------------------------------------------------------------- one forward for all rows, or one per row?


class DecodePolicy:
    """Decode n rows in one forward ("together") or one forward per row ("rows")?

    On a GPU a step for 8 rows costs about one row's (the weights are read once). On some CPUs a small
    batched matrix product costs more than the rows one by one (measured 0.75-1.5× the aggregate speed of
    one row on a 2-core AVX2 machine). "auto" measures both as it runs, keeps whichever is cheaper per
    token at each batch size, and probes the other again every `probe_every` steps (context grows).
    Either way every reply gets a token per step: the fairness is the same.
    """

    def __init__(self, mode: str = "auto", probe_every: int = 40, alpha: float = 0.3):
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
        self.mode, self.probe_every, self.alpha = mode, probe_every, alpha
        self.single: float | None = None  # seconds of a one-row forward
        self.together: dict[int, float] = {}  # seconds of an n-row forward
        self._steps: dict[int, int] = {}

    def use_together(self, n: int) -> bool:
        if n == 1 or self.mode != "auto":
            return n == 1 or self.mode == "together"
        batched = self.together.get(n)
        if batched is None:
            return True  # measure it
        if self.single is None:
            return False  # measure one row alone
        better = batched <= n * self.single
        self._steps[n] = self._steps.get(n, 0) + 1
        return not better if self._steps[n] % self.probe_every == 0 else better

    def record(self, n: int, together: bool, seconds: float) -> None:
        """A step of n rows took `seconds` (all its forwards)."""
        def ema(old: float | None, new: float) -> float:
            return new if old is None else (1 - self.alpha) * old + self.alpha * new

        if n == 1 or not together:
            self.single = ema(self.single, seconds / n)
        else:
            self.together[n] = ema(self.together.get(n), seconds)

    def describe(self) -> str:
        return {"auto": "auto (one forward for all rows, or one per row where that measures faster)",
                "together": "one forward for all rows", "rows": "one forward per row"}[self.mode]


# ---------------------------------------------------------------- the scheduler


class Scheduler:
    """Owns the model: a line of requests in, tokens out; see the module docstring.

    `batch`: replies decoded together. `budget_bytes`: keys/values of the replies being written plus the
    reuse cache. `inline`: no thread of its own — consumers drive `step()` (ZeroGPU lends the GPU only
    inside the request's own call).
    """

    def __init__(self, handle: Any, batch: int, budget_bytes: int, queue_size: int, decode_mode: str = "auto",
                 chunk_tokens: int = 256, inline: bool = False):
        self.handle = handle
        self.model = handle.model
        self.store: reuse.ReuseCache = handle.reuse
        self.batch = max(1, int(batch))
        self.budget = int(budget_bytes)
        self.queue_size = int(queue_size)
        self.chunk_tokens = max(1, int(chunk_tokens))
        self.inline = inline
        kv_dtype = self.model.get_input_embeddings().weight.dtype
        layers = self.model.base_model.language_model.layers
        devices = [next(layer.parameters()).device for layer in layers]
        self.pool = SlotPool(self.model.config, handle.device, kv_dtype, devices)
        self.policy = DecodePolicy(decode_mode)
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []  # index = pool row
        self.background: deque[Callable[[], None]] = deque()  # encode-ahead jobs, run only when idle
        self.heartbeat = time.monotonic()  # last sign of progress (a layer started, a step ended)
        self.steps = 0  # decode steps run (for tests and meters)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        layer_owners(self.model)  # installs the layer hooks (once per model), before any thread runs forwards
        self._drive_lock = threading.Lock()
        self._yield_ok = False
        self._last_decode = 0.0
        self._step_s: float | None = None  # recent decode step time (the gap a stream sees when nobody prefills)
        self._joined = itertools.count()

    # ------------------------------------------------ any thread

    def add(self, request: Request) -> None:
        """Put a request in line (or refuse it when `queue_size` already wait)."""
        with self._cond:
            if len(self.waiting) >= self.queue_size:
                raise EngineBusy(f"The server is busy: {len(self.waiting)} requests are already waiting for the model "
                                 f"(at most {self.queue_size}); try again shortly.")
            self.waiting.append(request)
            request.stats.place_in_line = len(self.waiting)
            self._wake()

    def add_background(self, job: Callable[[], None]) -> None:
        with self._cond:
            self.background.append(job)
            self._wake()

    def wake(self) -> None:
        """Look again now (a request was cancelled)."""
        with self._cond:
            self._wake()

    def _wake(self) -> None:  # lock held
        self._cond.notify_all()
        if not self.inline and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsvl-engine", daemon=True)
            self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def drive(self, done: Callable[[], bool]) -> None:
        """Inline mode: run steps in the calling thread until `done()` (other consumers take turns)."""
        while not done():
            with self._drive_lock, self._hooks(), torch.inference_mode():
                if done():
                    return
                if not self.busy and not self.background:
                    return
                self.step()

    # ------------------------------------------------ the loop

    def _run(self) -> None:
        with self._hooks(), torch.inference_mode():
            while True:
                with self._cond:
                    while not (self.busy or self.background):
                        if not self._cond.wait(IDLE_EXIT_S) and not (self.busy or self.background):
                            self._thread = None
                            return
                self.step()

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        """Forwards run by this thread reach `_on_layer` before every decoder and vision layer."""
        owners, me = layer_owners(self.model), threading.get_ident()
        owners[me] = self
        try:
            yield
        finally:
            owners.pop(me, None)

    def _on_layer(self) -> None:
        """Before a layer runs: the heartbeat, and a decode step for the streaming replies when one is due."""
        now = time.monotonic()
        self.heartbeat = now
        if self._yield_ok and self.running and now - self._last_decode >= PREFILL_SLICE * (self._step_s or 0.0):
            self._yield_ok = False  # no nesting: this step's own layers come through here too
            try:
                self._decode_step()
            except Exception as exc:  # noqa: BLE001 - a decode bug must not fail the prefill it interrupted
                self._abort_running(exc)
            finally:
                self._yield_ok = True

    @contextlib.contextmanager
    def _yielding(self) -> Iterator[None]:
        """Decode steps may run inside the forwards in this block (only when some reply is decoding)."""
        self._yield_ok = bool(self.running)
        try:
            yield
        finally:
            self._yield_ok = False

    def step(self) -> None:
        """One turn of the loop; see the module docstring. Never raises: failures end their requests."""
        try:
            self._reap()
            self._admit()
            if self.prefilling is not None:
                self._prefill_step(self.prefilling)
            if self.running:
                self._decode_step()
            elif not self.busy and self.background:
                self._run_background()
            self.heartbeat = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a bug must not leave requests hanging
            if self.prefilling is not None:
                self.prefilling.finish(error=GenerationError(f"Generation failed: {type(exc).__name__}: {exc}"))
                self.prefilling = None
            self._abort_running(exc)

    def _abort_running(self, exc: BaseException) -> None:
        """An unexpected failure outside any one forward: end the replies it may have left half-done."""
        log.error("engine step failed", exc_info=exc)
        for request in self.running:
            request.finish(error=GenerationError(f"Generation failed: {type(exc).__name__}: {exc}"))
        self.running = []
        self.pool.free()
        self._reserve()

    # ------------------------------------------------ admission and memory

    def _reap(self) -> None:
        with self._cond:
            for request in [r for r in self.waiting if r.cancelled.is_set()]:
                self.waiting.remove(request)
                request.finish("stopped")
            self._number_the_line()
        if self.prefilling is not None and self.prefilling.cancelled.is_set():
            self.prefilling.finish("stopped")
            self.prefilling = None
            self._reserve()
        for request in [r for r in self.running if r.cancelled.is_set()]:
            self._leave(request, "stopped")

    def _number_the_line(self) -> None:  # lock held
        for place, request in enumerate(self.waiting, 1):
            request.stats.place_in_line = place

    def kv_need(self, request: Request) -> int:
        """Bytes of keys/values once `request` joins: the pool with its row, and its prefill cache meanwhile."""
        rows = [*self.running, request]
        pool = max(self.pool.nbytes, self.pool.bytes_for(len(rows), max(r.capacity for r in rows)))
        return pool + request.capacity * self.pool.bytes_per_token

    def kv_in_use(self) -> int:
        prefilling = self.prefilling.capacity * self.pool.bytes_per_token if self.prefilling else 0
        return self.pool.nbytes + prefilling

    def _reserve(self) -> None:
        """The reuse cache gives way to the replies being written (one budget, one device)."""
        self.store.reserve(self.kv_in_use())

    def _admit(self) -> None:
        if self.prefilling is not None or len(self.running) >= self.batch:
            return
        with self._cond:
            if not self.waiting:
                return
            request = self.waiting[0]
            if self.running and self.kv_need(request) > self.budget:
                return  # waits for memory, first in line: nobody runs out of memory for it
            self.waiting.popleft()
            self._number_the_line()
        request.started()
        self.prefilling = request
        try:
            inputs = model_inputs(self.model, request.inputs)
            t0 = time.perf_counter()
            with self._yielding():  # encoding images takes seconds on a CPU: the streams go on meanwhile
                request.plan = reuse.plan(self.model, self.store, inputs, request.spans, request.capacity)
            log.debug("admitted: %d prompt tokens, %d reused, %d image(s) encoded, %.3f s", request.prompt_tokens,
                      request.plan.reused_tokens, request.plan.images_encoded, time.perf_counter() - t0)
            self._reserve()
            plan = request.plan
            request.stats.reused_tokens, request.stats.images_reused = plan.reused_tokens, plan.images_reused
            request.cursor = request.stats.prefilled_tokens = plan.reused_tokens
            request.embeds = embed_prompt(self.model, inputs["input_ids"][:, plan.reused_tokens:], plan.features)
        except Exception as exc:  # noqa: BLE001 - ends this request only
            self._fail_prefill(request, exc)

    # ------------------------------------------------ prefill

    def _prefill_step(self, request: Request) -> None:
        start = request.cursor
        remaining = request.prompt_tokens - start
        # Alone, the whole prompt in one forward: exactly the computation of a reply alone.
        n = remaining if not self.running else min(remaining, self.chunk_tokens)
        offset = start - request.plan.reused_tokens
        try:
            t0 = time.perf_counter()
            with self._yielding():
                logits = prefill(self.model, request.embeds[:, offset: offset + n], start, request.plan.cache)
            log.debug("prefill: positions %d-%d of %d, %.3f s (decode steps inside it included)", start, start + n,
                      request.prompt_tokens, time.perf_counter() - t0)
            request.cursor = request.stats.prefilled_tokens = start + n
            if request.cursor < request.prompt_tokens:
                return
            token, raw = request.sampler.choose(request.history_view(), logits)
        except Exception as exc:  # noqa: BLE001 - ends this request only
            self._fail_prefill(request, exc)
            return
        self.prefilling = None
        request.embeds = None
        if request.accept(token, raw):
            self._join(request)
            return
        # One token was the whole reply (end of sentence, or max_new_tokens 1): keep its prompt for the next turn.
        cache = request.plan.cache
        self._reserve()
        self._keep(request, request.history[0, : request.prompt_tokens], reuse.kv_of(cache))
        request.finish()

    def _fail_prefill(self, request: Request, exc: BaseException) -> None:
        self.prefilling = None
        request.plan = request.embeds = None
        request.finish(error=self._as_error(exc, request))
        self._reserve()
        release_memory(self.pool.device)

    def _pool_shape(self, rows: int, length: int) -> tuple[int, int]:
        """The pool's shape for `rows` rows of `length` positions: as it is when it fits already, else grown
        by doubling its rows (up to --batch) where the budget allows, so that most joins copy nothing."""
        pool = self.pool
        if rows <= pool.rows and length <= pool.length:
            return pool.rows, pool.length
        length = max(length, pool.length)
        doubled = max(rows, min(self.batch, 2 * pool.rows))
        if pool.bytes_for(doubled, length) <= self.budget:
            return doubled, length
        return rows, length

    def _join(self, request: Request) -> None:
        """The prefilled request takes the next decode row."""
        n = len(self.running)
        rows = [*self.running, request]
        try:
            shape = self._pool_shape(n + 1, max(r.capacity for r in rows))
            self.pool.resize(*shape, n, max((r.pos for r in self.running), default=0))
            cache = request.plan.cache
            self.pool.write(n, [(layer.keys, layer.values) for layer in cache.layers], request.prompt_tokens)
        except Exception as exc:  # noqa: BLE001 - out of memory growing the pool ends the newcomer only
            request.plan = None
            request.finish(error=self._as_error(exc, request))
            if not self.running:
                self.pool.free()
            self._reserve()
            release_memory(self.pool.device)
            return
        request.plan = None
        request.row, request.pos, request.joined = n, request.prompt_tokens, next(self._joined)
        self.running.append(request)
        self._reserve()
        log.debug("joined: row %d of a pool of %d × %d positions", n, self.pool.rows, self.pool.length)

    # ------------------------------------------------ decode

    def _decode_step(self) -> None:
        for request in [r for r in self.running if r.cancelled.is_set()]:
            self._leave(request, "stopped")
        rows = list(self.running)
        if not rows:
            return
        together = self.policy.use_together(len(rows))
        groups = [(0, len(rows))] if together else [(i, i + 1) for i in range(len(rows))]
        t0 = time.perf_counter()
        ended: list[Request] = []
        for start, end in groups:
            try:
                self._forward_rows(rows, start, end, ended)
            except torch.OutOfMemoryError as exc:
                self._out_of_memory(exc)
                return  # the rows left are stepped again next time (positions did not move)
        elapsed = time.perf_counter() - t0
        log.debug("decode step: %d row(s) %s, %.3f s", len(rows), "together" if together else "one by one", elapsed)
        self.policy.record(len(rows), together, elapsed)
        self._step_s = elapsed if self._step_s is None else 0.7 * self._step_s + 0.3 * elapsed
        self._last_decode = time.monotonic()
        self.steps += 1
        for request in ended:
            if request in self.running:
                self._leave(request, None, request.error)

    def _forward_rows(self, rows: list[Request], start: int, end: int, ended: list[Request]) -> None:
        group = rows[start:end]
        try:
            logits = decode(self.model, self.pool, group, start)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - find whose it is: each row alone
            if len(group) > 1:
                for i in range(start, end):
                    self._forward_rows(rows, i, i + 1, ended)
                return
            group[0].error = self._as_error(exc, group[0])
            ended.append(group[0])
            return
        for i, request in enumerate(group):
            request.pos += 1
            token, raw = request.sampler.choose(request.history_view(), logits[i: i + 1])
            if not request.accept(token, raw):
                ended.append(request)

    def _out_of_memory(self, exc: BaseException) -> None:
        """Out of memory in a shared step: the newest joiner goes with the message, the others go on."""
        newest = max(self.running, key=lambda r: r.joined)
        self._leave(newest, None, self._as_error(exc, newest))

    def _leave(self, request: Request, reason: str | None, error: BaseException | None = None) -> None:
        """A reply ends: its keys/values go to the reuse cache (unless it failed), the last row takes its place."""
        row, last = request.row, len(self.running) - 1
        kept = None
        if error is None and self.store.enabled and request.pos:
            try:
                kept = (request.history[0, : request.pos], self.pool.read(row, request.pos))
            except torch.OutOfMemoryError:
                kept = None  # the reply is complete; losing its cache entry only costs speed
        if row != last:
            moved = self.running[last]
            self.pool.move(last, row, moved.pos)
            self.running[row], moved.row = moved, row
        self.running.pop()
        request.row = -1
        if not self.running:
            self.pool.free()
        self._reserve()
        if kept is not None:
            self._keep(request, *kept)
        request.finish(reason, error)
        if error is not None:
            release_memory(self.pool.device)

    def _keep(self, request: Request, ids: torch.Tensor, kv: reuse.KV) -> None:
        """Put this turn's keys/values back for the next turn (before the consumer hears the reply ended, so
        a client sending its next turn at once finds them)."""
        try:
            self.store.put_prefix(ids, request.spans, kv)
        except Exception:  # noqa: BLE001 - the reply is complete; losing its cache entry only costs speed
            log.exception("could not keep this turn for reuse")

    def _as_error(self, exc: BaseException, request: Request) -> GenerationError:
        if isinstance(exc, torch.OutOfMemoryError):
            self.store.clear()  # cached turns are the first memory to give back (the caller releases it)
            error: GenerationError = OutOfMemory(oom_message(request.prompt_tokens, request.stats.images,
                                                             request.params.max_new_tokens))
        elif isinstance(exc, GenerationError):
            return exc
        else:
            log.error("generation failed", exc_info=exc)
            error = GenerationError(f"Generation failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    # ------------------------------------------------ background work

    def _run_background(self) -> None:
        with self._cond:
            job = self.background.popleft() if self.background else None
        if job is None:
            return
        try:
            job()
        except torch.OutOfMemoryError:
            release_memory(self.pool.device)
        except Exception:  # noqa: BLE001 - background help only: the reply path reports real errors
            log.exception("background job failed")
