"""What operators see of the engine: Prometheus counters, histograms and gauges, fed by the scheduler's own events.

Names follow Prometheus conventions under one prefix (`dsvl_`: counters end in `_total`, durations are
`_seconds` histograms) and vLLM's meaning where one matches, so that its dashboards translate
(`dsvl_num_requests_running` ~ `vllm:num_requests_running`, `dsvl_time_to_first_token_seconds` ~
`vllm:time_to_first_token_seconds`, `dsvl_kv_cache_usage_perc` ~ `vllm:kv_cache_usage_perc`, …).

- Counters and histograms are fed by events: a request refused (by reason and surface), admitted (its time in
  line, the prompt tokens and images reused), a token (time to the first, then between tokens), a request
  finished (by reason and surface: its tokens, end-to-end time). Tokens are counted as the replies report them:
  a `/v1` reply's `usage` adds exactly its prompt and completion tokens.
- Gauges (requests running, waiting, being read; keys/values budget; reuse cache; decode rows) are read from
  the engine when Prometheus scrapes (`Gauges`), so that nothing is updated on the decode path for them.

Each engine has a registry of its own (no module state). No gradio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .conversation import ContextOverflow, TooManyImages
from .documents import DocumentRejected
from .image_urls import ImageUrlError
from .media import ImageRejected
from .request import EngineBusy, OutOfMemory
from .sampling import GenerationError

PREFIX = "dsvl"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SURFACES = ("ui", "chat", "v1", "mcp", "other")  # where a request came from: the browser, /chat, /v1, MCP, in-process
FINISH_REASONS = ("stop", "length", "stopped", "timeout", "error", "out_of_memory")
REFUSAL_REASONS = ("bad_image", "bad_document", "too_many_images", "too_many_tokens", "busy", "bad_parameter",
                   "bad_request")
# Durations from a GPU's tens of milliseconds to a CPU's minutes (an image prompt on the 7B's CPU path).
SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
# Between two tokens: a GPU's few milliseconds to a CPU's seconds while a newcomer's prompt is read.
GAPS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TOKENS = (16, 64, 128, 256, 576, 1024, 2048, 4096, 8192)  # 576: one image


@dataclass(frozen=True)
class Gauges:
    """The engine's state at a scrape."""

    running: int
    waiting: int
    prefilling: int
    decode_rows: int
    kv_used_bytes: int
    kv_budget_bytes: int
    reuse_prefix_entries: int
    reuse_image_entries: int
    reuse_bytes: int


