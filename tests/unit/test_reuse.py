"""Reuse across turns: keys, matching, the store's cap/LRU/expiry, and exactness against a full recompute."""

import threading
import time
from dataclasses import replace

import pytest
import torch
from PIL import Image

from dsvl_app import conversation as conv
from dsvl_app import reuse
from dsvl_app.engine import Engine, GenerationError, GenerationParams, OutOfMemory
from dsvl_app.reuse import ImageSpan, ReuseCache, image_keys, image_spans, reusable_length
from dsvl_app.settings import Limits, parse_settings
from tests.conftest import EXAMPLES, load_script

GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0)
LIMITS = Limits()
SETTINGS = parse_settings(["--model", "tiny"], environ={})


# ---------------------------------------------------------------- helpers: the engine path ChatApp.stream takes


def reply(handle, history, message, params=GREEDY, context=None, stop_after=None, engine=None):
    """One turn as the app runs it: history + message → the engine (budget, processor, reuse, decode); (text, stats)."""
    if context is not None:
        handle = replace(handle, context_tokens=context)
    engine = engine or Engine(handle, SETTINGS)
    answer = engine.submit(conv.conversation_turns(history, message), params, new=conv.parse_message(message))
    pieces = []
    with answer:
        for piece in answer:
            pieces.append(piece)
            if stop_after is not None and len(pieces) >= stop_after:
                answer.cancel()
    return "".join(pieces), answer.stats


def exchange(message, text):
    """The chat history entries of one answered user message (gradio's messages format)."""
    return ([{"role": "user", "content": {"path": path}} for path in message.get("files", [])]
            + [{"role": "user", "content": message["text"]}, {"role": "assistant", "content": text}])


def with_cache(handle, capacity=2**30, **kwargs):
    """The same model with its own reuse store (capacity 0: reuse off)."""
    return replace(handle, reuse=ReuseCache(capacity, **kwargs))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reuse-images")
    paths = {}
    for name, colour, size in [("red", (220, 30, 30), (120, 90)), ("blue", (30, 40, 220), (64, 64)),
                               ("green", (30, 200, 60), (200, 100)), ("yellow", (240, 220, 20), (90, 140))]:
        paths[name] = str(folder / f"{name}.png")
        Image.new("RGB", size, colour).save(paths[name])
    return paths


@pytest.fixture(scope="session")
def low_res_handle(tmp_path_factory):
    """The 1.3B's family (DeepseekVLForConditionalGeneration, SigLIP only) in tiny random weights."""
    from dsvl_app.model import load_model

    path = load_script("build_tiny_checkpoint").build(tmp_path_factory.mktemp("low-res") / "ckpt", low_res_only=True)
    return load_model(parse_settings(["--model", str(path)], environ={}))


@pytest.fixture(params=["trained", "random-hybrid", "random-low-res"])
def any_handle(request, handle, random_handle, low_res_handle):
    return {"trained": handle, "random-hybrid": random_handle, "random-low-res": low_res_handle}[request.param]


# ---------------------------------------------------------------- keys and matching (pure)


def test_image_keys_tell_images_apart_and_do_not_depend_on_the_batch(handle, images):
    red, blue = Image.open(images["red"]).convert("RGB"), Image.open(images["blue"]).convert("RGB")
    processor = handle.processor.image_processor
    both = image_keys(processor(images=[red, blue], return_tensors="pt"))
    alone = image_keys(processor(images=[blue], return_tensors="pt"))
    again = image_keys(processor(images=[red.copy()], return_tensors="pt"))
    assert len(set(both)) == 2 and alone == [both[1]] and again == [both[0]]


def test_image_spans_and_mismatches():
    ids = torch.tensor([5, 9, 9, 9, 7, 9, 9, 9, 8])
    assert image_spans(ids, 9, 3, ["a", "b"]) == (ImageSpan(1, 4, "a"), ImageSpan(5, 8, "b"))
    with pytest.raises(ValueError, match="placeholders"):
        image_spans(ids, 9, 3, ["a"])
    with pytest.raises(ValueError, match="contiguous"):
        image_spans(torch.tensor([9, 1, 9, 9]), 9, 3, ["a"])


