"""Per-request sampling pieces: text increments as the streamer prints them, stop strings, generate's processors."""

import torch
from transformers import GenerationConfig

from dsvl_app.sampling import GenerationParams, Sampler, StopText, TextStream, checkpoint_defaults, logits_processors


def test_stop_text_cuts_at_the_first_stop_string_across_pieces():
    stop = StopText(["</end>", "STOP"])
    out = [stop.feed(p) for p in ["Hello ", "wor", "ld </e", "nd> more"]]
    assert "".join(out) == "Hello world " and stop.stopped and stop.feed("x") == ""
    assert out[2] == "ld "  # "</e" was held back: it could have begun a stop string
    held = StopText(["STOP"])
    assert held.feed("a ST") == "a " and held.flush() == "ST" and held.text == "a ST" and not held.stopped
    assert StopText([]).feed("anything") == "anything"


def test_text_stream_prints_per_token_and_waits_for_whole_characters(handle):
    tokenizer = handle.processor.tokenizer
    text = "Hi é ünïcode 🙂\nnext line"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # half a character is never printed
    assert stream.put(tokenizer.eos_token_id) == ""  # special tokens are skipped


def test_processors_are_generates_own(handle):
    """Sampling gets generate's defaults too (top-k 50 from the generation config); greedy gets none."""
    names = [type(p).__name__ for p in logits_processors(handle.model, GenerationParams(temperature=0.7, top_p=0.9,
                                                                                       repetition_penalty=1.1), 10)]
    assert names == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
                     "TopPLogitsWarper"]
    assert not logits_processors(handle.model, GenerationParams(), 10)


def test_a_requests_draws_do_not_depend_on_anything_else(handle):
    """Its own generator, seeded as torch.manual_seed seeds the default one: the same draws whoever else samples."""
    params = GenerationParams(temperature=1.0, top_p=1.0, seed=42)
    history, logits = torch.tensor([[1, 2, 3]]), torch.randn(1, 300)
    first = [Sampler(handle.model, params, 3).choose(history, logits)[0] for _ in range(3)]
    sampler = Sampler(handle.model, params, 3)
    torch.manual_seed(0)
    mine = [sampler.choose(history, logits)[0] for _ in range(5)]
    torch.rand(1000)  # someone else draws from the default generator meanwhile
    other = Sampler(handle.model, params, 3)
    assert first == [mine[0]] * 3 and [other.choose(history, logits)[0] for _ in range(5)] == mine
    torch.manual_seed(42)  # what generate's users do; then generate draws from the default generator
    scores = logits_processors(handle.model, params, 3)(history, logits.clone())
    assert mine[0] == int(torch.multinomial(torch.softmax(scores, -1), 1))


def test_what_a_request_gets_for_the_sampling_it_leaves_out_is_the_checkpoints():
    """A checkpoint that does not sample (the bundled one) answers greedily; one that does gives its own settings;
    top-k is what generate would use (transformers' 50 where the checkpoint sets none)."""
    assert checkpoint_defaults(GenerationConfig()) == {"temperature": 0.0, "top_p": 1.0, "top_k": 50}
    sampling = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20)
    assert checkpoint_defaults(sampling) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert checkpoint_defaults(GenerationConfig(do_sample=True, temperature=0.7))["top_k"] == 50
