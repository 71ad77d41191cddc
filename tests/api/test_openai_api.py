"""The OpenAI-compatible /v1 API through the real `openai` client against the launched app."""

import base64
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client, handle_file

from dsvl_app import conversation as conv
from dsvl_app.settings import parse_settings
from tests.conftest import EXAMPLES, replying, serve, wait_until

pytestmark = pytest.mark.api

KEY = "sk-test-dsvl-0001"
MODEL = "tiny-dsvl-hybrid"


def data_url(path, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_part(path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def ask(text, *paths) -> dict:
    return {"role": "user", "content": [*(image_part(p) for p in paths), {"type": "text", "text": text}]}


class Keyed(tuple):
    """(base url, openai client) of a served app, with its `engine`."""

    engine: object


@pytest.fixture(scope="module")
def keyed(handle):
    """The bundled checkpoint served with an API key; yields (base url, openai client) with `.engine`."""
    settings = parse_settings(["--model", "tiny", "--api-key", f"{KEY},sk-second-key-02"], environ={})
    with serve(settings, handle) as served:
        url = served[1]
        keyed = Keyed((url, openai.OpenAI(base_url=url + "v1", api_key=KEY, max_retries=0, timeout=120)))
        keyed.engine = served.engine
        yield keyed


@pytest.fixture(scope="module")
def open_random(random_app_server):
    """The random-weight build on loopback without a key (open: nobody else can reach it)."""
    return random_app_server[1], openai.OpenAI(base_url=random_app_server[1] + "v1", api_key="unused", max_retries=0,
                                               timeout=120)


def test_models_lists_the_loaded_model(keyed):
    models = keyed[1].models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["tiny"] is True and models[0].model_extra["offline_fallback"] is False


def test_a_colour_answer_with_usage_equal_to_the_engines_count(keyed, handle):
    messages = [ask("What colour is the shape?", EXAMPLES / "red_circle.png")]
    reply = keyed[1].chat.completions.create(model=MODEL, messages=messages, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content.strip() == "The shape is red." and choice.finish_reason == "stop"
    turns = [conv.Turn("user", (conv.ImageRef(str(EXAMPLES / "red_circle.png")), "What colour is the shape?"))]
    assert reply.usage.prompt_tokens == conv.count_prompt_tokens(handle.processor, turns)
    assert reply.usage.completion_tokens > 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_two_images_in_order_with_usage(keyed):
    stream = keyed[1].chat.completions.create(
        model=MODEL, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[ask("What colour is the second image?", EXAMPLES / "blue_square.png", EXAMPLES / "yellow_circle.png")])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "The second image is yellow."
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3  # streamed, not one block
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 3


def test_images_across_messages_and_a_follow_up(keyed):
    messages = [ask("What colour is the shape?", EXAMPLES / "blue_square.png"),
                {"role": "assistant", "content": "The shape is blue."},
                ask("What colour is the second image?", EXAMPLES / "yellow_circle.png")]
    reply = keyed[1].chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert reply.choices[0].message.content.strip() == "The second image is yellow."
    first = keyed[1].chat.completions.create(model=MODEL, temperature=0, messages=[
        *messages[:2], {"role": "user", "content": "What colour is the first image?"}])
    assert first.choices[0].message.content.strip() == "The first image is blue."


def test_a_file_uploaded_to_this_server_and_a_system_message(keyed):
    url, client = keyed
    with open(EXAMPLES / "green_triangle.png", "rb") as f:
        uploaded = httpx.post(url + "gradio_api/upload", files={"files": f}).json()[0]
    reply = client.chat.completions.create(model=MODEL, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{url}gradio_api/file={uploaded}"}},
                                     {"type": "text", "text": "What shape is it?"}]}])
    assert "triangle" in reply.choices[0].message.content


def test_stop_strings_and_max_tokens(keyed):
    messages = [ask("What colour is the shape?", EXAMPLES / "red_circle.png")]
    cut = keyed[1].chat.completions.create(model=MODEL, messages=messages, temperature=0, stop=["red"])
    assert cut.choices[0].message.content.strip() == "The shape is" and cut.choices[0].finish_reason == "stop"
    short = keyed[1].chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_seed_makes_sampling_reproducible(open_random):
    client = open_random[1]
    messages = [ask("Describe it.", EXAMPLES / "red_circle.png")]
    runs = [client.chat.completions.create(model="ckpt", messages=messages, seed=seed, temperature=1.0, max_tokens=24)
            .choices[0].message.content for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("kind, call, match", [
    ("bad image", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"just text").decode()}},
        {"type": "text", "text": "What is it?"}]}]), r"Image 1 \(message 1\) is a text file, not an image"),
    ("n=2", dict(messages=[{"role": "user", "content": "Hi"}], n=2), "'n' = 2 is not supported"),
    ("a schema feature no grammar enforces", dict(messages=[{"role": "user", "content": "Hi"}], response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}}),
     r"cannot be enforced while generating: 'uniqueItems' at #/properties/tags"),
    ("over-long prompt", dict(messages=[{"role": "user", "content": "What colour is the shape? " * 800}]),
     "Too many tokens"),
    ("remote URL", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}]), "--allow-remote-images"),
])
def test_refusals_are_typed_errors_with_our_message(keyed, kind, call, match):
    with pytest.raises(openai.BadRequestError, match=match) as raised:
        keyed[1].chat.completions.create(model=MODEL, **call)
    assert raised.value.status_code == 400 and raised.value.body["message"]


