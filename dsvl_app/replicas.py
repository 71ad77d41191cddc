"""Beyond one machine: the engine as Ray Serve replicas behind this process's UI, /chat, /v1 and MCP.

Imported only with `--replicas` / `--ray-address`; without them Ray is never imported and nothing here runs.

- `EngineReplica`, a Serve deployment: each replica loads the model once and runs the engine room (its
  batching scheduler and its own reuse cache); `generate` streams one reply's events back through a
  deployment handle, and its cancellation (Stop, a closed tab, a dropped /v1 client) stops the reply there.
- `AffinityRouter`, Serve's request router: a conversation's next turn goes to the replica that served its
  earlier turns — matched by hashes of the prompt's prefix, made from the same content the reuse cache keys
  on (token ids and image hashes) — unless that replica is much busier than the least busy one; a new
  conversation goes to the least busy.
- `RemoteEngine` / `RemoteReply`: the engine's interface for the front door. The prompt is built and encoded
  here with the processor (no weights in this process); its tensors travel to a replica; text and stats come
  back. Nothing above the engine knows whether it is local or remote.
- `MetricsHub`: a small named actor the front door starts; every replica sends it its metrics and health every
  `REPORT_S`, and the front door's `/metrics` (each sample labelled `replica`) and `/health` (replicas healthy
  of total) read it — one scrape target for the whole service (docs/scaling.md says why).
- `start` / `Cluster.shutdown`: a local Ray instance (or a cluster at `--ray-address`), Serve without its HTTP
  proxy (the front door is gradio's server), and a clean shutdown that leaves no Ray process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from . import conversation as conv
from . import reuse
from .engine import END, POLL_S, Engine, Prepared, ReplyStream, default_batch, prepare
from .grammar import SchemaError
from .media import load_image
from .metrics import EngineMetrics, merge
from .model import ModelHandle, ModelLoadError, get_model, resolve_device, resolve_model_id, resolve_source
from .request import EngineBusy, GenerationStats, GenerationTimeout, OutOfMemory, as_generation_error
from .reuse import ReuseCache
from .sampling import GenerationError, GenerationParams
from .settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "dsvl-chat"
ROOT = Path(__file__).resolve().parent.parent
MAX_IMBALANCE = 4  # "much busier": this many more replies in flight than the least busy replica
HEALTH_CHECK_S = 2.0  # how often Serve checks a replica (a dead one is replaced after this)
SEND_EVERY_S = 0.02  # a replica sends a reply's new text at most this often (tokens in between go together)
FIRST_EVENT_S = 60.0  # a replica acknowledges a request at once; longer means no replica could take it
REPLICA_DIED = ("The engine replica writing this reply stopped (its process ended), so the reply is cut here. Your "
                "conversation is kept: send the message again and a healthy replica answers.")
ERRORS = {cls.__name__: cls for cls in (GenerationError, GenerationTimeout, OutOfMemory, EngineBusy, SchemaError)}
ERRORS["BackPressure"] = EngineBusy  # Serve's own line (in this process) was full
HUB_NAME = "dsvl-metrics-hub"
REPORT_S = 2.0  # how often a replica sends its metrics and health to the hub
REPORT_STALE_S = 10.0  # a replica silent this long is not healthy (dead, or wedged beyond sending)


# ---------------------------------------------------------------- what operators see


@ray.remote(num_cpus=0)
class MetricsHub:
    """The replicas' latest metrics and health, as each last sent them (a named actor in the app's namespace)."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[bytes, str | None, float]] = {}

    def report(self, replica: str, text: bytes, problem: str | None) -> None:
        self.reports[replica] = (text, problem, time.time())

    def read(self) -> dict[str, tuple[bytes, str | None, float]]:
        return self.reports


# ---------------------------------------------------------------- the replica


