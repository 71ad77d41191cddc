"""The engine room's scheduler: one thread owns the model and every request's life.

Each turn of its loop (`step`):

1. **reap**: requests whose consumer asked to cancel (Stop, Clear, a closed tab, a dropped `/v1` client,
   a replica's Stop, the stall timeout) end now, whatever their status — a waiting one leaves the line
   and is never prefilled, a decoding one leaves its row;
2. **admit** the first request in line when the planner says it fits (`planner.admission`: a free row,
   and its memory reserved in the budget before it exists); it gets a row of the pool of its own, its
   reuse prefix is taken and its images encoded (`Runner.start_prefill`);
3. **prefill**: feed the planner's next piece of its prompt into its row — all of it when nobody else is
   decoding (exactly the computation of a reply alone), else `chunk_tokens`; when the prompt is read, its
   first token is picked and it joins the decoding rows (nothing is copied);
4. **decode**: plan (which rows each forward takes, how far they look back) → run (the forwards, every
   row's token picked together, one read of the tokens) → apply (each row accepts its token, detokenises,
   checks stop strings, or ends). Whatever fails in one row's forward, sampling or text ends that row only,
   with its own message; out of memory ends the newest joiner after the rows that ran are applied.

A prefill forward or image encode takes seconds on a CPU, far longer than a decode step, so the
scheduler hears of every layer (`_on_layer`, a hook installed by the runner): it is the heartbeat (a long
prefill is progress, not a stall), the moment a cancelled prefill stops (at its next layer, a lone
whole-prompt prefill too), and the chance to run a decode step for the streaming replies when one is
due — they keep flowing at about half their speed while a newcomer is read.

Memory: every byte of keys/values is reserved in one `Budget` before it is allocated; the reuse cache
gives way. A reply that ends gives its row back and its keys/values to the reuse cache; a request
cancelled or failed before its reply began gives back the reuse prefix it took.

Only this thread writes a request's status; nothing it runs can kill it: an unexpected error ends the
requests it may have left half-done, and a thread that dies anyway is started again while work waits.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import planner
from .budget import Budget
from .metrics import EngineMetrics, Gauges
from .planner import DECODE_MODES, DecodePolicy
from .request import EngineBusy, OutOfMemory, Request, as_generation_error, oom_message
from .runner import HeapTrimmer, Runner, layer_owners, model_inputs
from .sampling import GenerationError

log = logging.getLogger(__name__)

__all__ = ["DECODE_MODES", "DecodePolicy", "Scheduler", "layer_owners", "model_inputs"]

# While a prompt is read, a decode step for the streaming replies is due once this many decode steps' worth of
# time went to the prompt: they keep ~57 % of the machine, their gaps stay under ~2 steps plus one layer.
PREFILL_SLICE = 0.75
IDLE_EXIT_S = 10.0  # an idle scheduler's thread ends; the next request starts another
REAP_EVERY_S = 0.2  # during a long forward, the line is looked at this often (a cancelled wait leaves it)


class _Cancelled(Exception):
    """Raised inside a forward (at a layer) to stop the prefill of a request whose consumer cancelled it."""


class Scheduler:
    """Owns the model: a line of requests in, tokens out; see the module docstring.

    `batch`: replies decoded together. `budget_bytes`: keys/values of the replies being written plus the
    reuse cache. `inline`: no thread of its own — consumers drive `step()` (ZeroGPU lends the GPU only
    inside the request's own call).
    """

    def __init__(self, handle: Any, batch: int, budget_bytes: int, queue_size: int, decode_mode: str = "auto",
                 chunk_tokens: int = 256, inline: bool = False):
        self.handle = handle
        self.runner = Runner(handle)
        self.model = handle.model
        self.store = handle.reuse
        self.pool = self.runner.pool
        self.budget = Budget(budget_bytes, self.store)
        self.batch = max(1, int(batch))
        self.queue_size = int(queue_size)
        self.chunk_tokens = max(1, int(chunk_tokens))
        self.inline = inline
        self.policy = DecodePolicy(decode_mode, device=self.runner.device.type)
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []  # index = pool row
        self.background: deque[Callable[[], None]] = deque()  # encode-ahead jobs, run only when idle
        self.heartbeat = time.monotonic()  # last sign of progress (a layer started, a step ended)
        self.steps = 0  # decode steps run (for tests and meters)
        self.restarts = 0  # times the thread died and was started again (for tests and logs)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._drive_lock = threading.Lock()
        self._yield_ok = False  # a decode step may run inside the current forward
        self._in_decode = False  # a decode step is running (its layers are not a prefill's)
        self._stoppable = False  # the current forward is the prefilling request's: a cancel stops it
        self._last_decode = 0.0
        self._last_reap = 0.0
        self._step_s: float | None = None  # recent decode step time (the gap a stream sees when nobody prefills)
        self._joined = itertools.count()
        self.trimmer = HeapTrimmer()  # freed heap memory goes back to the system after requests end
        self.metrics = EngineMetrics(self.gauges)
        self._service_s: float | None = None  # recent time a request spends being answered (admitted → end)
        self._stopping = False
        # A daemon thread killed by the interpreter's exit inside a tensor operation aborts the process ("terminate
        # called without an active exception", exit 134): the thread ends its step and stops first.
        atexit.register(_stop_at_exit, weakref.ref(self))

    # ------------------------------------------------ any thread

    def add(self, request: Request) -> None:
        """Put a request in line (or refuse it when `queue_size` already wait)."""
        with self._cond:
            if len(self.waiting) >= self.queue_size:
                raise EngineBusy(f"The server is busy: {len(self.waiting)} requests are already waiting for the model "
                                 f"(at most {self.queue_size}); try again shortly.", self.retry_after_s())
            request.on_end = self._ended
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
        if not self.inline and self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="dsvl-engine", daemon=True)
            self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def retry_after_s(self) -> int:
        """When a refused request may find room: the line ahead of it, `batch` at a time, each taking about as long
        as the recent replies took (from their admission to their end); 1 s a request before any reply ended."""
        ahead = len(self.waiting) + 1
        if self._service_s is None:
            return max(1, min(ahead, 60))
        return max(1, min(3600, math.ceil(ahead / self.batch * self._service_s)))

    def gauges(self) -> Gauges:
        """The engine's state for a metrics scrape (read from any thread: a snapshot, not a lock)."""
        running, store = len(self.running), self.store.stats()
        return Gauges(running=running, waiting=len(self.waiting), prefilling=int(self.prefilling is not None),
                      decode_rows=running, kv_used_bytes=self.budget.reserved + store.nbytes,
                      kv_budget_bytes=self.budget.total, reuse_prefix_entries=store.prefix_entries,
                      reuse_image_entries=store.feature_entries, reuse_bytes=store.nbytes)

    def health(self, stalled_after_s: float) -> str | None:
        """Why the engine cannot take work now (None: it can): its thread died with work in hand, or it made no
        progress for `stalled_after_s` while busy (a wedged device)."""
        if self._stopping:
            return "the engine is shutting down"
        if not self.busy:
            return None
        thread = self._thread
        if not self.inline and (thread is None or not thread.is_alive()):
            return "the engine's thread is not running while requests wait"
        silent = time.monotonic() - self.heartbeat
        if silent > stalled_after_s:
            return f"the engine made no progress for {silent:.0f} s (a wedged device?)"
        return None

    def stop(self, timeout: float = 5.0) -> None:
        """End the engine's thread once its current step is done (the process is exiting); nothing runs after."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

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
        try:
            with self._hooks(), torch.inference_mode():
                while True:
                    with self._cond:
                        while not (self.busy or self.background) or self._stopping:
                            if self._stopping or (not self._cond.wait(IDLE_EXIT_S)
                                                  and not (self.busy or self.background)):
                                self._thread = None
                                return
                    self.step()
        except BaseException:  # noqa: BLE001 - step() contains failures; this is the last line of defence
            log.exception("the engine's thread died")
            with self._cond:
                self._thread = None
                self.restarts += 1
                if self.busy or self.background:
                    with contextlib.suppress(RuntimeError):  # (no new thread while the interpreter shuts down)
                        self._wake()  # never dead with requests waiting: a new thread takes over

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
        """Before a layer runs: the heartbeat; the line's cancellations; a cancelled prefill stops here; a decode
        step for the streaming replies when one is due."""
        now = time.monotonic()
        self.heartbeat = now
        if self._in_decode:
            return  # a decode step's own layers
        if now - self._last_reap >= REAP_EVERY_S:
            self._last_reap = now
            self._reap_line()
        if self._stoppable and self.prefilling is not None and self.prefilling.cancelled.is_set():
            raise _Cancelled
        if self._yield_ok:
            self._yield_ok = False  # no nesting: this step's own layers come through here too
            try:
                self._yield_point()
            finally:
                self._yield_ok = True

    def _yield_point(self) -> None:
        """Inside a long forward for the newcomer (its images, its prompt): a decode step for the streaming replies
        when one is due."""
        now = time.monotonic()
        self.heartbeat = now
        if self.running and now - self._last_decode >= PREFILL_SLICE * (self._step_s or 0.0):
            try:
                self._decode_step()
            except Exception as exc:  # noqa: BLE001 - a decode bug must not fail the newcomer it interrupted
                self._contain(exc, prefill_too=False)

    @contextlib.contextmanager
    def _prefill_forward(self) -> Iterator[None]:
        """A forward of the prefilling request: a cancel stops it at the next layer, and decode steps may run
        inside it (only when some reply is decoding)."""
        self._stoppable, self._yield_ok = True, bool(self.running)
        try:
            yield
        finally:
            self._stoppable = self._yield_ok = False

    def step(self) -> None:
        """One turn of the loop; see the module docstring. Never raises: failures end their requests."""
        try:
            self._reap()
            self._admit()
            if self.prefilling is not None:
                self._prefill_step(self.prefilling)
            if self.running:
                self._decode_step()
            elif self.background and not self.busy:
                self._run_background()
            self.heartbeat = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a bug must not leave requests hanging
            self._contain(exc)

    def _contain(self, exc: BaseException, prefill_too: bool = True) -> None:
        """An unexpected failure outside any one request's path: end the requests it may have left half-done
        (each on its own, so that one more failure cannot stop the rest) and start from a clean state (a decode
        step run inside a prefill leaves that prefill alone)."""
        log.error("engine step failed", exc_info=exc)
        victims = list(self.running)
        if prefill_too and self.prefilling is not None:
            victims.append(self.prefilling)
        for request in victims:
            try:
                request.finish("error", exc)
            except Exception:  # noqa: BLE001 - keep ending the others
                log.exception("could not end a request")
        self.running = []
        if prefill_too:
            self.prefilling = None
        with contextlib.suppress(Exception):
            if self.prefilling is None:
                self.pool.free()
                self.budget.reset()  # (a newcomer being read keeps its row and its reservations)
        with contextlib.suppress(Exception):
            self.runner.release_memory()

    # ------------------------------------------------ cancellations

    def _reap(self) -> None:
        self._reap_line()
        request = self.prefilling
        if request is not None and request.cancelled.is_set():
            self._end_prefill(request, request.cancel_reason or "stopped")
        for request in [r for r in self.running if r.cancelled.is_set()]:
            self._leave(request, request.cancel_reason or "stopped")

    def _reap_line(self) -> None:
        """Cancelled requests leave the line (never prefilled); the others move up."""
        with self._cond:
            gone = [r for r in self.waiting if r.cancelled.is_set()]
            for request in gone:
                self._end(request, request.cancel_reason or "stopped")  # finished before it leaves the line
                self.waiting.remove(request)
            if gone:
                self._number_the_line()

    def _number_the_line(self) -> None:  # lock held
        for place, request in enumerate(self.waiting, 1):
            request.stats.place_in_line = place

    # ------------------------------------------------ admission

    def _geometry(self) -> planner.PoolGeometry:
        pool = self.pool
        return planner.PoolGeometry(pool.rows, pool.length, pool.bytes_per_token, self.runner.align, pool.n_layers)

    def need(self, request: Request) -> planner.Need:
        """What `request` needs reserved to be read into a row of its own beside the rows running now."""
        return planner.need(self._geometry(), [r.capacity for r in self.running], request.capacity,
                            len(request.spans) * self.runner.feature_bytes_per_image)

    def _admit(self) -> None:
        if self.prefilling is not None or len(self.running) >= self.batch:
            return
        with self._cond:
            if not self.waiting:
                return
            request = self.waiting[0]
            needed = self.need(request)
            if not planner.admission(len(self.running), False, self.batch, needed, self.budget.room()):
                return  # waits for memory, first in line: nobody runs out of memory for it
            self.waiting.popleft()
            self.prefilling = request  # in the same breath: the engine never looks idle with it in hand
            self._number_the_line()
        request.started()
        self.metrics.admitted(request)
        owner = ("prefill", id(request))
        self.budget.hold({owner: needed.features})  # before its features exist
        try:
            request.row = self._grow_for(request)  # its row, reserved before it exists
            with self._prefill_forward():  # encoding images takes seconds on a CPU: the streams go on meanwhile
                self.runner.start_prefill(request, self.budget, ("taken", id(request)))
            request.stats.reused_tokens, request.stats.images_reused = request.plan.reused_tokens, request.plan.images_reused
            request.stats.prefilled_tokens = request.cursor
            self.metrics.read(request)
        except _Cancelled:
            self._end_prefill(request, request.cancel_reason or "stopped")
        except Exception as exc:  # noqa: BLE001 - ends this request only
            self._end_prefill(request, error=exc)

    def _grow_for(self, request: Request) -> int:
        """A row of the pool for `request` (the pool grows where it must, reserved first); its index."""
        n = len(self.running)
        geometry = self._geometry()
        # Bytes the pool may grow by: the budget less everything else reserved, less the copy's transient.
        room = self.budget.room(replacing=("pool",)) - self.pool.nbytes - geometry.resize_transient
        # Rows are taken ahead, for the requests already waiting and (with memory nobody uses) beyond: on a GPU by
        # doubling; on a CPU all --batch rows at once — pages are taken only when first written there, and every
        # growth copies the rows kept at memory speed (0.76 s for a 4th row of the 1.3B: a gap in every stream).
        shape = planner.pool_target(geometry, n + 1, max(r.capacity for r in [*self.running, request]), self.batch,
                                    room, spare=room - self.store.nbytes, coming=len(self.waiting),
                                    all_rows_at_once=self.pool.device.type == "cpu")
        grown = self.pool.bytes_for(*shape)
        transient = geometry.resize_transient if grown != self.pool.nbytes else 0
        self.budget.hold({"pool": grown + transient})
        self.pool.resize(*shape, n, max((r.pos for r in self.running), default=0))
        self.budget.hold({"pool": self.pool.nbytes})
        return n

    # ------------------------------------------------ prefill

    def _prefill_step(self, request: Request) -> None:
        n = planner.prefill_piece(request.cursor, request.prompt_tokens, bool(self.running), self.chunk_tokens)
        try:
            t0 = time.perf_counter()
            with self._prefill_forward():
                logits = self.runner.prefill(request, n)
            log.debug("prefill: positions %d-%d of %d, %.3f s (decode steps inside it included)", request.cursor,
                      request.cursor + n, request.prompt_tokens, time.perf_counter() - t0)
            request.cursor = request.stats.prefilled_tokens = request.cursor + n
            if request.cursor < request.prompt_tokens:
                return
            tokens, raw = self.runner.sample([request], logits)
            token = self.runner.read([tokens[0]])[0]
            end = request.accept(token, raw[0])
            self.metrics.token(request)
        except _Cancelled:
            self._end_prefill(request, request.cancel_reason or "stopped")
            return
        except Exception as exc:  # noqa: BLE001 - ends this request only, at once
            self._end_prefill(request, error=exc)
            return
        if end is None:
            self._join(request)
        else:  # one token was the whole reply (end of sentence, max_new_tokens 1): keep its prompt for the next turn
            self._end_prefill(request, end, keep=True)

    def _end_prefill(self, request: Request, reason: str = "error", error: BaseException | None = None,
                     keep: bool = False) -> None:
        """The prefilling request ends before joining: its row and reservations go; with `keep`, its prompt's
        keys/values go to the reuse cache, else the prefix it took goes back there (unless memory ran out)."""
        taken, row = request.taken, request.row
        request.plan = request.embeds = request.taken = None
        request.row = -1
        owners = (("prefill", id(request)), ("taken", id(request)), ("keep", id(request)))
        kept = None
        if keep and row >= 0 and self.store.enabled and self.budget.try_hold(
                ("keep", id(request)), request.prompt_tokens * self.pool.bytes_per_token):
            with contextlib.suppress(torch.OutOfMemoryError):  # losing a cache entry only costs speed
                kept = self.pool.read(row, request.prompt_tokens)
        if not self.running:
            self.pool.free()  # its row was the only one in use
        self.budget.hold({"pool": self.pool.nbytes, **dict.fromkeys(owners, 0)})
        if kept is not None:
            self._keep(request, request.history[0, : request.prompt_tokens], kept)
        elif taken is not None and not isinstance(error, torch.OutOfMemoryError):
            self.store.give_back(taken)  # its conversation's next turn still finds it
            self.budget.note()
        self._end(request, reason, error)
        self.prefilling = None  # after it is finished: nobody sees the engine idle with it unfinished

    def _join(self, request: Request) -> None:
        """The prefilled request joins the decoding rows. Its prompt is already in its row: nothing is copied, unless
        replies that ended meanwhile left a lower row free."""
        row = request.row
        if row != len(self.running):
            try:
                self.pool.move(row, len(self.running), request.prompt_tokens, zero_rest=True)
            except Exception as exc:  # noqa: BLE001 - out of memory here ends the newcomer only
                self._end_prefill(request, error=exc)
                return
            row = len(self.running)
        request.plan = request.embeds = request.taken = None  # the prefix it took lives on in its row
        self.budget.release(("prefill", id(request)), ("taken", id(request)))
        request.row, request.pos, request.joined = row, request.prompt_tokens, next(self._joined)
        request.decoding()
        self.running.append(request)
        self.prefilling = None
        log.debug("joined: row %d of a pool of %d × %d positions", row, self.pool.rows, self.pool.length)

    # ------------------------------------------------ decode: plan → run → apply

    def _decode_step(self) -> None:
        self._in_decode = True
        try:
            self._decode()
        finally:
            self._in_decode = False

    def _decode(self) -> None:
        for request in [r for r in self.running if r.cancelled.is_set()]:
            self._leave(request, request.cancel_reason or "stopped")
        rows = list(self.running)
        if not rows:
            return
        # plan
        together = self.policy.use_together(len(rows))
        groups = planner.decode_groups(len(rows), together)
        # run
        timer = self.runner.timer()
        chosen: list[tuple[Request, torch.Tensor, torch.Tensor]] = []  # (row, its token on the device, its logits)
        failed: dict[Request, BaseException] = {}
        oom: torch.OutOfMemoryError | None = None
        for start, end in groups:
            try:
                self._run_rows(rows, start, end, chosen, failed)
            except torch.OutOfMemoryError as exc:
                oom = exc
                break  # rows not run keep their positions: they are stepped again next time
        values = self.runner.read([token for _, token, _ in chosen])
        timer.stop()
        if oom is None:
            seconds = timer.seconds
            log.debug("decode step: %d row(s) %s, %.3f s", len(rows), "together" if together else "one by one", seconds)
            self.policy.record(len(rows), together, seconds)
            self._step_s = seconds if self._step_s is None else 0.7 * self._step_s + 0.3 * seconds
        self._last_decode = time.monotonic()
        self.steps += 1
        # apply: each row on its own
        ended: list[tuple[Request, str]] = []
        for (request, _, raw), token in zip(chosen, values, strict=True):
            request.pos += 1
            try:
                end = request.accept(token, raw)
            except Exception as exc:  # noqa: BLE001 - its text failed: this reply ends, the others go on
                failed[request] = exc
                continue
            self.metrics.token(request)
            if end is not None:
                ended.append((request, end))
        for request, end in ended:
            self._leave(request, end)
        for request, exc in failed.items():
            if request in self.running:
                self._leave(request, "error", exc)
        if oom is not None and self.running:
            newest = self.running[planner.newest([r.joined for r in self.running])]
            self._leave(newest, "error", oom)

    def _run_rows(self, rows: list[Request], start: int, end: int,
                  chosen: list[tuple[Request, torch.Tensor, torch.Tensor]], failed: dict[Request, BaseException]) -> None:
        """Forward and pick tokens for rows `[start, end)`; a failure that is not out of memory is traced to its
        row by running the rows one by one."""
        group = rows[start:end]
        try:
            view_len = planner.view_length([r.pos for r in group], [r.capacity for r in group], self.pool.length)
            logits = self.runner.decode(group, start, view_len)
            tokens, raw = self.runner.sample(group, logits)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - find whose it is: each row alone
            if len(group) > 1:
                for i in range(start, end):
                    self._run_rows(rows, i, i + 1, chosen, failed)
            else:
                failed[group[0]] = exc
            return
        for i, request in enumerate(group):
            chosen.append((request, tokens[i], raw[i] if request.logits is not None else None))

    def _leave(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        """A reply ends: its keys/values go to the reuse cache (a failed one keeps only the prefix it reused) before
        its consumer hears that it ended; then the last row takes its place (nobody sees the engine idle while a
        reply it held is not finished yet)."""
        row = request.row
        length = request.pos if error is None else request.stats.reused_tokens
        if (length and self.store.enabled and not isinstance(error, torch.OutOfMemoryError)
                and self.budget.try_hold(("keep", id(request)), length * self.pool.bytes_per_token)):
            kept = None
            with contextlib.suppress(torch.OutOfMemoryError):  # losing its cache entry only costs speed
                kept = (request.history[0, :length], self.pool.read(row, length))
            self.budget.release(("keep", id(request)))
            if kept is not None:
                self._keep(request, *kept)
        self._end(request, reason, error)
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.pool.move(last, row, moved.pos)
            self.running[row], moved.row = moved, row
        self.running.pop()
        request.row = -1
        if not self.running and self.prefilling is None:
            self.pool.free()  # (a newcomer being read keeps its row)
        self.budget.hold({"pool": self.pool.nbytes})

    def _end(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        """A request ends here: with its reason, or with its error (memory released after a failure)."""
        if error is not None:
            request.finish("error", self._as_error(error, request))
            self.runner.release_memory()
        else:
            request.finish(reason)
        self.trimmer.poke()

    def _ended(self, request: Request) -> None:
        """As a request finishes: its metrics, and the service time the next Retry-After is estimated from."""
        try:
            self.metrics.ended(request)
        except Exception:  # noqa: BLE001 - the reply is over: a metric must not fail it
            log.exception("could not count a finished request")
        if request.admitted:
            served = max(0.0, request.stats.total_s - request.stats.queued_s)
            self._service_s = served if self._service_s is None else 0.8 * self._service_s + 0.2 * served

    def _keep(self, request: Request, ids: torch.Tensor, kv: Any) -> None:
        """Put this turn's keys/values back for the next turn (before the consumer hears the reply ended, so
        a client sending its next turn at once finds them)."""
        try:
            self.store.put_prefix(ids, request.spans, kv)
        except Exception:  # noqa: BLE001 - the reply is complete; losing its cache entry only costs speed
            log.exception("could not keep this turn for reuse")
        self.budget.note()

    def _as_error(self, exc: BaseException, request: Request) -> GenerationError:
        if isinstance(exc, torch.OutOfMemoryError):
            self.store.clear()  # cached turns are the first memory to give back (the caller releases it)
            error: GenerationError = OutOfMemory(oom_message(request.prompt_tokens, request.stats.images,
                                                             request.params.max_new_tokens))
            error.__cause__ = exc
            return error
        if not isinstance(exc, GenerationError):
            log.error("generation failed", exc_info=exc)
        return as_generation_error(exc)

    # ------------------------------------------------ background work

    def _run_background(self) -> None:
        with self._cond:
            job = self.background.popleft() if self.background else None
        if job is None:
            return
        try:
            job()
        except torch.OutOfMemoryError:
            self.runner.release_memory()
        except Exception:  # noqa: BLE001 - background help only: the reply path reports real errors
            log.exception("background job failed")
        self.budget.note()

    # ------------------------------------------------ for tests: memory truth

    def accounting_holds(self) -> bool:
        """Whether what is really allocated (the pool, the prefix the newcomer took, the reuse cache) is within what
        the budget accounts for."""
        request = self.prefilling
        taken = request.taken.nbytes if request is not None and request.taken is not None else 0
        return self.pool.nbytes + taken + self.store.nbytes <= self.budget.accounted


def _stop_at_exit(scheduler: weakref.ref) -> None:
    if (alive := scheduler()) is not None:
        alive.stop()