class _GaugeCollector(Collector):
    """Reads the engine's state when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Gauges]):
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = self.read()
        yield GaugeMetricFamily(f"{PREFIX}_num_requests_running", "Replies being decoded", value=g.running)
        yield GaugeMetricFamily(f"{PREFIX}_num_requests_waiting", "Requests waiting in line for the model",
                                value=g.waiting)
        yield GaugeMetricFamily(f"{PREFIX}_num_requests_prefilling", "Requests whose prompt and images are being read",
                                value=g.prefilling)
        yield GaugeMetricFamily(f"{PREFIX}_decode_batch_rows", "Rows in the decode batch (replies decoded together)",
                                value=g.decode_rows)
        yield GaugeMetricFamily(f"{PREFIX}_kv_budget_used_bytes", "Keys/values memory in use: the replies' rows and "
                                "reservations plus the reuse cache", value=g.kv_used_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_kv_budget_bytes", "The keys/values memory budget (--cache-mb)",
                                value=g.kv_budget_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_perc", "Fraction of the keys/values budget in use (0-1)",
                                value=g.kv_used_bytes / g.kv_budget_bytes if g.kv_budget_bytes else 0.0)
        entries = GaugeMetricFamily(f"{PREFIX}_reuse_cache_entries", "Entries in the reuse cache", labels=["kind"])
        entries.add_metric(["prefix"], g.reuse_prefix_entries)
        entries.add_metric(["image"], g.reuse_image_entries)
        yield entries
        yield GaugeMetricFamily(f"{PREFIX}_reuse_cache_bytes", "Bytes held by the reuse cache (earlier turns' "
                                "keys/values, image features)", value=g.reuse_bytes)


class EngineMetrics:
    """One engine's metrics; `render()` is the text Prometheus scrapes (see the module docstring)."""

    def __init__(self, gauges: Callable[[], Gauges] | None = None):
        self.registry = registry = CollectorRegistry()
        if gauges is not None:
            registry.register(_GaugeCollector(gauges))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("surface",)) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, buckets=buckets, registry=registry)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests whose prompt was read (reused "
                                     "ones included), counted when they end")
        self.reused_tokens = counter("prompt_tokens_reused", "Prompt tokens whose keys/values came from an earlier turn")
        self.generation_tokens = counter("generation_tokens", "Tokens generated, counted when their request ends")
        self.images_encoded = counter("images_encoded", "Images whose features were computed")
        self.images_reused = counter("images_reused", "Images not encoded again (in a reused prefix, or cached)")
        self.finished = counter("requests_finished", "Requests ended, by reason: stop (end of sentence or a stop "
                                "string), length, stopped (cancelled), timeout, error, out_of_memory",
                                ("reason", "surface"))
        self.refused = counter("requests_refused", "Requests refused before they reached the model, by reason",
                               ("reason", "surface"))
        self.queue_time = histogram("request_queue_time_seconds", "Time a request waited in line", SECONDS)
        self.ttft = histogram("time_to_first_token_seconds", "From the request to its first token (the wait in "
                              "line included)", SECONDS)
        self.inter_token = histogram("inter_token_latency_seconds", "Time between two tokens of a reply", GAPS)
        self.e2e = histogram("e2e_request_latency_seconds", "From the request to its end", SECONDS)
        self.prompt_size = histogram("request_prompt_tokens", "Prompt tokens per request", TOKENS)
        self.generation_size = histogram("request_generation_tokens", "Generated tokens per request", TOKENS)
        # Every series exists from the start at 0, so that rate() and a dashboard's panels work before the first
        # event (a counter that appears at 1 hides its first increase from rate()).
        for surface in SURFACES:
            for tokens in (self.prompt_tokens, self.reused_tokens, self.generation_tokens, self.images_encoded,
                           self.images_reused):
                tokens.labels(surface)
            for reason in FINISH_REASONS:
                self.finished.labels(reason, surface)
            for reason in REFUSAL_REASONS:
                self.refused.labels(reason, surface)

    # -- events (the scheduler's thread; `refuse` any thread)

    def refuse(self, reason: str, surface: str) -> None:
        self.refused.labels(reason, _surface(surface)).inc()

    @contextlib.contextmanager
    def counting_refusals(self, surface: str) -> Iterator[None]:
        """Count a refusal raised inside (a bad image, too many tokens, a full line, …) by its reason, and re-raise."""
        try:
            yield
        except Exception as exc:
            self.refuse(refusal_reason(exc), surface)
            raise

    def admitted(self, request: Any) -> None:
        """Its prompt is about to be read: the wait in line."""
        self.queue_time.observe(request.stats.queued_s)

    def read(self, request: Any) -> None:
        """Its images were encoded or found, its reuse prefix taken."""
        stats, surface = request.stats, _surface(request.surface)
        self.reused_tokens.labels(surface).inc(stats.reused_tokens)
        self.images_reused.labels(surface).inc(stats.images_reused)
        self.images_encoded.labels(surface).inc(stats.images - stats.images_reused)

    def token(self, request: Any) -> None:
        """A token was taken: the first's time, or the gap since the one before."""
        if request.last_gap_s is None:
            self.ttft.observe(request.stats.time_to_first_token_s or 0.0)
        else:
            self.inter_token.observe(request.last_gap_s)

    def ended(self, request: Any) -> None:
        """The request ended (however): its reason, its time, its tokens."""
        stats, surface = request.stats, _surface(request.surface)
        self.finished.labels(finish_reason(stats.stop_reason, request.error), surface).inc()
        if not request.admitted:
            return  # it left the line: nothing of it was read
        self.e2e.observe(stats.total_s)
        self.prompt_tokens.labels(surface).inc(stats.prompt_tokens)
        self.generation_tokens.labels(surface).inc(stats.new_tokens)
        self.prompt_size.observe(stats.prompt_tokens)
        self.generation_size.observe(stats.new_tokens)

    def render(self) -> bytes:
        """The Prometheus text (without the `_created` timestamps: they would double it and say nothing here)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(Collector):
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():  # fresh objects at each collect
            family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield family


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(texts: dict[str, str | bytes]) -> bytes:
    """Several engines' Prometheus texts as one, each sample labelled `replica` with its engine's name (the front
    door's `/metrics` with Ray replicas). The `_created` timestamps are left out."""
    merged: dict[str, Metric] = {}
    for replica, text in texts.items():
        text = text.decode() if isinstance(text, bytes) else text
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created") and family.type == "gauge":
                continue
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    into.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
    registry = CollectorRegistry()
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


def _surface(surface: str) -> str:
    return surface if surface in SURFACES else "other"


def finish_reason(stop_reason: str, error: BaseException | None) -> str:
    """A reply's end as a metric label (`request.END_REASONS`, with out of memory told apart from other errors)."""
    if stop_reason in ("eos", "stop"):
        return "stop"
    if stop_reason == "error" and isinstance(error, OutOfMemory):
        return "out_of_memory"
    return stop_reason if stop_reason in FINISH_REASONS else "error"


def refusal_reason(exc: BaseException) -> str:
    """Why a request was refused before it reached the model, as a metric label (an adapter's own error may say it
    as `refusal_reason`)."""
    if isinstance(reason := getattr(exc, "refusal_reason", None), str):
        return reason
    if isinstance(exc, EngineBusy):
        return "busy"
    if isinstance(exc, (ImageRejected, ImageUrlError)):
        return "bad_image"
    if isinstance(exc, DocumentRejected):
        return "bad_document"
    if isinstance(exc, TooManyImages):
        return "too_many_images"
    if isinstance(exc, ContextOverflow):
        return "too_many_tokens"
    if isinstance(exc, GenerationError):
        return "bad_parameter"
    return "bad_request"