class EngineReplica:
    """One engine on one device (a Serve replica): loads the model once and batches the replies sent to it."""

    def __init__(self, settings: Settings, threads: int | None = None, hub: str | None = HUB_NAME):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if threads:
            torch.set_num_threads(threads)  # its share of the CPUs: replicas side by side must not oversubscribe
        self.engine = Engine(get_model(settings), settings)
        context = serve.get_replica_context()
        self.name = f"{context.replica_id.unique_id}"
        self._stop = threading.Event()
        if hub:
            threading.Thread(target=self._report, args=(hub,), name="dsvl-metrics-report", daemon=True).start()
        log.info("replica %s ready (pid %d): %s", self.name, os.getpid(), self.engine.describe())

    def _report(self, hub_name: str) -> None:
        """Send this replica's metrics and health to the front door's hub every REPORT_S (fire and forget)."""
        hub = None
        while True:
            try:
                hub = hub or ray.get_actor(hub_name, namespace=APP_NAME)
                problem, _ = self.engine.health()
                hub.report.remote(self.name, self.engine.metrics_text(), problem)
            except Exception as exc:  # noqa: BLE001 - no hub yet, or gone (the app is stopping): try again later
                hub = None
                log.debug("metrics report failed: %r", exc)
            if self._stop.wait(REPORT_S):
                return

    def __del__(self) -> None:
        self._stop.set()

    def info(self) -> dict[str, Any]:
        """What the front door needs to know: the model, its limits and this replica's identity."""
        handle, engine = self.engine.handle, self.engine
        return {
            "replica": self.name, "pid": os.getpid(), "batch": engine.batch, "describe": engine.describe(),
            "sampling_defaults": engine.sampling_defaults, "vocab_size": engine.vocab_size,
            "source": handle.source, "label": handle.label, "model_type": handle.model_type,
            "device": str(handle.device), "dtype": str(handle.dtype).removeprefix("torch."),
            "dtype_reason": handle.dtype_reason, "context_tokens": handle.context_tokens,
            "offline_fallback": handle.offline_fallback, "fallback_reason": handle.fallback_reason,
            "quantized": handle.quantized, "kv_budget_bytes": handle.kv_budget_bytes,
            "cache_reason": handle.cache_reason, "reuse_bytes": handle.reuse.capacity_bytes,
        }

    def status(self, affinity: Sequence[str] = ()) -> dict[str, Any]:
        """This replica's name, process and replies in hand (running or waiting); `affinity` routes the call to
        the replica holding that conversation."""
        scheduler = self.engine.scheduler
        return {"replica": self.name, "pid": os.getpid(), "replies": len(scheduler.running) + len(scheduler.waiting)}

    async def generate(self, prepared: Prepared, params: GenerationParams, stop: Sequence[str] = (),
                       affinity: Sequence[str] = (), surface: str = "other") -> AsyncIterator[tuple]:
        """One reply's events: ("accepted" | "text" | "tick" | "end", text, stats) or ("error", class, message,
        retry_after_s).

        `affinity` is read by the router only; `surface` labels the reply's metrics. Cancelling this generator (the
        caller's Stop) stops the reply.
        """
        try:
            with self.engine.counting_refusals(surface):
                reply = self.engine.enqueue(prepared, params, stop, surface=surface)
        except GenerationError as exc:
            yield ("error", type(exc).__name__, str(exc), getattr(exc, "retry_after_s", None))
            return
        reply.stats.replica = self.name
        try:
            yield ("accepted", "", reply.stats)
            # Tokens are sent in bunches of at most SEND_EVERY_S: each event crosses processes, and one per token
            # would cost the front door more CPU than the reply. A quiet reply (waiting in line, reading its prompt)
            # still says so every POLL_S, so that its place in line moves and a silent replica stands out.
            pending, sent = "", 0.0
            async for piece in reply.aiter(SEND_EVERY_S, ticks=True):
                pending += piece or ""
                now = time.monotonic()
                if pending and (piece is None or now - sent >= SEND_EVERY_S):
                    yield ("text", pending, reply.stats)
                    pending, sent = "", now
                elif piece is None and now - sent >= POLL_S:
                    yield ("tick", "", reply.stats)
                    sent = now
            if pending:
                yield ("text", pending, reply.stats)
            yield ("end", "", reply.stats)
        except GenerationError as exc:
            yield ("error", type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001 - one reply's failure, reported to its caller only
            log.exception("reply failed in replica %s", self.name)
            yield ("error", "GenerationError", str(as_generation_error(exc)))
        finally:
            reply.close()  # a cancelled generator (Stop) ends here: the engine drops the request


# ---------------------------------------------------------------- the router


class AffinityRouter(RequestRouter):
    """Sends a conversation's next turn to the replica holding its earlier turns (see the module docstring).

    It runs where the deployment handle is (the front door) and sees each call's `affinity` keyword: the
    prompt's prefix hashes (reuse.prefix_hashes). It remembers which replica served each hash; the longest
    remembered prefix wins unless that replica has `max_imbalance` more replies in flight than the least
    busy one. Without a match, Serve's own choice among all replicas (the shortest queue) applies.
    """

    # How long a replica has to say how many requests it holds before Serve skips it for the next one in this
    # router's ranking (Serve's default is 0.1 s, doubling to 1 s). A replica whose CPU is busy computing can
    # miss 0.1 s, and a skipped replica means a turn recomputed away from its conversation, or a new one sent
    # to a busier replica; waiting longer costs nothing when replicas answer at once.
    queue_len_response_deadline_s = 0.5
    max_queue_len_response_deadline_s = 2.0

    def initialize_state(self, max_imbalance: int = MAX_IMBALANCE, max_hashes: int = 200_000, **_: Any) -> None:
        self._max_imbalance = int(max_imbalance)
        self._max_hashes = int(max_hashes)
        self._owner: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix hash → the replica that last served it
        self._in_flight: Counter[ReplicaID] = Counter()  # replies this router sent and not yet completed
        self._lock = threading.Lock()  # a result's done callback runs on one of Ray's threads
        self._turn = 0  # round robin among equally busy replicas

    def _load(self, replica: RunningReplica) -> int:
        return self._in_flight[replica.replica_id]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hashes = (pending_request.kwargs.get("affinity") if pending_request is not None else None) or ()
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        least = min(self._load(replica) for replica in candidate_replicas)
        for digest in reversed(hashes):  # the longest prefix this router has seen served
            owner = by_id.get(self._owner.get(digest))  # type: ignore[arg-type]
            if owner is None:
                continue
            if self._load(owner) - least >= self._max_imbalance:
                break  # much busier: balance the load instead (the reply is recomputed there)
            rest = [replica for replica in candidate_replicas if replica is not owner]
            return [[owner], *self._by_load(rest, rotate=False)]
        return self._by_load(candidate_replicas, rotate=True)

    def _by_load(self, replicas: list[RunningReplica], rotate: bool) -> list[list[RunningReplica]]:
        """The replicas, least busy first: fewest replies in flight (this router's own count, exact at once);
        among equally busy ones, in turn for each new conversation (`rotate`) — so that conversations spread
        even when each reply is short."""
        if not replicas:
            return []
        ranked = sorted(replicas, key=lambda r: (self._load(r), r.replica_id.unique_id))
        tied = sum(1 for r in ranked if self._load(r) == self._load(ranked[0]))
        self._turn += rotate
        first = self._turn % tied
        ranked[:tied] = ranked[first:tied] + ranked[:first]
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        # A reply is counted here and released by its own result's completion, not by on_request_completed:
        # Serve calls that hook for attempts a full replica refused (never routed here), and a reply that ends
        # before the router has read its acceptance (a status call, a short reply on a busy router) gets it
        # *before* this one — either way a count would be left wrong for good and steer new conversations away
        # from an idle replica. A result's done callback fires once, at once if it is already done.
        with self._lock:
            self._in_flight[replica_id] += 1
        result.add_done_callback(lambda _: self._release(replica_id))
        for digest in pending_request.kwargs.get("affinity") or ():
            self._owner[digest] = replica_id
            self._owner.move_to_end(digest)
        while len(self._owner) > self._max_hashes:
            self._owner.popitem(last=False)

    def _release(self, replica_id: ReplicaID) -> None:
        with self._lock:
            if self._in_flight[replica_id] > 0:  # 0 once the replica died (its count went with it)
                self._in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        with self._lock:
            self._in_flight.pop(replica_id, None)
        # Its conversations start afresh elsewhere (their keys/values died with it).
        for digest in [digest for digest, owner in self._owner.items() if owner == replica_id]:
            del self._owner[digest]


# ---------------------------------------------------------------- the front door's side


class NoPrefetch:
    """Encode-on-attach needs the model in this process; with replicas, images are encoded by their reply."""

    def submit(self, paths: Any) -> int:
        return 0


class RemoteReply(ReplyStream):
    """A reply written by a replica, read like a local one (`ReplyStream`): a thread pumps the replica's events
    into the stream's items; a replica that dies mid-reply ends it with a specific error, and silence for the
    stall timeout ends it too. `cancel` cancels the replica's generator, which asks its engine to stop."""

    def __init__(self, engine: RemoteEngine, prepared: Prepared, params: GenerationParams, stop: Sequence[str],
                 affinity: Sequence[str], surface: str = "other"):
        super().__init__(engine.limits.token_timeout_s)
        self.engine, self.surface = engine, surface
        self.prompt, self.inputs = prepared.prompt, prepared.inputs
        self.stats = GenerationStats(prompt_tokens=int(prepared.inputs["input_ids"].shape[-1]),
                                     images=len(prepared.keys))
        self._notify: Callable[[], None] | None = None
        self._closed = threading.Event()
        # Images travel as the processor's tensors (in `inputs`); the prompt's images stay here.
        self._call = lambda: engine.deployment.options(stream=True).generate.remote(
            dataclasses.replace(prepared, prompt=None), params, tuple(stop), affinity=tuple(affinity), surface=surface)
        first = self._start()
        if first[0] == "error" and first[1] == "ReplicaDied":
            # The replica died before it began (Serve had not noticed yet): nothing was written, so try once more.
            log.warning("an engine replica was gone before a reply began: sending it to another one")
            self._items, self._closed = queue.Queue(), threading.Event()
            first = self._start()
        self._read(first)

    def _start(self) -> tuple:
        """Send the request and wait for the replica to take it, so that a full line is refused here as it is
        in-process (a 429). Returns the first event."""
        self._response = self._call()
        threading.Thread(target=self._pump, args=(self._response, self._items), name="dsvl-replica-stream",
                         daemon=True).start()
        first = self._next(FIRST_EVENT_S)
        if first is None:
            self.cancel()
            self.engine.metrics.refuse("busy", self.surface)  # (a replica counts its own refusals)
            raise EngineBusy("No engine replica took the request within "
                             f"{FIRST_EVENT_S:.0f} s: every replica is busy or starting. Try again shortly.",
                             retry_after_s=FIRST_EVENT_S)
        return first

    def _pump(self, response: Any, events: queue.Queue) -> None:
        try:
            for event in response:
                self._put(events, event)
        except Exception as exc:  # noqa: BLE001 - told to the consumer as a specific error
            self._put(events, _failure_event(exc, self._closed.is_set()))
        finally:
            self._put(events, ("closed", "", None))

    def _put(self, events: queue.Queue, event: tuple) -> None:
        events.put(event)
        if (notify := self._notify) is not None:
            notify()

    # -- ReplyStream

    @property
    def finished(self) -> bool:
        return self.stats.finished or self._closed.is_set()

    def cancel(self, reason: str = "stopped") -> None:
        """Stop this reply: cancelling the replica's generator closes its reply there, which asks its engine."""
        if not self._closed.is_set():
            self._closed.set()
            if ray.is_initialized():  # (after shutdown a call would start a new Ray instance)
                self._response.cancel()

    def _read(self, event: tuple) -> Any:
        kind, payload, extra, *more = event
        if kind == "error":
            self.stats.stop_reason = "error" if payload != "GenerationTimeout" else "timeout"
            if payload == "ReplicaDied":
                raise GenerationError(REPLICA_DIED)
            if payload == "BackPressure":
                self.engine.metrics.refuse("busy", self.surface)
            if ERRORS.get(payload) is EngineBusy:
                raise EngineBusy(extra, retry_after_s=(more and more[0]) or self.engine.retry_after_s())
            raise ERRORS.get(payload, GenerationError)(extra)
        if extra is not None:
            replica = self.stats.replica or extra.replica
            self.stats = dataclasses.replace(extra, replica=replica)
        if kind in ("end", "closed"):
            if not self.stats.finished:
                # Cancelled from here: the replica's engine ends it, but its last word cannot come back any more.
                self.stats.stop_reason = "stopped"
            return END
        return payload

    def _stalled(self) -> GenerationTimeout:
        self.cancel("timeout")
        self.stats.stop_reason = "timeout"
        return GenerationTimeout(f"Generation stalled: no word from the engine replica for {self.timeout_s:.0f} s, "
                                 "so the reply was stopped.")

    def _listen(self, notify: Callable[[], None] | None) -> None:
        self._notify = notify


def _failure_event(exc: BaseException, cancelled: bool) -> tuple:
    """A Ray failure as the error the consumer sees."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, TaskCancelledError
    from ray.serve.exceptions import BackPressureError, RequestCancelledError

    if cancelled or isinstance(exc, (RequestCancelledError, TaskCancelledError, asyncio.CancelledError)):
        return ("closed", "", None)
    if isinstance(exc, BackPressureError):
        return ("error", "BackPressure", "Too many requests are waiting for the engine replicas: try again shortly.")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return ("error", "ReplicaDied", "")
    log.error("replica stream failed: %r", exc)
    return ("error", "GenerationError", f"Generation failed in an engine replica: {type(exc).__name__}")


class RemoteEngine:
    """The engine's interface in the front door, backed by Serve replicas (see the module docstring)."""

    def __init__(self, handle: ModelHandle, settings: Settings, deployment: Any, replicas: int, info: dict,
                 cluster: Cluster):
        self.handle, self.settings, self.limits = handle, settings, settings.limits
        self.deployment, self.replicas, self.info, self.cluster = deployment, replicas, info, cluster
        self.batch = replicas * info["batch"]  # replies written at once, all replicas together
        self.batch_reason = f"{replicas} replicas × {info['batch']}"
        self.sampling_defaults = info["sampling_defaults"]
        self.vocab_size = info["vocab_size"]
        self.preamble = preamble_tokens(handle.processor)
        self.metrics = EngineMetrics()  # what the front door refuses itself (each replica counts the rest)
        self.hub = MetricsHub.options(name=HUB_NAME, namespace=APP_NAME, get_if_exists=True).remote()

    def describe(self) -> str:
        return (f"{self.replicas} engine replica(s) on Ray Serve, each {self.info['describe']}; a conversation's "
                "turns go to the replica holding its earlier ones")

    remote = True  # its metrics and health are Ray calls: asked from a worker thread (ops.py)

    def submit(self, turns: Sequence[conv.Turn], params: GenerationParams, *, new: conv.Turn | None = None,
               stop: Sequence[str] = (), load: Callable[..., Any] = load_image,
               record_logits: bool = False, surface: str = "other") -> RemoteReply:
        """As Engine.submit: the prompt is built here, written by a replica."""
        if record_logits:
            raise ValueError("record_logits is for the in-process engine")
        with self.counting_refusals(surface):
            prepared = prepare(self.handle, self.limits, turns, params, new=new, load=load, hash_images=True)
        affinity = self.affinity(prepared)
        if not self.handle.reuse.enabled:  # the replicas compare images by key only with reuse on
            prepared = dataclasses.replace(prepared, keys=[""] * len(prepared.keys),
                                           spans=tuple(dataclasses.replace(s, key="") for s in prepared.spans))
        return RemoteReply(self, prepared, params, stop, affinity, surface)

    def counting_refusals(self, surface: str) -> contextlib.AbstractContextManager[None]:
        """As Engine.counting_refusals, for what the front door refuses before a replica sees it."""
        return self.metrics.counting_refusals(surface)

    def retry_after_s(self) -> int:
        """A wait to suggest when Serve's line is full: a few health periods (replicas' lines move in seconds)."""
        return int(REPORT_S * 2)

    def _reports(self) -> dict[str, tuple[bytes, str | None, float]]:
        """The replicas' latest reports, those sent within REPORT_STALE_S (a replaced replica's stop)."""
        reports = ray.get(self.hub.read.remote(), timeout=5)
        now = time.time()
        return {name: report for name, report in reports.items() if now - report[2] <= REPORT_STALE_S}

    def metrics_text(self) -> bytes:
        """Every replica's metrics labelled `replica`, and the front door's own refusals (replica="front")."""
        texts: dict[str, str | bytes] = {"front": self.metrics.render()}
        texts.update({name: text for name, (text, _, _) in sorted(self._reports().items())})
        return merge(texts)

    def health(self) -> tuple[str | None, dict[str, Any]]:
        """As Engine.health: healthy while at least one replica reported recently without a problem."""
        info = self.info
        about: dict[str, Any] = {"model": info["label"], "dtype": info["dtype"], "device": info["device"],
                                 "batch": self.batch, "replicas": {"healthy": 0, "total": self.replicas}}
        reports = self._reports()
        healthy = sum(problem is None for _, problem, _ in reports.values())
        about["replicas"]["healthy"] = healthy
        if healthy:
            return None, about
        problems = sorted({problem for _, problem, _ in reports.values() if problem})
        if problems:
            return f"no engine replica can take work: {'; '.join(problems)}", about
        return (f"no engine replica reported in the last {REPORT_STALE_S:.0f} s (loading, restarting or gone)", about)

    def affinity(self, prepared: Prepared) -> list[str]:
        """The prompt's prefix hashes the router matches (reuse.prefix_hashes), without the template's preamble:
        every conversation begins with it, and matching on it would pull all of them to one replica."""
        hashes = reuse.prefix_hashes(prepared.inputs["input_ids"][0], prepared.spans)
        return hashes[self.preamble // reuse.PREFIX_BLOCK + 1:]

    def prefetcher(self, load: Callable[[str], Any]) -> NoPrefetch:
        return NoPrefetch()

    def close(self) -> None:
        self.cluster.shutdown()


def preamble_tokens(processor: Any) -> int:
    """How many prompt tokens every conversation starts with (the chat template's fixed opening)."""
    first, second = (processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors="pt")["input_ids"][0] for text in ("A", "Z"))
    return reuse.common_prefix(first, second)


# ---------------------------------------------------------------- starting and stopping


class Cluster:
    """The Ray connection and the Serve application this process started; shut down once."""

    def __init__(self, local: bool):
        self.local = local
        self._done = False

    def shutdown(self) -> None:
        if self._done:
            return
        self._done = True
        # A local instance goes as a whole with ray.shutdown() (its processes, Serve's included: ~2 s; a Ctrl-C in
        # a terminal may already have stopped some, and serve.shutdown() would then wait 30 s for its controller).
        # On a shared cluster only this application is removed.
        if not self.local:
            try:
                serve.delete(APP_NAME)
            except Exception:  # noqa: BLE001 - shutting down: say it and go on
                log.exception("removing the Serve application %s", APP_NAME)
        ray.shutdown()
        log.info("Ray Serve and Ray stopped")


def front_handle(settings: Settings, info: dict) -> ModelHandle:
    """The model as the front door needs it: processor, config and generation config — no weights."""
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    source = info["source"]
    if not Path(source).exists():  # a path on a replica's machine: load the same checkpoint from its id
        source = resolve_source(resolve_model_id(settings.model, torch.device("cpu"))).path_or_id
    config = AutoConfig.from_pretrained(source)
    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        generation_config = GenerationConfig.from_model_config(config)
    handle = ModelHandle(
        model=SimpleNamespace(config=config, generation_config=generation_config),  # type: ignore[arg-type]
        processor=AutoProcessor.from_pretrained(source), source=info["source"], label=info["label"],
        model_type=info["model_type"], device=torch.device(info["device"]), dtype=getattr(torch, info["dtype"]),
        context_tokens=info["context_tokens"], offline_fallback=info["offline_fallback"],
        fallback_reason=info["fallback_reason"], quantized=info["quantized"], dtype_reason=info["dtype_reason"],
        kv_budget_bytes=info["kv_budget_bytes"], cache_reason=f"{info['cache_reason']}, in each replica",
    )
    handle.reuse = ReuseCache(info["reuse_bytes"])  # mirrors the replicas' setting; nothing is stored here
    return handle


def _runtime_env(local: bool) -> dict:
    if local:  # workers on this machine import the package from this checkout
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
    # A cluster's nodes get this checkout's code and bundled checkpoint (they need the same requirements installed).
    return {"working_dir": str(ROOT), "excludes": [".venv/", "bench/models/", ".git/", "tests/", "docs/", "*.png"]}


def start(settings: Settings) -> RemoteEngine:
    """Start (or join) Ray, run `settings.replicas` engine replicas on Serve, and return their front-door engine."""
    local = not settings.ray_address
    replicas = settings.replicas or 1
    cpus = os.cpu_count() or 1
    init: dict[str, Any] = {"runtime_env": _runtime_env(local), "namespace": APP_NAME, "log_to_driver": False}
    if local:
        # Ray's own token auth stays on; no dashboard. (Its core services still bind every interface: docs/scaling.md.)
        init.update(num_cpus=cpus, include_dashboard=False)
    ray.init(settings.ray_address, **init)
    cluster = Cluster(local)
    try:
        return _deploy(settings, replicas, cluster)
    except BaseException as exc:
        cluster.shutdown()
        if isinstance(exc, Exception) and not isinstance(exc, ModelLoadError):
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"The engine replicas did not start: {reason}") from exc
        raise


