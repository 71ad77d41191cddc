"""The engine room: replies submitted, streamed, decoded together, stopped, failed — each on its own.

Exactness is held to `model.generate` itself (`generate_text`): a reply alone is bit for bit what
generate gives, in float32 and bfloat16; replies decoded together give the answers they give alone.
"""

import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from PIL import Image

from dsvl_app import conversation as conv
from dsvl_app.engine import (
    Engine,
    EngineBusy,
    GenerationError,
    GenerationParams,
    GenerationTimeout,
    OutOfMemory,
    Prefetcher,
)
from dsvl_app.media import load_image
from dsvl_app.model import load_model
from dsvl_app.reuse import ReuseCache
from dsvl_app.settings import Limits, parse_settings
from dsvl_app.slots import kv_bytes_per_token
from tests.conftest import EXAMPLES, generate_text, wait_until

SETTINGS = parse_settings(["--model", "tiny"], environ={})
SAMPLE = GenerationParams(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=123)
GREEDY = GenerationParams(max_new_tokens=24)


def engine_for(handle, timeout: float = 30, batch: int = 4, queue_size: int = 32, **kwargs) -> Engine:
    settings = replace(SETTINGS, queue_size=queue_size, limits=replace(Limits(), token_timeout_s=timeout))
    return Engine(handle, settings, batch=batch, **kwargs)


def turns_of(*parts) -> list[conv.Turn]:
    return [conv.Turn("user", tuple(conv.ImageRef(p) if str(p).endswith(".png") else p for p in parts))]


def inputs_of(handle, turns):
    paths = [p.path for t in turns for p in t.parts if isinstance(p, conv.ImageRef)]
    loaded = {p: Image.open(p).convert("RGB") for p in paths}
    return conv.encode(handle.processor, conv.template_messages(turns, loaded))


@contextmanager
def lm_hook(handle, fn):
    """Run fn(step, kwargs) before every forward of the language model (prefill chunks and decode steps)."""
    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        fn(calls["n"], kwargs)

    remove = handle.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        remove.remove()


def decode_rows(kwargs) -> int:
    """Rows in a decode forward (0 for a prefill forward)."""
    embeds = kwargs.get("inputs_embeds")
    return int(embeds.shape[0]) if embeds is not None and embeds.shape[1] == 1 else 0


# ---------------------------------------------------------------- one reply


def test_streams_several_increments_with_stats(random_handle, images):
    reply = engine_for(random_handle).submit(turns_of(images["red"], images["blue"], "Describe both."), SAMPLE)
    prompt_tokens = reply.inputs["input_ids"].shape[-1]  # the processor's tensors, for the inspector, until read
    pieces = list(reply)
    assert len(pieces) >= 5 and all(isinstance(p, str) and p for p in pieces)
    assert reply.inputs is None and reply.request.inputs is None  # no image tensor outlives the reading
    stats = reply.stats
    assert stats.prompt_tokens == prompt_tokens and stats.images == 2
    assert stats.new_tokens == 40 and stats.stop_reason == "length" and reply.finish_reason == "length"
    assert 0 < stats.time_to_first_token_s < stats.total_s and stats.tokens_per_s > 0
    assert stats.place_in_line is None and stats.prefilled_tokens == stats.prompt_tokens


@pytest.fixture(scope="module")
def eager_handle(random_checkpoint):
    """The random-weight build with eager attention (which adds its mask to the scores)."""
    return load_model(parse_settings(["--model", str(random_checkpoint), "--attn", "eager"], environ={}))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("params", [GenerationParams(max_new_tokens=30),
                                    GenerationParams(max_new_tokens=60, temperature=1.0, top_p=0.8, seed=5,
                                                     repetition_penalty=1.3)], ids=["greedy", "sampled"])
