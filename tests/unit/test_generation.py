"""Streaming generation on a worker thread: increments, stats, seeds, stop, OOM, errors, timeouts."""

import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from dsvl_app import conversation as conv
from dsvl_app.generation import (
    GenerationError,
    GenerationParams,
    GenerationTimeout,
    OutOfMemory,
    generate_stream,
)


@pytest.fixture
def handle(random_handle):
    """Streaming mechanics need replies that run long: the untrained build (the trained one stops at once)."""
    return random_handle


@pytest.fixture
def inputs(handle, make_image):
    paths = [make_image("a.png", colour=(255, 0, 0)), make_image("b.png", colour=(0, 0, 255))]
    turns = [conv.Turn("user", (conv.ImageRef(paths[0]), conv.ImageRef(paths[1]), "Describe both."))]
    from PIL import Image

    return conv.encode(handle.processor, conv.template_messages(turns, {p: Image.open(p).convert("RGB") for p in paths}))


@contextmanager
def lm_hook(handle, fn):
    """Run fn(step) before every forward of the language model (the real decode loop)."""
    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        fn(calls["n"])

    remove = handle.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        remove.remove()


SAMPLE = GenerationParams(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=123)


def test_streams_several_increments_with_stats(handle, inputs):
    gen = generate_stream(handle, inputs, SAMPLE, token_timeout_s=30)
    pieces = list(gen)
    assert len(pieces) >= 5 and all(isinstance(p, str) and p for p in pieces)
    stats = gen.stats
    assert stats.prompt_tokens == inputs["input_ids"].shape[-1] and stats.images == 2
    assert stats.new_tokens == 40 and stats.stop_reason == "length"
    assert 0 < stats.time_to_first_token_s < stats.total_s and stats.tokens_per_s > 0
    gen.thread.join(2)
    assert not gen.thread.is_alive()


def test_seed_makes_sampling_reproducible(handle, inputs):
    first = "".join(generate_stream(handle, inputs, SAMPLE, 30))
    again = "".join(generate_stream(handle, inputs, SAMPLE, 30))
    other = "".join(generate_stream(handle, inputs, replace(SAMPLE, seed=999), 30))
    assert first == again and first != other


def test_greedy_is_deterministic_without_seed(handle, inputs):
    greedy = GenerationParams(max_new_tokens=12, temperature=0.0)
    assert "".join(generate_stream(handle, inputs, greedy, 30)) == "".join(generate_stream(handle, inputs, greedy, 30))


def test_stop_event_ends_the_worker_thread_promptly(handle, inputs):
    with lm_hook(handle, lambda step: time.sleep(0.01)) as calls:
        gen = generate_stream(handle, inputs, replace(SAMPLE, max_new_tokens=2000), 30)
        stream = iter(gen)
        for _ in range(3):
            next(stream)
        gen.stop()
        t0 = time.perf_counter()
        gen.thread.join(1.0)
        assert not gen.thread.is_alive(), "generate thread kept running after stop"
        assert time.perf_counter() - t0 < 1.0
        decoded = calls["n"]
        rest = list(stream)
        time.sleep(0.1)
        assert calls["n"] == decoded, "tokens were decoded after the thread ended"
    assert gen.stats.stop_reason == "stopped" and gen.stats.new_tokens < 50 and len(rest) < 5


def test_closing_the_stream_stops_generation(handle, inputs):
    """What gradio does when an event is cancelled or the client goes away."""
    with lm_hook(handle, lambda step: time.sleep(0.01)):
        gen = generate_stream(handle, inputs, replace(SAMPLE, max_new_tokens=2000), 30)
        stream = iter(gen)
        next(stream)
        stream.close()
        gen.thread.join(1.0)
        assert not gen.thread.is_alive()
    assert gen.stats.stop_reason == "stopped"


def test_out_of_memory_is_reported_and_model_stays_usable(handle, inputs):
    def boom(step):
        if step == 3:  # during decode
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with lm_hook(handle, boom):
        gen = generate_stream(handle, inputs, SAMPLE, 30)
        with pytest.raises(OutOfMemory, match=r"Out of memory.*2 image\(s\).*fewer or smaller images"):
            list(gen)
    assert gen.stats.stop_reason == "error"
    assert len(list(generate_stream(handle, inputs, SAMPLE, 30))) > 0  # the next request is served


def test_other_worker_errors_are_named(handle, inputs):
    def boom(step):
        raise RuntimeError("index out of range in self")

    with lm_hook(handle, boom), pytest.raises(GenerationError, match="RuntimeError: index out of range"):
        list(generate_stream(handle, inputs, SAMPLE, 30))


def test_stalled_generation_times_out_with_a_clear_message(handle, inputs):
    with lm_hook(handle, lambda step: time.sleep(1.5) if step == 2 else None):
        gen = generate_stream(handle, inputs, SAMPLE, token_timeout_s=0.5)
        with pytest.raises(GenerationTimeout, match="stalled"):
            list(gen)
        gen.thread.join(3)
        assert not gen.thread.is_alive()
    assert gen.stats.stop_reason == "timeout"


def test_one_generate_call_at_a_time(handle, inputs):
    active, peak, lock = [0], [0], threading.Lock()

    def track(step):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.002)
        with lock:
            active[0] -= 1

    results = []
    with lm_hook(handle, track):
        threads = [
            threading.Thread(target=lambda: results.append("".join(generate_stream(handle, inputs, SAMPLE, 30))))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 3 and peak[0] == 1
    assert len(set(results)) == 1  # same seed, same inputs: no request disturbed another


@pytest.mark.parametrize(
    "params,word",
    [
        (GenerationParams(max_new_tokens=0), "max_new_tokens"),
        (GenerationParams(max_new_tokens=10**6), "max_new_tokens"),
        (GenerationParams(temperature=-1), "temperature"),
        (GenerationParams(top_p=0), "top_p"),
        (GenerationParams(repetition_penalty=9), "repetition_penalty"),
        (GenerationParams(seed=-5), "seed"),
    ],
)
def test_parameter_validation_names_the_parameter(params, word):
    with pytest.raises(GenerationError, match=word):
        params.validate(max_new_tokens_cap=2048)