def _deploy(settings: Settings, replicas: int, cluster: Cluster) -> RemoteEngine:
    gpus = ray.cluster_resources().get("GPU", 0)
    cuda = settings.device.startswith("cuda") or (settings.device == "auto" and gpus >= 1)
    batch, _ = default_batch(settings, torch.device("cuda" if cuda else "cpu"))
    if cuda:
        actor, threads = {"num_gpus": 1, "num_cpus": 1}, None
    else:
        share = max(1, int(ray.cluster_resources().get("CPU", 1)) // replicas)
        actor, threads = {"num_cpus": share}, share
        if settings.device == "auto":
            settings = dataclasses.replace(settings, device="cpu")
    resolve_device(settings.device, cuda_available=True)  # a malformed --device fails here, not in every replica
    serve.start(proxy_location="Disabled")  # the front door is gradio's server: no Serve HTTP proxy
    deployment = serve.deployment(EngineReplica).options(
        name="engine", num_replicas=replicas, ray_actor_options=actor,
        # The replica's own line (its batch and queue) is the real one: let that many reach each replica.
        max_ongoing_requests=batch + settings.queue_size, max_queued_requests=settings.queue_size,
        health_check_period_s=HEALTH_CHECK_S, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
        request_router_config=RequestRouterConfig(request_router_class=AffinityRouter,
                                                  request_router_kwargs={"max_imbalance": MAX_IMBALANCE}),
    )
    log.info("starting %d engine replica(s) on Ray Serve (%s each)", replicas, actor)
    handle = serve.run(deployment.bind(settings, threads), name=APP_NAME, route_prefix=None)
    # The replicas load the same model: one answers for all. (Asked from a thread: Serve refuses a blocking call
    # on a thread that runs an event loop, as a caller embedding the app may.)
    with ThreadPoolExecutor(1) as pool:
        info = pool.submit(lambda: handle.info.remote().result(timeout_s=120)).result()
    log.info("%d replica(s) ready: %s", replicas, info["describe"])
    return RemoteEngine(front_handle(settings, info), settings, handle, replicas, info, cluster)
