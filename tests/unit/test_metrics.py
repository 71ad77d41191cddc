"""The engine's metrics against known events: what a reply reports is what the counters add; refusals by reason;
the gauges at a scrape; health; Retry-After; several replicas' texts merged with a `replica` label."""

import contextlib
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsvl_app import conversation as conv
from dsvl_app.conversation import ContextOverflow, TooManyImages
from dsvl_app.engine import Engine, EngineBusy, GenerationError, GenerationParams, OutOfMemory
from dsvl_app.media import ImageRejected
from dsvl_app.metrics import EngineMetrics, finish_reason, merge, refusal_reason
from dsvl_app.ops import health_body
from dsvl_app.settings import Limits, parse_settings
from tests.conftest import wait_until

SETTINGS = parse_settings(["--model", "tiny"], environ={})


def samples(text: bytes) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text, by (name, labels) — parsed by Prometheus's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def value(text: bytes, name: str, **labels) -> float:
    """A sample's value (the sum over the labels not given)."""
    return sum(v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= set(ls))


def turns_of(text: str, *images: str) -> list[conv.Turn]:
    return [conv.Turn("user", (*(conv.ImageRef(p) for p in images), text))]


def engine_for(handle, **kwargs) -> Engine:
    settings = replace(SETTINGS, queue_size=kwargs.pop("queue_size", 32),
                       limits=replace(Limits(), token_timeout_s=kwargs.pop("timeout", 30)))
    return Engine(handle, settings, **kwargs)


def test_the_counters_add_exactly_what_the_replies_report(handle, images):
    engine = engine_for(handle, batch=2)
    before = engine.metrics_text()
    replies = [engine.submit(turns_of("What colour is the shape?", images["red"]), GenerationParams(max_new_tokens=24),
                             surface="v1"),
               engine.submit(turns_of("Describe it.", images["blue"]), GenerationParams(max_new_tokens=3),
                             surface="chat"),
               engine.submit(turns_of("And this one?", images["red"]), GenerationParams(max_new_tokens=24),
                             surface="v1")]
    for reply in replies:
        "".join(reply)
    after = engine.metrics_text()
    stats = [r.stats for r in replies]

    def added(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert added("dsvl_prompt_tokens_total", surface="v1") == stats[0].prompt_tokens + stats[2].prompt_tokens
    assert added("dsvl_prompt_tokens_total", surface="chat") == stats[1].prompt_tokens
    assert added("dsvl_generation_tokens_total", surface="v1") == stats[0].new_tokens + stats[2].new_tokens
    assert added("dsvl_generation_tokens_total", surface="chat") == stats[1].new_tokens == 3
    assert added("dsvl_requests_finished_total", reason="length", surface="chat") == 1
    for reason in ("stop", "length"):  # as the replies' own finish_reason says
        assert added("dsvl_requests_finished_total", reason=reason, surface="v1") == sum(
            r.finish_reason == reason for r in (replies[0], replies[2]))
    reused = sum(s.reused_tokens for s in stats)
    assert added("dsvl_prompt_tokens_reused_total") == reused
    assert added("dsvl_images_encoded_total") + added("dsvl_images_reused_total") == 3
    assert added("dsvl_images_reused_total") == sum(s.images_reused for s in stats)
    # One first token per reply, one gap per further token; one end-to-end time, prompt and reply size each.
    assert added("dsvl_time_to_first_token_seconds_count") == 3
    assert added("dsvl_inter_token_latency_seconds_count") == sum(s.new_tokens - 1 for s in stats)
    for histogram in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prompt_tokens",
                      "request_generation_tokens"):
        assert added(f"dsvl_{histogram}_count") == 3, histogram
    assert added("dsvl_request_prompt_tokens_sum") == sum(s.prompt_tokens for s in stats)
    assert added("dsvl_time_to_first_token_seconds_sum") == pytest.approx(
        sum(s.time_to_first_token_s for s in stats), rel=1e-6)
    engine.close()