def test_reusable_length_rules():
    cached = torch.tensor([1, 2, 9, 9, 9, 3, 4, 5, 6])
    spans = (ImageSpan(2, 5, "red"),)
    same_image = torch.tensor([1, 2, 9, 9, 9, 3, 4, 7, 7, 7])
    assert reusable_length(cached, spans, same_image, spans) == 7  # the common prefix
    # The same ids with a different image: nothing from that image on.
    assert reusable_length(cached, spans, same_image, (ImageSpan(2, 5, "blue"),)) == 2
    # A prompt equal to the cached sequence (regenerate): its last token is always fed again.
    assert reusable_length(cached, spans, cached, spans) == len(cached) - 1
    # A prompt that ends inside an image run would split it: cut back to the run's start.
    ends_in_image = torch.tensor([1, 2, 9, 9])
    assert reusable_length(torch.tensor([1, 2, 9, 9, 9, 3]), (ImageSpan(2, 5, "red"),),
                           torch.tensor([1, 2, 9, 9, 9, 3, 8]), (ImageSpan(2, 5, "red"),)) == 6
    assert reusable_length(ends_in_image, (), torch.tensor([1, 2, 9, 9, 9, 1]), (ImageSpan(2, 5, "red"),)) == 2
    # A placeholder id the entry holds as generated text, where the new prompt has an image: not the same image.
    generated = torch.tensor([1, 2, 9, 9, 9, 4])
    assert reusable_length(generated, (), torch.tensor([1, 2, 9, 9, 9, 4, 4]), (ImageSpan(2, 5, "red"),)) == 2


# ---------------------------------------------------------------- the store


def _features(n_bytes: int) -> torch.Tensor:
    return torch.zeros(n_bytes // 4, dtype=torch.float32)


def test_store_never_exceeds_its_cap_and_evicts_least_recently_used():
    store = ReuseCache(10_000)
    for i in range(12):
        store.put_features(f"img{i}", _features(2_000))
        assert store.nbytes <= 10_000
        assert store.get_features("img0") is not None  # used every time: never the least recent
    assert store.get_features("img0") is not None and store.get_features("img1") is None
    assert store.stats().evicted >= 7 and store.nbytes <= 10_000
    assert not store.put_features("huge", _features(20_000)) and store.stats().dropped_too_big == 1
    kv = ((torch.zeros(1, 1, 100, 4), torch.zeros(1, 1, 100, 4)),)  # 3,200 bytes
    for i in range(6):
        store.put_prefix(torch.arange(i * 1000, i * 1000 + 100), (), kv)
        assert store.nbytes <= 10_000


def test_idle_entries_expire_and_zero_capacity_is_off():
    now = [0.0]
    store = ReuseCache(10_000, idle_s=60, clock=lambda: now[0])
    store.put_features("a", _features(400))
    now[0] = 30
    store.put_features("b", _features(400))
    now[0] = 70
    assert store.get_features("a") is None and store.get_features("b") is not None
    assert store.stats().expired == 1
    off = ReuseCache(0)
    assert not off.enabled and not off.put_features("a", _features(400)) and off.get_features("a") is None


def test_janitor_drops_idle_entries_without_any_request():
    store = ReuseCache(10_000, idle_s=0.2)
    store.put_features("a", _features(400))
    deadline = time.monotonic() + 5
    while store.nbytes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.nbytes == 0


def test_taking_an_entry_removes_it_a_short_match_copies_and_a_longer_entry_replaces_its_prefix():
    store = ReuseCache(10**8)
    ids = torch.arange(100)
    kv = ((torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4)),)
    store.put_prefix(ids, (), kv)
    longer = torch.arange(150)
    store.put_prefix(longer, (), ((torch.randn(1, 2, 150, 4), torch.randn(1, 2, 150, 4)),))
    assert store.stats().prefix_entries == 1  # the 100-token entry was a prefix of the new one
    other = torch.cat([torch.arange(10), torch.full((200,), 7)])  # shares 10 tokens only
    taken = store.take_prefix(other, ())
    assert taken.length == 10
    assert store.stats().prefix_entries == 1  # the long entry stays for its own conversation
    follow_up = torch.arange(160)
    taken = store.take_prefix(follow_up, ())
    assert taken.length == 150 and store.stats().prefix_entries == 0  # taken out while generate runs
    assert store.take_prefix(follow_up, ()).kv is None


# ---------------------------------------------------------------- exactness: greedy replies equal a full recompute