def test_a_reply_alone_is_bit_for_bit_what_generate_gives(dtype, params, attn, random_checkpoint, images):
    """Today's path was model.generate with a static cache: same logits (bitwise), same tokens, same text — under
    every attention implementation the app offers (eager adds its mask to the scores: a boolean one masked nothing)."""
    handle = load_model(parse_settings(["--model", str(random_checkpoint), "--dtype", dtype, "--attn", attn,
                                        "--cache-mb", "0"], environ={}))
    assert handle.model.config._attn_implementation == attn
    turns = turns_of(images["red"], images["green"], "Describe both.")
    reply = engine_for(handle).submit(turns, params, record_logits=True)
    text = "".join(reply)
    inputs = inputs_of(handle, turns)
    want = generate_text(handle, inputs, params, output_logits=True, return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    assert reply.request.tokens == want.sequences[0, prompt:].tolist()
    assert len(reply.request.logits) == len(want.logits)
    assert all(torch.equal(got, w[0]) for got, w in zip(reply.request.logits, want.logits, strict=True))
    assert text == generate_text(handle, inputs, params)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_prompt_reused_but_for_its_last_token_is_still_generates_reply(random_checkpoint, images, attn):
    """Asked again, a prompt is read from the reuse cache but for its last token: a one-token prefill, whose query must
    still be masked from the rest of its row (transformers skips that mask for caches it thinks grow: the first token
    then differed). Its logits round differently from the whole prompt read at once (~1e-6), its tokens do not."""
    handle = load_model(parse_settings(["--model", str(random_checkpoint), "--attn", attn], environ={}))
    engine, turns = engine_for(handle), turns_of(images["red"], "Describe it.")
    params = replace(GREEDY, max_new_tokens=40)
    first = engine.submit(turns, params, record_logits=True)
    "".join(first)
    again = engine.submit(turns, params, record_logits=True)
    text = "".join(again)
    assert again.stats.reused_tokens == again.stats.prompt_tokens - 1
    assert again.request.tokens == first.request.tokens and text == generate_text(handle, inputs_of(handle, turns), params)
    assert max(float((a - b).abs().max()) for a, b in zip(again.request.logits, first.request.logits, strict=True)) < 1e-4


def test_seed_makes_sampling_reproducible(random_handle, images):
    engine = engine_for(random_handle)
    turns = turns_of(images["red"], "Describe it.")
    first = "".join(engine.submit(turns, SAMPLE))
    again = "".join(engine.submit(turns, SAMPLE))
    other = "".join(engine.submit(turns, replace(SAMPLE, seed=999)))
    assert first == again and first != other


def test_stop_strings_end_the_reply_in_the_engine(random_handle, images):
    engine = engine_for(random_handle)
    turns = turns_of(images["red"], "Describe it.")
    full = "".join(engine.submit(turns, replace(GREEDY, max_new_tokens=60)))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    reply = engine.submit(turns, replace(GREEDY, max_new_tokens=60), stop=[stop])
    text = "".join(reply)
    assert text == full[: full.index(stop)] and reply.stats.stop_reason == "stop" and reply.finish_reason == "stop"
    assert reply.stats.new_tokens < 60  # it stopped decoding, not just hid the rest


# ---------------------------------------------------------------- stop, failures, stalls: one request only


def test_cancel_ends_the_request_at_its_next_step(random_handle, images):
    engine = engine_for(random_handle)
    with lm_hook(random_handle, lambda step, kw: time.sleep(0.01)) as calls:
        reply = engine.submit(turns_of(images["red"], "Describe it."), replace(SAMPLE, max_new_tokens=2000))
        stream = iter(reply)
        for _ in range(3):
            next(stream)
        reply.cancel()
        assert wait_until(lambda: reply.request.finished, 1.0), "the reply kept decoding after cancel"
        decoded = calls["n"]
        rest = list(stream)
        time.sleep(0.1)
        assert calls["n"] == decoded, "tokens were decoded after the request ended"
    assert reply.stats.stop_reason == "stopped" and reply.stats.new_tokens < 50 and len(rest) < 5
    assert not engine.scheduler.busy


def test_closing_the_stream_stops_the_request(random_handle, images):
    """What gradio does when an event is cancelled or the client goes away."""
    engine = engine_for(random_handle)
    with lm_hook(random_handle, lambda step, kw: time.sleep(0.01)):
        reply = engine.submit(turns_of(images["red"], "Describe it."), replace(SAMPLE, max_new_tokens=2000))
        stream = iter(reply)
        next(stream)
        stream.close()
        assert wait_until(lambda: not engine.scheduler.busy, 1.0)
    assert reply.stats.stop_reason == "stopped"


def test_out_of_memory_in_a_prefill_ends_that_request_only(random_handle, images):
    engine = engine_for(random_handle)
    turns = turns_of(images["red"], "Describe it.")
    with lm_hook(random_handle, lambda step, kw: time.sleep(0.005)):
        running = engine.submit(turns, replace(GREEDY, max_new_tokens=300))
        stream = iter(running)
        next(stream)

        def boom(step, kwargs):
            if kwargs["inputs_embeds"].shape[1] > 1:  # a prefill
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        with lm_hook(random_handle, boom):
            failing = engine.submit(turns_of(images["blue"], images["green"], "Describe both."), GREEDY)
            with pytest.raises(OutOfMemory, match=r"Out of memory.*2 image\(s\).*fewer or smaller images"):
                list(failing)
        rest = "".join(stream)
    assert failing.stats.stop_reason == "error"
    assert running.stats.stop_reason == "length" and running.stats.new_tokens == 300 and rest
    assert "".join(engine.submit(turns, GREEDY))  # the next request is served


def test_out_of_memory_in_a_shared_step_ends_the_newest_joiner(random_handle, images):
    bare = replace(random_handle, reuse=ReuseCache(0))
    engine = engine_for(bare, decode="together")
    first = engine.submit(turns_of(images["red"], "Describe it."), replace(GREEDY, max_new_tokens=200))
    stream = iter(first)
    head = next(stream)
    failed = {"done": False}

    def boom(step, kwargs):
        if decode_rows(kwargs) == 2 and not failed["done"]:
            failed["done"] = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        if decode_rows(kwargs):
            time.sleep(0.005)  # the first reply is still decoding when the newest joins

    with lm_hook(bare, boom):
        newest = engine.submit(turns_of(images["blue"], "Describe it."), replace(GREEDY, max_new_tokens=200))
        with pytest.raises(OutOfMemory):
            list(newest)
        rest = "".join(stream)
    assert failed["done"] and first.stats.stop_reason == "length" and first.stats.new_tokens == 200
    alone = "".join(engine_for(bare).submit(turns_of(images["red"], "Describe it."), replace(GREEDY, max_new_tokens=200)))
    assert head + rest == alone  # the survivor's reply went on as it would alone


def test_other_failures_are_named(random_handle, images):
    def boom(step, kwargs):
        raise RuntimeError("index out of range in self")

    with lm_hook(random_handle, boom), pytest.raises(GenerationError, match="RuntimeError: index out of range"):
        list(engine_for(random_handle).submit(turns_of(images["red"], "Hi"), SAMPLE))


def test_a_failing_row_in_a_shared_step_ends_only_its_request(random_handle, images):
    engine = engine_for(random_handle, decode="together")
    pool = engine.scheduler.pool
    watched = {}

    def boom(step, kwargs):  # fails any decode forward that holds the bad request's row
        bad_row = watched["bad"].request.row if "bad" in watched else -1
        if decode_rows(kwargs) and pool._start <= bad_row < pool._end and watched["bad"].stats.new_tokens > 3:
            raise RuntimeError("device assert in one row")

    good = engine.submit(turns_of(images["red"], "Describe it."), replace(GREEDY, max_new_tokens=150))
    stream = iter(good)
    next(stream)
    with lm_hook(random_handle, boom):
        watched["bad"] = bad = engine.submit(turns_of(images["blue"], "Describe it."), replace(GREEDY, max_new_tokens=150))
        with pytest.raises(GenerationError, match="device assert in one row"):
            list(bad)
        "".join(stream)
    assert good.stats.stop_reason == "length" and good.stats.new_tokens == 150


def test_no_progress_at_all_is_a_stall(random_handle, images):
    with lm_hook(random_handle, lambda step, kw: time.sleep(1.5) if step == 3 else None):
        reply = engine_for(random_handle, timeout=0.5).submit(turns_of(images["red"], "Hi"), SAMPLE)
        with pytest.raises(GenerationTimeout, match="stalled"):
            list(reply)
    # The consumer asked to stop; the scheduler ends the request once its stalled step returns, and says why.
    assert wait_until(lambda: reply.stats.stop_reason == "timeout", 5)


def test_a_long_prefill_is_progress_not_a_stall(random_handle, images):
    """Each layer of a slow prompt (and of its image encoders) counts as progress; only silence is a stall."""
    layers = [m for name, mod in random_handle.model.named_modules()
              if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") for m in mod]
    slow = [layer.register_forward_pre_hook(lambda module, args: time.sleep(0.3)) for layer in layers]
    try:
        bare = replace(random_handle, reuse=ReuseCache(0))  # every image encoded, every prompt token fed
        reply = engine_for(bare, timeout=1.0).submit(turns_of(images["red"], images["blue"], "Hi"),
                                                     replace(GREEDY, max_new_tokens=3))
        t0 = time.perf_counter()
        text = "".join(reply)
    finally:
        for hook in slow:
            hook.remove()
    assert time.perf_counter() - t0 > 2.0  # the prompt alone took longer than the timeout
    assert reply.stats.stop_reason == "length" and text


# ---------------------------------------------------------------- many at once


def read_all(replies, timeout: float = 120):
    """Read every reply at once, each in its own thread: its text, or the GenerationError it ended with."""
    results = [None] * len(replies)

    def read(i):
        try:
            results[i] = "".join(replies[i])
        except GenerationError as exc:
            results[i] = exc

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(replies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def run_together(engine, requests, params):
    """Submit all, then read all at once; (replies, texts)."""
    replies = [engine.submit(turns, params, record_logits=True) for turns in requests]
    return replies, read_all(replies)


@pytest.fixture(scope="module")
def eager_trained():
    """The bundled (trained) checkpoint with eager attention."""
    return load_model(parse_settings(["--model", "tiny", "--attn", "eager"], environ={}))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["together", "rows"])
def test_answers_asked_together_equal_the_same_questions_asked_alone(handle, eager_trained, mode, attn):
    handle = handle if attn == "sdpa" else eager_trained
    questions = [turns_of(str(EXAMPLES / "red_circle.png"), "What colour is the shape?"),
                 turns_of(str(EXAMPLES / "green_triangle.png"), "What shape is it?"),
                 turns_of(str(EXAMPLES / "three_shapes.png"), "How many shapes are there?"),
                 turns_of(str(EXAMPLES / "blue_square.png"), str(EXAMPLES / "yellow_circle.png"),
                          "What colour is the second image?")]
    alone_handle = replace(handle, reuse=ReuseCache(0))
    alone = ["".join(engine_for(alone_handle).submit(q, GREEDY)) for q in questions]
    steps = {"max": 0}
    gate = threading.Event()

    def watch(step, kwargs):
        gate.wait(30)  # the first prompt is read only once all four are in line
        rows = decode_rows(kwargs)
        steps["max"] = max(steps["max"], rows)
        if rows:
            time.sleep(0.05)  # decode steps slowed a little, so that the replies overlap

    engine = engine_for(alone_handle, decode=mode)
    with lm_hook(handle, watch):
        replies = [engine.submit(q, GREEDY) for q in questions]
        gate.set()
        together = [None] * len(replies)
        readers = [threading.Thread(target=lambda i=i: together.__setitem__(i, "".join(replies[i])))
                   for i in range(len(replies))]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(60)
    assert together == alone and all(together)
    assert steps["max"] >= 2 if mode == "together" else steps["max"] == 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_decoded_one_by_one_are_bit_for_bit_what_each_gives_alone(random_handle, eager_handle, images, attn):
    """With one forward per row and prompts read in one piece, batching changes nothing at all."""
    bare = replace(random_handle if attn == "sdpa" else eager_handle, reuse=ReuseCache(0))
    requests = [turns_of(images[c], f"Describe the {c} one.") for c in ("red", "blue", "green")]
    params = replace(SAMPLE, max_new_tokens=60)
    with lm_hook(bare, lambda step, kw: time.sleep(0.005) if decode_rows(kw) else None):
        replies, texts = run_together(engine_for(bare, decode="rows", chunk_tokens=10**6), requests, params)
    assert all(texts)
    for reply, turns in zip(replies, requests, strict=True):
        single = engine_for(bare).submit(turns, params, record_logits=True)
        assert "".join(single) == "".join(texts[replies.index(reply)])
        assert reply.request.tokens == single.request.tokens
        assert all(torch.equal(a, b) for a, b in zip(reply.request.logits, single.request.logits, strict=True))


def test_four_streams_all_start_before_any_ends_and_closing_one_leaves_the_others(random_handle, images):
    engine = engine_for(random_handle, batch=4)
    params = replace(GREEDY, max_new_tokens=400)
    first_at, ended_at = {}, {}
    with lm_hook(random_handle, lambda step, kw: time.sleep(0.002)):
        replies = [engine.submit(turns_of(images[c], f"Describe {c}."), params)
                   for c in ("red", "blue", "green", "red")]

        def read(i):
            for n, _ in enumerate(replies[i]):
                first_at.setdefault(i, time.perf_counter())
                if i == 3 and n == 20:
                    replies[i].close()  # a closed tab
                    break
            ended_at[i] = time.perf_counter()

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(first_at) == 4 and max(first_at.values()) < min(ended_at[i] for i in range(3))
    assert [r.stats.stop_reason for r in replies] == ["length"] * 3 + ["stopped"]
    assert all(r.stats.new_tokens == 400 for r in replies[:3]) and replies[3].stats.new_tokens < 100


def test_batch_one_answers_one_at_a_time(random_handle, images):
    engine = engine_for(random_handle, batch=1)
    rows = {"max": 0}
    with lm_hook(random_handle, lambda step, kw: rows.update(max=max(rows["max"], decode_rows(kw)))):
        replies, texts = run_together(engine, [turns_of(images[c], "Hi") for c in ("red", "blue")],
                                      replace(GREEDY, max_new_tokens=50))
    assert rows["max"] == 1 and all(texts)
    first, second = sorted(replies, key=lambda r: r.request.first_token_at)
    assert second.request.first_token_at > first.request.submitted_at + first.stats.total_s  # after the whole first


def test_waiting_requests_know_their_place_and_a_full_line_is_refused(random_handle, images):
    engine = engine_for(random_handle, batch=1, queue_size=2)
    turns = turns_of(images["red"], "Hi")
    with lm_hook(random_handle, lambda step, kw: time.sleep(0.01)):
        running = engine.submit(turns, replace(GREEDY, max_new_tokens=2000))
        assert wait_until(lambda: running.stats.new_tokens > 0)
        second, third = engine.submit(turns, GREEDY), engine.submit(turns, GREEDY)
        assert (second.stats.place_in_line, third.stats.place_in_line) == (1, 2)
        with pytest.raises(EngineBusy, match="2 requests are already waiting"):
            engine.submit(turns, GREEDY)
        second.cancel()  # leaves the line: the next moves up
        assert wait_until(lambda: third.stats.place_in_line == 1)
        running.cancel()
        assert "".join(third) and third.stats.queued_s > 0
    assert second.stats.stop_reason == "stopped" and second.stats.new_tokens == 0


def test_a_request_that_does_not_fit_in_memory_waits_for_room(random_handle, images):
    """The keys/values of running replies count against the budget; a newcomer that would overflow it waits."""
    per_token = kv_bytes_per_token(random_handle.model.config, torch.float32)
    tight = replace(random_handle, reuse=ReuseCache(0), kv_budget_bytes=3000 * per_token)
    engine = engine_for(tight, batch=4)
    rows = {"max": 0}
    with lm_hook(tight, lambda step, kw: (rows.update(max=max(rows["max"], decode_rows(kw))), time.sleep(0.002))):
        replies, texts = run_together(engine, [turns_of(images[c], "Hi") for c in ("red", "blue")],
                                      replace(GREEDY, max_new_tokens=1000))
    assert all(texts) and rows["max"] == 1  # each needs ~1,700 positions: never both at once
    first, second = sorted(replies, key=lambda r: r.request.first_token_at)
    assert second.request.first_token_at > first.request.submitted_at + first.stats.total_s


def test_running_streams_keep_flowing_while_a_newcomer_is_read(random_handle, images):
    """The newcomer's image encoders are slow (0.2 s a layer); the running reply still gets a token between
    their layers instead of waiting for the whole encode."""
    engine = engine_for(replace(random_handle, reuse=ReuseCache(0)), decode="together")  # the image is encoded
    running = engine.submit(turns_of(images["red"], "Describe it."), replace(GREEDY, max_new_tokens=3000))
    times = []
    reader = threading.Thread(target=lambda: [times.append(time.perf_counter()) for _ in running])
    reader.start()
    assert wait_until(lambda: len(times) > 5)
    vision = [m for name, mod in random_handle.model.named_modules() if isinstance(mod, torch.nn.ModuleList)
              and name.endswith("layers") and "vision" in name for m in mod]
    slow = [layer.register_forward_pre_hook(lambda module, args: time.sleep(0.2)) for layer in vision]
    try:
        t0 = time.perf_counter()
        newcomer = engine.submit(turns_of(images["blue"], "Describe it."), replace(GREEDY, max_new_tokens=5))
        assert wait_until(lambda: newcomer.stats.new_tokens > 0, 30)
        t1 = time.perf_counter()
        "".join(newcomer)
    finally:
        for hook in slow:
            hook.remove()
        running.cancel()
        reader.join(10)
    window = [t for t in times if t0 <= t <= t1]
    gaps = [b - a for a, b in zip([t0, *window], [*window, t1], strict=True)]
    assert t1 - t0 > 4 * 0.2  # four slow vision layers
    assert len(window) >= 3 and max(gaps) < 0.45  # a token at least between every two slow layers


def test_inline_mode_drives_the_engine_from_the_consumer(random_handle, images):
    """ZeroGPU lends the GPU inside the request's own call: no engine thread, the consumer steps it."""
    settings = replace(SETTINGS, zero_gpu=True)
    engine = Engine(replace(random_handle, reuse=ReuseCache(0)), settings)
    assert engine.batch == 1 and engine.scheduler.inline
    reply = engine.submit(turns_of(images["red"], "Hi"), GREEDY)
    assert "".join(reply) and reply.stats.new_tokens == GREEDY.max_new_tokens
    assert engine.scheduler._thread is None


# ---------------------------------------------------------------- encode on attach


def test_prefetch_encodes_an_attached_image_only_while_the_model_is_idle(random_handle, images, tmp_path):
    on, off = replace(random_handle, reuse=ReuseCache(2**30)), replace(random_handle, reuse=ReuseCache(0))
    engine = engine_for(on)
    prefetcher = Prefetcher(engine, lambda path: load_image(path, Limits()))
    with lm_hook(on, lambda step, kw: time.sleep(0.005)):
        running = engine.submit(turns_of(images["red"], "Describe it."), replace(GREEDY, max_new_tokens=2000))
        stream = iter(running)
        next(stream)
        assert prefetcher.submit([images["blue"]]) == 1 and prefetcher.submit([images["blue"]]) == 0
        time.sleep(0.5)
        assert prefetcher.encoded == 0  # a reply runs: the image waits, the reply is not slowed
        running.cancel()
        list(stream)
    assert wait_until(lambda: prefetcher.encoded == 1)  # the model went idle: encoded in the background
    turns = turns_of(images["blue"], "And this one?")
    reply = engine.submit(turns, GREEDY)
    text = "".join(reply)
    assert reply.stats.images_reused == 1 and text == "".join(engine_for(off).submit(turns, GREEDY))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert prefetcher.submit([str(bad)]) == 1
    time.sleep(0.3)
    assert prefetcher.encoded == 1 and prefetcher._thread.is_alive()  # skipped; the reply will name the problem
    assert Prefetcher(engine_for(off), lambda path: load_image(path, Limits())).submit([images["green"]]) == 0


# ---------------------------------------------------------------- parameters


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