def test_refusals_are_counted_by_reason_and_surface(handle, images, tmp_path):
    engine = engine_for(handle, batch=1, queue_size=1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with pytest.raises(ImageRejected):
        engine.submit(turns_of("?", str(broken)), GenerationParams(), surface="ui")
    with pytest.raises(ContextOverflow):
        engine.submit(turns_of("word " * 5000), GenerationParams(), surface="mcp")
    # A full line: one decoding, one waiting, the third refused as busy.
    gate = threading.Event()
    remove = engine.handle.model.model.language_model.register_forward_pre_hook(lambda *a: gate.wait(10) and None)
    try:
        held = [engine.submit(turns_of(f"hold {i}"), GenerationParams(max_new_tokens=2), surface="v1")
                for i in range(2)]
        assert wait_until(lambda: engine.scheduler.prefilling or engine.scheduler.running)
        if len(engine.scheduler.waiting) < 1:
            held.append(engine.submit(turns_of("hold 2"), GenerationParams(max_new_tokens=2), surface="v1"))
        with pytest.raises(EngineBusy) as busy:
            engine.submit(turns_of("one too many"), GenerationParams(max_new_tokens=2), surface="v1")
    finally:
        gate.set()
        remove.remove()
    assert busy.value.retry_after_s >= 1
    for reply in held:
        "".join(reply)
    text = engine.metrics_text()
    assert value(text, "dsvl_requests_refused_total", reason="bad_image", surface="ui") == 1
    assert value(text, "dsvl_requests_refused_total", reason="too_many_tokens", surface="mcp") == 1
    assert value(text, "dsvl_requests_refused_total", reason="busy", surface="v1") == 1
    assert value(text, "dsvl_requests_refused_total") == 3
    # A refused request never ran: nothing of it is in the finished or token counters.
    assert value(text, "dsvl_requests_finished_total") == len(held)
    engine.close()


def test_the_gauges_show_the_line_the_rows_and_the_budget_at_a_scrape(random_handle, images):
    engine = engine_for(random_handle, batch=2)
    reading = threading.Event()
    seen = {}

    def hook(module, args, kwargs):
        scheduler = engine.scheduler  # (its own thread: the state holds still while we look)
        state = (len(scheduler.waiting), int(scheduler.prefilling is not None))
        if len(scheduler.running) == 2 and sum(state) == 1 and not reading.is_set():
            seen["state"] = state  # two decoding; the third (once submitted) waits or is being read
            seen["text"] = engine.metrics_text()
            reading.set()

    remove = random_handle.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        # Long replies (random weights run to max_new_tokens), so that two surely decode together.
        replies = [engine.submit(turns_of(f"talk {i}", images["red"]), GenerationParams(max_new_tokens=1000))
                   for i in range(3)]
        assert reading.wait(120)
    finally:
        remove.remove()
        for reply in replies:
            reply.cancel()
    text = seen["text"]
    assert value(text, "dsvl_num_requests_running") == value(text, "dsvl_decode_batch_rows") == 2
    waiting, prefilling = seen["state"]
    assert value(text, "dsvl_num_requests_waiting") == waiting
    assert value(text, "dsvl_num_requests_prefilling") == prefilling
    used, total = value(text, "dsvl_kv_budget_used_bytes"), value(text, "dsvl_kv_budget_bytes")
    assert 0 < used <= total == engine.scheduler.budget.total
    assert value(text, "dsvl_kv_cache_usage_perc") == pytest.approx(used / total)
    assert value(text, "dsvl_reuse_cache_entries", kind="image") >= 1  # the red image's features
    assert value(text, "dsvl_reuse_cache_bytes") > 0
    engine.close()


def test_health_is_ok_idle_and_names_a_wedged_engine(random_handle):
    engine = engine_for(random_handle, batch=1, timeout=1)
    problem, about = engine.health()
    assert problem is None
    assert about == {"model": random_handle.label, "dtype": "float32", "device": "cpu", "batch": 1,
                     "replicas": {"healthy": 1, "total": 1}}
    status, body = health_body(problem, about)
    assert status == 200 and body["status"] == "ok"
    stuck = threading.Event()
    remove = random_handle.model.model.language_model.register_forward_pre_hook(lambda *a: stuck.wait(4) and None)
    try:
        reply = engine.submit(turns_of("hello"), GenerationParams(max_new_tokens=4))
        assert wait_until(lambda: engine.health()[0] is not None, timeout=5)
        problem, about = engine.health()
        assert "no progress" in problem and about["replicas"]["healthy"] == 0
        status, body = health_body(problem, about)
        assert status == 503 and body["status"] == "unavailable" and body["reason"] == problem
    finally:
        stuck.set()
        remove.remove()
    with contextlib.suppress(GenerationError):  # (a consumer that looked during the stall ends it as stalled)
        "".join(reply)
    assert wait_until(lambda: engine.health()[0] is None, timeout=10)
    engine.scheduler.stop()  # (the process is exiting)
    assert engine.health()[0] == "the engine is shutting down"


def test_retry_after_grows_with_the_line_and_recent_replies():
    from dsvl_app.scheduler import Scheduler

    scheduler = SimpleNamespace(waiting=[1] * 7, batch=2, _service_s=None)
    assert Scheduler.retry_after_s(scheduler) == 8  # before any reply ended: a second a request
    scheduler._service_s = 3.0
    assert Scheduler.retry_after_s(scheduler) == 12  # 8 requests, 2 at a time, 3 s each
    scheduler.waiting = []
    scheduler._service_s = 0.01
    assert Scheduler.retry_after_s(scheduler) == 1  # never 0: "now" would make clients hammer
    assert EngineBusy("full", 0).retry_after_s == 1


@pytest.mark.parametrize("stop_reason,error,label", [
    ("eos", None, "stop"), ("stop", None, "stop"), ("length", None, "length"), ("stopped", None, "stopped"),
    ("timeout", None, "timeout"), ("error", GenerationError("x"), "error"),
    ("error", OutOfMemory("x"), "out_of_memory"), ("something new", None, "error")])
def test_finish_reasons(stop_reason, error, label):
    assert finish_reason(stop_reason, error) == label


@pytest.mark.parametrize("exc,label", [
    (EngineBusy("full"), "busy"), (ImageRejected("a.png", "is not an image"), "bad_image"),
    (TooManyImages("too many"), "too_many_images"), (ContextOverflow("long"), "too_many_tokens"),
    (GenerationError("temperature"), "bad_parameter"), (conv.ConversationError("odd"), "bad_request")])
def test_refusal_reasons(exc, label):
    assert refusal_reason(exc) == label


def test_replicas_texts_merge_with_a_replica_label_and_parse():
    first, second = EngineMetrics(), EngineMetrics()
    first.refuse("busy", "v1")
    first.ttft.observe(0.3)
    second.ttft.observe(2.0)
    second.ttft.observe(7.0)
    merged = merge({"front": EngineMetrics().render(), "a1": first.render(), "b2": second.render()})
    assert value(merged, "dsvl_requests_refused_total", reason="busy", surface="v1", replica="a1") == 1
    assert value(merged, "dsvl_time_to_first_token_seconds_count", replica="b2") == 2
    assert value(merged, "dsvl_time_to_first_token_seconds_count") == 3
    assert value(merged, "dsvl_time_to_first_token_seconds_bucket", replica="b2", le="2.5") == 1
    families = {f.name: f.type for f in text_string_to_metric_families(merged.decode())}
    assert families["dsvl_requests_refused"] == "counter"
    assert families["dsvl_time_to_first_token_seconds"] == "histogram"
    assert all(not name.endswith("_created") for name in families)


def test_names_follow_prometheus_conventions(handle):
    text = engine_for(handle).metrics_text()
    families = list(text_string_to_metric_families(text.decode()))
    assert families and all(f.name.startswith("dsvl_") for f in families)
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram" and "tokens" not in family.name:
            assert family.name.endswith("_seconds"), family.name
    names = {f.name for f in families}
    assert {"dsvl_num_requests_running", "dsvl_num_requests_waiting", "dsvl_time_to_first_token_seconds",
            "dsvl_inter_token_latency_seconds", "dsvl_e2e_request_latency_seconds", "dsvl_request_queue_time_seconds",
            "dsvl_kv_cache_usage_perc", "dsvl_prompt_tokens", "dsvl_generation_tokens"} <= names