def test_replies_with_reuse_equal_a_full_recompute(any_handle, images):
    """Several images per turn, a new image later, text only, retry, undo + a new question, edit of turn 1."""
    on, off = with_cache(any_handle), with_cache(any_handle, 0)
    t1 = {"text": "What colour is the first image?", "files": [images["red"], images["blue"]]}
    t2 = {"text": "What colour is the image?", "files": [images["green"]]}
    t3 = {"text": "How many shapes are there?", "files": []}
    t3b = {"text": "What colour is the second image?", "files": []}
    t1_edited = {"text": "What colour is the second image?", "files": [images["red"], images["blue"]]}
    t4 = {"text": "What shape is it?", "files": [images["yellow"], images["red"]]}

    def both(history, message):
        got, stats = reply(on, history, message)
        want, _ = reply(off, history, message)
        assert got == want, (message, stats)
        return got, stats

    r1, s1 = both([], t1)
    h1 = exchange(t1, r1)
    r2, s2 = both(h1, t2)
    assert s2.reused_tokens > 1152 and s2.images_reused == 2  # turn 1 (both images) came from the cache
    h2 = h1 + exchange(t2, r2)
    r3, s3 = both(h2, t3)
    # At least turn 2's whole prompt (random replies may not re-encode to the ids they were generated as).
    assert s3.reused_tokens >= s2.prompt_tokens and s3.images_reused == 3
    retried, s_retry = both(h2, t3)  # retry: the same prompt again, its reply now cached too
    assert retried == r3 and s_retry.reused_tokens == s_retry.prompt_tokens - 1
    _, s_undo = both(h2, t3b)  # undo turn 3, ask something else
    assert s_undo.reused_tokens >= s2.prompt_tokens
    _, s_edit = both([], t1_edited)  # edit turn 1's text: its images are still reused
    assert s_edit.reused_tokens >= 2 * 576 and s_edit.images_reused == 2
    r4, s4 = both(h2 + exchange(t3, r3), t4)
    assert s4.images == 5 and s4.images_reused == 4  # only yellow was encoded: red's features were still cached
    assert on.reuse.nbytes > 0 and off.reuse.nbytes == 0


@pytest.mark.parametrize("which", ["random-hybrid", "random-low-res"])
def test_the_engines_static_cache_decodes_what_plain_generate_does(which, random_handle, low_res_handle, images):
    """The engine's own cache (static, written in place) against transformers' default (dynamic)."""
    handle = {"random-hybrid": random_handle, "random-low-res": low_res_handle}[which]
    message = {"text": "Describe both.", "files": [images["red"], images["green"]]}
    prompt = conv.build_prompt(handle.processor, [], message, LIMITS, handle.context_tokens, 64)
    inputs = conv.encode(handle.processor, prompt.messages)
    with torch.inference_mode():
        plain = handle.model.generate(**inputs, max_new_tokens=64, do_sample=False)
    want = handle.processor.tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for reuse_on in (False, True):
        engine = with_cache(handle, 2**30 if reuse_on else 0)
        assert reply(engine, [], message, GenerationParams(max_new_tokens=64))[0] == want


def test_a_turn_dropped_by_the_context_budget_is_exact(random_handle, images):
    on, off = with_cache(random_handle), with_cache(random_handle, 0)
    history = []
    for colour in ["red", "blue", "green"]:
        message = {"text": f"Describe the {colour} one.", "files": [images[colour]]}
        got, stats = reply(on, history, message, context=1_500)
        want, _ = reply(off, history, message, context=1_500)
        assert got == want
        history += exchange(message, got)
    assert stats.prompt_tokens < 1_500 - GREEDY.max_new_tokens and stats.images == 2  # the oldest exchange went
    assert stats.images_reused == 1  # the blue image kept from turn 2 was not re-encoded; the new green one was


def test_a_stopped_reply_continues_exactly(random_handle, images):
    on, off = with_cache(random_handle), with_cache(random_handle, 0)
    first = {"text": "Tell me about it.", "files": [images["red"]]}
    partial, stats = reply(on, [], first, GenerationParams(max_new_tokens=200), stop_after=5)
    assert stats.stop_reason == "stopped" and stats.new_tokens < 200
    history = exchange(first, partial)
    follow = {"text": "Go on.", "files": []}
    got, stats = reply(on, history, follow)
    assert got == reply(off, history, follow)[0]
    assert stats.reused_tokens > 576


def test_a_resent_history_from_another_client_is_exact(random_handle, images):
    """Entries are found by content, so a stateless API client resending its history reuses too."""
    on, off = with_cache(random_handle), with_cache(random_handle, 0)
    first = {"text": "What is it?", "files": [images["green"]]}
    text, _ = reply(on, [], first)
    resent = [{"role": "user", "content": [{"type": "file", "file": {"path": images["green"]}},
                                           {"type": "text", "text": "What is it?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": text}]}]
    follow = {"text": "And its colour?", "files": []}
    got, stats = reply(on, resent, follow)
    assert got == reply(off, resent, follow)[0] and stats.reused_tokens > 576


def test_a_different_image_in_the_same_place_is_never_reused(handle, monkeypatch):
    """Same token ids, another image: its keys/values must not come from the first image's entry."""
    red_circle = {"text": "What colour is the shape?", "files": [str(EXAMPLES / "red_circle.png")]}
    blue_square = {"text": "What colour is the shape?", "files": [str(EXAMPLES / "blue_square.png")]}
    on = with_cache(handle)
    assert "red" in reply(on, [], red_circle)[0]
    got, stats = reply(on, [], blue_square)
    assert "blue" in got and stats.reused_tokens < 100 and stats.images_reused == 0
    # The control: if keys could not tell images apart, the red circle's entry would answer for the blue square.
    blind = with_cache(handle)
    monkeypatch.setattr(reuse, "image_keys", lambda inputs: ["same"] * int(inputs["pixel_values"].shape[0]))
    reply(blind, [], red_circle)
    wrong, stats = reply(blind, [], blue_square)
    assert "red" in wrong and stats.images_reused == 1