def test_tools_other_servers_fields_and_unknown_ones_get_a_reply_and_a_record(keyed, caplog):
    """What Open WebUI sends on its defaults (its built-in tools) and with Advanced Params set (Ollama's names)."""
    url, client = keyed
    caplog.set_level("INFO", logger="dsvl_app.openai_api")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[ask("What colour is the shape?", EXAMPLES / "red_circle.png")], temperature=0,
        tools=[{"type": "function", "function": {"name": "get_current_timestamp", "parameters": {"type": "object"}}}],
        tool_choice="auto", frequency_penalty=0.5, user="ann",
        extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0, "colour": "red"})
    reply = raw.parse()
    message = reply.choices[0].message
    assert message.content == "The shape is red." and not message.tool_calls  # text, no invented call, no " "
    assert raw.headers["x-ignored-fields"] == "colour, frequency_penalty, tools, user"
    line = next(r.getMessage() for r in caplog.records if "POST /v1/chat/completions 200" in r.getMessage())
    assert "prompt +" in line and "1 image(s)" in line and "ignored: colour, frequency_penalty, tools, user" in line
    assert KEY not in caplog.text and "base64" not in caplog.text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2)
    refused = next(r.getMessage() for r in caplog.records if "POST /v1/chat/completions 400" in r.getMessage())
    assert "refused 'n'" in refused


def test_unknown_model_and_endpoint_are_404(keyed):
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-dsvl-hybrid'"):
        keyed[1].chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    response = httpx.get(keyed[0] + "v1/embeddings", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and "chat/completions" in response.json()["error"]["message"]


def test_keys_are_checked(keyed):
    url = keyed[0] + "v1"
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        openai.OpenAI(base_url=url, api_key="sk-wrong-key-0000", max_retries=0).models.list()
    missing = httpx.get(url + "/models")
    assert missing.status_code == 401 and "Missing API key" in missing.json()["error"]["message"]
    assert openai.OpenAI(base_url=url, api_key="sk-second-key-02").models.list().data[0].id == MODEL


def test_an_exposed_app_without_a_key_keeps_v1_closed(handle):
    settings = parse_settings(["--model", "tiny", "--auth", "ann:pw"], environ={})
    with serve(settings, handle) as (_, url):
        client = openai.OpenAI(base_url=url + "v1", api_key="anything", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="closed.*--api-key"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])


def test_an_oversize_request_is_413(handle):
    settings = parse_settings(["--model", "tiny", "--max-upload-mb", "1", "--max-images-total", "2"], environ={})
    with serve(settings, handle) as (_, url):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]})
        response = httpx.post(url + "v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "limit for one request" in response.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_stops_the_generation(open_random, random_app_server):
    url, engine = open_random[0], random_app_server.engine
    body = {"model": "ckpt", "stream": True, "max_tokens": 2000, "temperature": 1.0,
            "messages": [ask("Tell me everything.", EXAMPLES / "green_triangle.png")]}
    with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(12)]
        assert any('"content"' in line for line in received) and replying(engine)
    assert wait_until(lambda: not replying(engine), 5), "the reply kept running after the client went away"


