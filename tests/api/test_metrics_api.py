"""/metrics and /health on the launched app, through real clients: the counters add what `/v1` replies report as
`usage`, surfaces are told apart, the key guards /metrics (and an exposed app keeps it closed), /health answers at
once while replies stream and says 503 when the engine is wedged, and a full line answers every 429 with a
positive Retry-After."""

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client, handle_file
from prometheus_client.parser import text_string_to_metric_families

from dsvl_app.settings import parse_settings
from tests.conftest import EXAMPLES, replying, serve, wait_until

pytestmark = pytest.mark.api

KEY = "sk-metrics-key-01"
MODEL = "tiny-dsvl-hybrid"
RED = str(EXAMPLES / "red_circle.png")


def scrape(url: str, key: str | None = KEY) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(url + "metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture(scope="module")
def keyed(handle):
    settings = parse_settings(["--model", "tiny", "--api-key", KEY], environ={})
    with serve(settings, handle) as served:
        yield served[1], served.engine


def test_metrics_need_the_key_and_health_needs_none(keyed):
    url, _ = keyed
    missing = httpx.get(url + "metrics")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(url + "metrics", headers={"Authorization": "Bearer sk-not-the-key"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert total(scrape(url), "dsvl_kv_budget_bytes") > 0
    health = httpx.get(url + "health")
    assert health.status_code == 200
    body = health.json()
    assert body == {"status": "ok", "model": body["model"], "dtype": "float32", "device": "cpu", "batch": 4,
                    "replicas": {"healthy": 1, "total": 1}}
    assert KEY not in health.text


def test_v1_usage_is_exactly_what_the_counters_add(keyed):
    url, _ = keyed
    client = openai.OpenAI(base_url=url + "v1", api_key=KEY, max_retries=0, timeout=120)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        Path(RED).read_bytes()).decode()}}
    before = scrape(url)
    one = client.chat.completions.create(model=MODEL, max_tokens=30, messages=[
        {"role": "user", "content": [image, {"type": "text", "text": "What colour is the shape?"}]}])
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Say something long."}]))
    streamed = chunks[-1].usage
    after = scrape(url)

    def added(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert added("dsvl_prompt_tokens_total", surface="v1") == one.usage.prompt_tokens + streamed.prompt_tokens
    assert added("dsvl_generation_tokens_total", surface="v1") == (one.usage.completion_tokens
                                                                   + streamed.completion_tokens)
    assert added("dsvl_requests_finished_total", surface="v1", reason=one.choices[0].finish_reason) >= 1
    assert added("dsvl_requests_finished_total", surface="v1", reason="length") >= 1  # the stream's 4 tokens
    assert added("dsvl_requests_finished_total", surface="v1") == 2
    assert added("dsvl_time_to_first_token_seconds_count") == 2
    assert added("dsvl_images_encoded_total", surface="v1") + added("dsvl_images_reused_total", surface="v1") == 1
    # Refusals before the engine are counted too, by reason.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=9)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])
    refused = scrape(url)
    assert total(refused, "dsvl_requests_refused_total", surface="v1", reason="bad_parameter") \
        - total(after, "dsvl_requests_refused_total", surface="v1", reason="bad_parameter") == 1
    assert total(refused, "dsvl_requests_refused_total", surface="v1", reason="bad_image") \
        - total(after, "dsvl_requests_refused_total", surface="v1", reason="bad_image") == 1


def test_chat_and_the_ui_are_told_apart_from_v1(keyed):
    url, _ = keyed
    before = scrape(url)
    client = Client(url, verbose=False)
    reply = client.predict({"text": "What colour is the shape?", "files": [handle_file(RED)]}, [], 20, 0, 1, 1, None,
                           api_name="/chat")
    assert isinstance(reply, str) and reply
    after = scrape(url)
    assert total(after, "dsvl_requests_finished_total", surface="chat") \
        - total(before, "dsvl_requests_finished_total", surface="chat") == 1
    assert total(after, "dsvl_requests_finished_total", surface="v1") \
        == total(before, "dsvl_requests_finished_total", surface="v1")


def test_an_exposed_app_without_a_key_keeps_metrics_closed(handle):
    settings = parse_settings(["--model", "tiny", "--auth", "ann:secret"], environ={})
    with serve(settings, handle) as served:
        url = served[1]
        closed = httpx.get(url + "metrics")
        assert closed.status_code == 401 and closed.json()["error"]["code"] == "api_closed"
        assert "--api-key" in closed.json()["error"]["message"]
        assert httpx.get(url + "health").json()["status"] == "ok"  # says nothing sensitive: open to probes


@pytest.fixture(scope="module")
def full_line(random_handle):
    """One reply at a time and two in line (random weights: replies run to max_tokens)."""
    settings = parse_settings(["--model", "tiny", "--batch", "1", "--queue-size", "2", "--token-timeout", "1"],
                              environ={})
    with serve(settings, random_handle) as served:
        served.model = httpx.get(served[1] + "v1/models").json()["data"][0]["id"]
        yield served[1], served.engine, served.model


def test_every_429_of_a_full_line_says_when_to_retry(full_line):
    url, engine, model = full_line
    before = scrape(url, key=None)
    stop = threading.Event()

    def ask(i: int) -> tuple[int, str | None]:
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", url + "v1/chat/completions", json={
                    "model": model, "max_tokens": 1500, "stream": True,
                    "messages": [{"role": "user", "content": f"Tell me a long story number {i}."}]}) as response:
                if response.status_code == 200:
                    for _ in response.iter_lines():  # hold the line until every request has had its answer
                        if stop.is_set():
                            break
                else:
                    response.read()
                return response.status_code, response.headers.get("retry-after")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        assert wait_until(lambda: sum(f.done() for f in futures) >= 5, timeout=60)
        stop.set()
        answers = [f.result() for f in futures]
    refused = [retry for status, retry in answers if status == 429]
    assert len(refused) >= 4, answers  # one decoding, two waiting (a fourth may find room if one ends early)
    assert all(retry is not None and retry.isdigit() and int(retry) >= 1 for retry in refused), answers
    assert wait_until(lambda: not replying(engine), timeout=60)
    after = scrape(url, key=None)
    assert total(after, "dsvl_requests_refused_total", reason="busy", surface="v1") \
        - total(before, "dsvl_requests_refused_total", reason="busy", surface="v1") == len(refused)


def test_health_answers_at_once_while_replies_stream_and_503_when_wedged(full_line, random_handle):
    url, engine, model = full_line
    stuck = threading.Event()
    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # decoding: the device stops answering
            stuck.wait(6)

    remove = random_handle.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
    try:
        stream = client.chat.completions.create(model=model, max_tokens=300, stream=True,
                                                messages=[{"role": "user", "content": "Talk."}])
        next(iter(stream))
        started = time.perf_counter()
        while calls["n"] < 20:
            response = httpx.get(url + "health", timeout=5)
            assert response.status_code == 200 and time.perf_counter() - started < 30
        assert wait_until(lambda: httpx.get(url + "health").status_code == 503, timeout=5)
        began = time.perf_counter()
        wedged = httpx.get(url + "health")
        assert time.perf_counter() - began < 1.0  # never queued behind the engine
        assert wedged.json()["status"] == "unavailable" and "no progress" in wedged.json()["reason"]
        assert wedged.json()["replicas"] == {"healthy": 0, "total": 1}
    finally:
        stuck.set()
        remove.remove()
        stream.close()
    assert wait_until(lambda: httpx.get(url + "health").status_code == 200, timeout=30)