def test_conversations_decoded_together_with_reuse_are_exact(handle, images):
    """Six conversations at once on one engine (four decoded together), each taking its own entry."""
    on, off = with_cache(handle), with_cache(handle, 0)
    engine = Engine(on, SETTINGS, batch=4, decode="together")
    conversations = {
        name: [{"text": "What colour is the image?", "files": [images[name]]}, {"text": "What shape is it?", "files": []}]
        for name in ["red", "green", "yellow"]
    }
    results: dict[str, list[str]] = {}

    def run(name, copy):
        history, replies = [], []
        for message in conversations[name]:
            text, _ = reply(on, history, message, engine=engine)
            replies.append(text)
            history += exchange(message, text)
        results[(name, copy)] = replies

    threads = [threading.Thread(target=run, args=(name, copy)) for name in conversations for copy in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, messages in conversations.items():
        history, want = [], []
        for message in messages:
            text, _ = reply(off, history, message)
            want.append(text)
            history += exchange(message, text)
        assert results[(name, 0)] == results[(name, 1)] == want


# ---------------------------------------------------------------- failures and memory


def _hook(handle, fn):
    return handle.model.model.language_model.register_forward_pre_hook(lambda m, a, k: fn(), with_kwargs=True)


def test_a_failed_generation_gives_its_prefix_back_and_out_of_memory_empties_the_cache(random_handle, images):
    """A turn that fails puts back the earlier turns' keys/values it took (the retry reuses them); out of memory
    empties the cache instead (that memory is the first to give back)."""
    on = with_cache(random_handle)
    first = {"text": "Describe it.", "files": [images["red"]]}
    text, _ = reply(on, [], first)
    assert on.reuse.stats().prefix_entries == 1

    def fail():
        raise RuntimeError("device lost")

    remove = _hook(on, fail)
    try:
        with pytest.raises(GenerationError, match="device lost"):
            reply(on, exchange(first, text), {"text": "More?", "files": []})
    finally:
        remove.remove()
    assert on.reuse.stats().prefix_entries == 1 and on.reuse.stats().feature_entries == 1
    again, stats = reply(on, exchange(first, text), {"text": "More?", "files": []})
    assert stats.reused_tokens > 0 and stats.images_reused == 1  # the retry starts from the earlier turn
    assert again == reply(with_cache(random_handle, 0), exchange(first, text), {"text": "More?", "files": []})[0]

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    remove = _hook(on, oom)
    try:
        with pytest.raises(OutOfMemory):
            reply(on, [], {"text": "Describe it.", "files": [images["blue"]]})
    finally:
        remove.remove()
    assert on.reuse.nbytes == 0  # emptied so the memory goes back
    assert reply(on, [], first)[0] == text  # and the next request is served, exactly


def test_cache_memory_never_goes_above_the_cap_across_conversations(random_handle, images):
    per_turn = 1_000_000  # the tiny model's keys/values take 1 KiB a token: one conversation of ~700 tokens fits
    on = with_cache(random_handle, capacity=per_turn)
    for name in ["red", "blue", "green", "yellow"]:
        history = []
        for question in ["What is it?", "And now?"]:
            message = {"text": question, "files": [images[name]] if not history else []}
            text, _ = reply(on, history, message)
            history += exchange(message, text)
            assert on.reuse.nbytes <= per_turn
    stats = on.reuse.stats()
    assert stats.evicted + stats.dropped_too_big > 0 and stats.nbytes <= per_turn


def test_prefix_hashes_match_exactly_the_shared_blocks_images_by_content():
    """What the replica router matches a conversation's next turn on: one hash per whole 16-token block, each
    covering everything before it, images told apart by their key (their placeholder ids are all alike)."""
    ids = torch.arange(100)
    turn1 = reuse.prefix_hashes(ids[:60], [ImageSpan(20, 36, "cat")])
    turn2 = reuse.prefix_hashes(ids, [ImageSpan(20, 36, "cat")])
    assert len(turn1) == 3 and len(turn2) == 6  # a last partial block is left out
    assert turn2[:3] == turn1  # the next turn extends the earlier prompt
    other_image = reuse.prefix_hashes(ids, [ImageSpan(20, 36, "dog")])
    assert other_image[0] == turn2[0] and other_image[1] != turn2[1]  # differs from the image's block on
    changed = ids.clone()
    changed[50] = 999
    assert reuse.prefix_hashes(changed, [ImageSpan(20, 36, "cat")])[:3] == turn2[:3]
    assert reuse.prefix_hashes(changed, [ImageSpan(20, 36, "cat")])[3] != turn2[3]
