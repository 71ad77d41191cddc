"""Saved conversations: the browser's record and the export file (round trip, version, caps, refusals)."""

import base64
import json
from pathlib import Path

import pytest

from dsvl_app import saved
from dsvl_app.media import ImageRejected, load_image
from dsvl_app.settings import Limits
from dsvl_app.store import ImageStore

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
GENERATION = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 0.95, "repetition_penalty": 1.0, "seed": 3}


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store", 50 * 2**20)


def history():
    """A chat as the browser sends it: a numbered image component, text, a reply, a follow-up."""
    return [
        {"role": "user", "content": {"component": "image", "value": {"path": str(EXAMPLES / "red_circle.png")}}},
        {"role": "user", "content": "What colour is the shape?"},
        {"role": "assistant", "content": "The shape is red."},
        {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": "It is a circle."},
    ]


def check(path, name):
    try:
        load_image(path, Limits())
    except ImageRejected as exc:
        raise ValueError(f"“{name}” {exc.reason}") from None


def parse(data: bytes, store, **caps):
    return saved.parse_export(data, caps.get("max_bytes", 10 * 2**20), caps.get("max_images", 8), store, check)


def test_history_becomes_text_and_image_hashes(store):
    messages = saved.messages_from_history(history(), store)
    assert messages[0] == {"role": "user", "image": store.put_file(EXAMPLES / "red_circle.png"), "name": "red_circle.png"}
    assert [m.get("text") for m in messages[1:]] == ["What colour is the shape?", "The shape is red.",
                                                     "What shape is it?", "It is a circle."]
    assert saved.title_of(messages) == "What colour is the shape?"


def test_the_record_keeps_several_conversations_newest_first(store):
    messages = saved.messages_from_history(history(), store)
    record, first = saved.upsert(saved.empty_record(), None, messages, now=100)
    record, second = saved.upsert({**record, "current": None}, None, messages[:3], now=200)
    assert [c["id"] for c in record["conversations"]] == [second, first] and record["current"] == second
    record, same = saved.upsert(record, first, messages, now=300)  # saving again updates, never duplicates
    assert same == first and [c["id"] for c in record["conversations"]] == [first, second]
    assert saved.remove(record, first)["current"] == second
    assert saved.upsert(record, first, [])[0]["conversations"][0]["id"] == second  # emptied: dropped
    assert saved.valid_record({"version": 99}) == saved.empty_record() == saved.valid_record("garbage")


def test_export_round_trip_keeps_messages_images_and_settings(store, tmp_path):
    record, current = saved.upsert(saved.empty_record(), None, saved.messages_from_history(history(), store))
    conversation = saved.find(record, current)
    document = saved.export_document(conversation, store, "tiny-dsvl-hybrid", GENERATION)
    assert document["format"] == saved.FORMAT and document["version"] == saved.VERSION and document["model"]
    image = document["messages"][0]["content"][0]
    assert image["type"] == "image" and image["media_type"] == "image/png" and image["name"] == "red_circle.png"
    elsewhere = ImageStore(tmp_path / "other", 50 * 2**20)  # another server, an empty store
    messages, generation, title = parse(json.dumps(document).encode(), elsewhere)
    assert messages == conversation["messages"] and generation == GENERATION and title == conversation["title"]
    assert elsewhere.get(messages[0]["image"]).read_bytes() == (EXAMPLES / "red_circle.png").read_bytes()


def document_with(**changes):
    image = base64.b64encode((EXAMPLES / "blue_square.png").read_bytes()).decode()
    base = {"format": saved.FORMAT, "version": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "name": "b.png", "media_type": "image/png", "data": image}, {"type": "text", "text": "Hi"}]}]}
    return json.dumps({**base, **changes}).encode()


@pytest.mark.parametrize("data, caps, words", [
    (b"{not json", {}, "not JSON"),
    (json.dumps({"hello": 1}).encode(), {}, "not a dsvl-chat conversation"),
    (document_with(version=2), {}, "version 2; this dsvl-chat reads version 1 — it was written by a newer"),
    (document_with(messages=[]), {}, "no messages"),
    (document_with(messages=[{"role": "robot", "content": []}]), {}, "Message 1 is not a user or assistant"),
    (document_with(), {"max_bytes": 1000}, "over the 0 MB"),
    (document_with(), {"max_images": 0}, "more than 0 images"),
    (document_with(messages=[{"role": "user", "content": [{"type": "image", "name": "x.png", "data": "@@"}]}]), {},
     "Image 1 (x.png) in message 1 is not valid base64"),
    (document_with(messages=[{"role": "user", "content": [
        {"type": "image", "name": "notes.png", "data": base64.b64encode(b"plain text").decode()}]}]), {},
     "“notes.png” is a text file, not an image"),
    (document_with(messages=[{"role": "assistant", "content": [{"type": "image", "data": ""}]}]), {}, "type 'image'"),
])
def test_bad_files_are_refused_with_the_reason(store, data, caps, words):
    with pytest.raises(saved.ImportRefused, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse(data, store, **caps)
    assert store.nbytes() == 0  # a refused image is not kept


def test_an_image_no_longer_stored_is_shown_as_missing(store):
    messages = saved.messages_from_history(history(), store)
    store.clear()
    shown = saved.to_display(messages, store)
    assert shown[0].missing and shown[0].name == "red_circle.png" and shown[1].text == "What colour is the shape?"
    document = saved.export_document({"messages": messages}, store, "m", {})
    assert "no longer stored" in document["messages"][0]["content"][0]["text"]


def test_a_reopened_conversation_keeps_its_files_original_names():
    from dsvl_app.saved import keep_names

    previous = [{"role": "user", "image": "ab12", "name": "report.pdf"}, {"role": "user", "text": "What is it?"}]
    reopened = [{"role": "user", "image": "ab12", "name": "ab12"}, {"role": "user", "text": "What is it?"},
                {"role": "user", "image": "cd34", "name": "cd34"}, {"role": "user", "image": "ef56", "name": "new.png"}]
    assert [m.get("name") for m in keep_names(reopened, previous)] == ["report.pdf", None, "cd34", "new.png"]
