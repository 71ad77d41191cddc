"""The output processor: text increments as transformers' streamer prints them, stop strings, held-back text."""

from dsvl_app.output import ReplyText, StopText, TextStream


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


def test_a_reply_text_drops_the_separator_space_and_stops_at_a_stop_string(handle):
    tokenizer = handle.processor.tokenizer
    ids = tokenizer(" Hello there. END and more", add_special_tokens=False)["input_ids"]
    text = ReplyText(tokenizer, ["END"])
    pieces = [text.put(i) for i in ids]
    assert "".join(pieces) + text.flush() == "Hello there. " and text.stopped
    plain = ReplyText(tokenizer)
    assert "".join(plain.put(i) for i in ids) + plain.flush() == "Hello there. END and more" and not plain.stopped