def test_ui_api_and_v1_at_once_without_cross_talk(keyed):
    url, client = keyed
    results = {}

    def via_chat():
        chat = Client(url, verbose=False)
        results["chat"] = chat.predict({"text": "What colour is the shape?", "files": [handle_file(EXAMPLES / "red_circle.png")]},
                                       [], 64, 0.0, 1.0, 1.0, 0, api_name="/chat")

    def via_v1():
        results["v1"] = client.chat.completions.create(model=MODEL, temperature=0, messages=[
            ask("What colour is the shape?", EXAMPLES / "blue_square.png")]).choices[0].message.content

    threads = [threading.Thread(target=via_chat), threading.Thread(target=via_v1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["chat"].strip() == "The shape is red." and results["v1"].strip() == "The shape is blue."


def test_a_full_line_is_answered_429(settings, random_handle):
    with serve(replace(settings, queue_size=1, batch=1), random_handle) as (_, url):
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
        outcomes = []

        def one():
            try:
                client.chat.completions.create(model="ckpt", max_tokens=300, temperature=1.0,
                                               messages=[ask("Go on.", EXAMPLES / "red_circle.png")])
                outcomes.append("ok")
            except openai.RateLimitError as exc:
                outcomes.append(str(exc))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(180)
    assert "ok" in outcomes and any("busy" in o for o in outcomes), outcomes


def test_four_streams_at_once_all_start_before_any_ends_and_a_dropped_one_leaves_the_others(open_random,
                                                                                             random_app_server):
    """Through the real HTTP stack: four streams sent together are decoded together (the CPU default --batch 4)."""
    url, client = open_random
    first, ended, reasons = {}, {}, {}

    def stream(i):
        response = client.chat.completions.create(
            model="ckpt", stream=True, max_tokens=300, temperature=1.0, seed=i,
            messages=[ask(f"Story {i}, please.", EXAMPLES / ("red_circle.png", "blue_square.png")[i % 2])])
        for n, chunk in enumerate(response):
            if chunk.choices and chunk.choices[0].delta.content:
                first.setdefault(i, time.perf_counter())
            if chunk.choices and chunk.choices[0].finish_reason:
                reasons[i] = chunk.choices[0].finish_reason
            if i == 3 and n == 30:
                response.close()  # this client goes away mid-reply
                break
        ended[i] = time.perf_counter()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(first) == 4 and max(first.values()) < min(ended[i] for i in range(3))
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert wait_until(lambda: not replying(random_app_server.engine), 5)


def test_a_finished_reply_lets_go_of_its_images_at_once(keyed, handle, monkeypatch):
    """Nothing of a /v1 reply outlives it in a reference cycle: with the garbage collector off, its Reply and the
    engine's Request (which hold the image tensors: ~50 MB for four photo-sized images) are freed as soon as the
    response is complete — streamed, whole, or dropped mid-stream. (A cancelled watcher task once kept them in a
    cycle until a full collection: hundreds of MB under a soak of image requests.)"""
    import gc
    import weakref

    from dsvl_app.engine import Engine

    refs = []
    real = Engine.enqueue

    def enqueue(self, *args, **kwargs):
        reply = real(self, *args, **kwargs)
        refs.extend([weakref.ref(reply), weakref.ref(reply.request)])
        return reply

    monkeypatch.setattr(Engine, "enqueue", enqueue)
    client = keyed[1]
    messages = [ask("What colour is the shape?", EXAMPLES / "red_circle.png", EXAMPLES / "blue_square.png")]
    gc.collect()
    gc.disable()
    try:
        client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
        "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, stream=True) if c.choices)
        with client.chat.completions.with_streaming_response.create(model=MODEL, messages=messages, stream=True,
                                                                     max_tokens=200) as response:
            next(response.iter_lines())  # the first event, then the client goes away
        assert len(refs) == 6
        assert wait_until(lambda: all(ref() is None for ref in refs), 10), \
            [type(ref()).__name__ for ref in refs if ref() is not None]
    finally:
        gc.enable()


def test_a_mixed_storm_gives_every_reply_as_alone(keyed, handle):
    """Rounds of sixteen requests at once — greedy and seeded replies, clients that drop mid-stream, bad requests —
    against one engine decoding four at a time: every greedy and seeded reply is exactly what it is asked alone,
    every bad request is refused with its reason, and the engine is idle once the storm has passed."""
    client = keyed[1]
    questions = [("What colour is the shape?", EXAMPLES / "red_circle.png"),
                 ("What shape is it?", EXAMPLES / "green_triangle.png"),
                 ("How many shapes are there?", EXAMPLES / "three_shapes.png"),
                 ("What colour is the shape?", EXAMPLES / "blue_square.png")]
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 11}

    def ask_once(question, path, **params):
        reply = client.chat.completions.create(model=MODEL, messages=[ask(question, path)], max_tokens=24, **params)
        return reply.choices[0].message.content

    alone = {(q, str(p), bool(params)): ask_once(q, p, **params) for q, p in questions for params in ({}, sampled)}
    for _ in range(2):
        results, errors = {}, []

        def greedy(i):
            q, p = questions[i % 4]
            results[("greedy", i)] = (ask_once(q, p, temperature=0), alone[(q, str(p), False)])

        def seeded(i):
            q, p = questions[i % 4]
            results[("seeded", i)] = (ask_once(q, p, **sampled), alone[(q, str(p), True)])

        def dropped(i):
            q, p = questions[i % 4]
            with client.chat.completions.with_streaming_response.create(
                    model=MODEL, messages=[ask(q, p)], max_tokens=200, stream=True) as response:
                next(response.iter_lines())

        def bad(i):
            try:
                if i % 2:
                    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    client.chat.completions.create(model=MODEL, max_tokens=5, messages=[
                        {"role": "user", "content": [broken, {"type": "text", "text": "?"}]}])
                else:
                    client.chat.completions.create(model=MODEL, messages=[ask("Hi", EXAMPLES / "red_circle.png")],
                                                   temperature=7)
            except openai.BadRequestError as exc:
                errors.append(exc.body["param"])

        work = [greedy] * 5 + [seeded] * 5 + [dropped] * 3 + [bad] * 3
        threads = [threading.Thread(target=job, args=(i,)) for i, job in enumerate(work)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(results) == 10 and all(got == want for got, want in results.values()), results
        assert sorted(errors) == ["messages", "messages", "temperature"]
        assert wait_until(lambda: not replying(keyed.engine), 30)
