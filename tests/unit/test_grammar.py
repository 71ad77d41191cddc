"""Structured answers: schemas checked for what a grammar can enforce; replies held to JSON or a schema inside the
shared decode step, each row on its own (the free rows beside them unchanged); `/v1`'s response_format and forced
tool calls as pure conversions."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dsvl_app import conversation as conv
from dsvl_app.engine import Engine, GenerationParams
from dsvl_app.grammar import SchemaError, json_object, json_schema, mask_rows, unenforceable
from dsvl_app.openai_structured import FieldError, answer_format, forced_tool
from dsvl_app.settings import parse_settings
from tests.conftest import EXAMPLES

SHAPE = {"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "green", "blue", "yellow"]},
    "shape": {"type": "string", "enum": ["circle", "square", "triangle"]}}, "required": ["colour", "shape"],
    "additionalProperties": False}
SETTINGS = parse_settings(["--model", "tiny"], environ={})


def ask(text: str, image: str | None = None) -> list[conv.Turn]:
    parts = (conv.ImageRef(str(EXAMPLES / image)), text) if image else (text,)
    return [conv.Turn("user", parts)]


def test_unenforceable_keywords_are_named_with_their_place():
    schema = {"type": "object", "properties": {
        "a": {"not": {"type": "string"}},
        "b": {"type": "array", "items": {"type": "integer", "uniqueItems": True}},
        "c": {"anyOf": [{"type": "string"}, {"if": {"type": "string"}, "then": {"minLength": 1}}]},
        "d": {"type": "number", "multipleOf": 0.5}, "e": {"type": "integer", "multipleOf": 3},
        "f": {"$ref": "#/$defs/x"}, "g": {"$ref": "other.json"}},
        "$defs": {"x": {"type": "object", "dependentRequired": {"a": ["b"]}}}}
    assert unenforceable(schema) == [
        "'not' (a negated schema) at #/properties/a", "'uniqueItems' at #/properties/b/items",
        "'if'/'then'/'else' at #/properties/c/anyOf/1", "'multipleOf' on a non-integer at #/properties/d",
        "a remote '$ref' (other.json) at #/properties/g", "'dependentRequired' at #/$defs/x"]
    assert unenforceable(SHAPE) == []
    with pytest.raises(SchemaError, match="'not'"):
        json_schema(schema)
    with pytest.raises(SchemaError, match="not valid JSON"):
        json_schema("{nope")
    with pytest.raises(SchemaError, match="must be an object"):
        json_schema([1, 2])
    assert json.loads(json_schema(SHAPE, "shape").schema) == SHAPE
    assert list(json.loads(json_schema(SHAPE).schema)["properties"]) == ["colour", "shape"]  # the order is kept


def test_a_mask_touches_only_the_constrained_rows(handle):
    engine = Engine(handle, SETTINGS)
    grammars = engine.grammars()
    matcher = grammars.matcher(json_schema(SHAPE))
    logits = torch.randn(3, engine.vocab_size)
    before = logits.clone()
    mask_rows([None, matcher, None], logits)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1])
    opening = handle.processor.tokenizer.convert_ids_to_tokens(allowed.nonzero().flatten().tolist())
    assert 0 < int(allowed.sum()) < engine.vocab_size and all(t.startswith("{") for t in opening), opening


def test_held_replies_parse_and_free_replies_beside_them_are_unchanged(handle):
    engine = Engine(handle, SETTINGS, batch=4)
    free = GenerationParams(max_new_tokens=24)
    held = GenerationParams(max_new_tokens=40, answer=json_schema(SHAPE, "shape"))
    alone = "".join(engine.submit(ask("What colour is the shape?", "red_circle.png"), free))
    questions = [("What colour is the shape?", "red_circle.png"), ("What colour is the shape?", "blue_square.png")]
    replies = [engine.submit(ask(*q), p) for q in questions for p in (free, held)]  # free and held side by side
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda r: "".join(r), replies))
    assert texts[0] == alone == "The shape is red." and texts[2] == "The shape is blue."
    for text, reply in ((texts[1], replies[1]), (texts[3], replies[3])):
        answer = json.loads(text)
        assert set(answer) == {"colour", "shape"} and answer["colour"] in SHAPE["properties"]["colour"]["enum"]
        assert answer["shape"] in SHAPE["properties"]["shape"]["enum"]
        assert reply.stats.stop_reason == "stop"  # ended as soon as its JSON was complete


def test_json_object_and_a_cut_reply(handle):
    engine = Engine(handle, SETTINGS)
    reply = engine.submit(ask("Describe it.", "red_circle.png"), GenerationParams(max_new_tokens=6, answer=json_object()))
    text = "".join(reply)
    assert text.startswith("{") and reply.finish_reason == "length" and reply.stats.new_tokens == 6


def test_a_sampled_held_reply_is_valid_json_too(handle):
    engine = Engine(handle, SETTINGS)
    for seed in range(3):
        params = GenerationParams(max_new_tokens=40, temperature=1.5, seed=seed, answer=json_schema(SHAPE))
        answer = json.loads("".join(engine.submit(ask("What is it?", "green_triangle.png"), params)))
        assert set(answer) == {"colour", "shape"}


def test_response_format_and_tool_choice_become_what_the_reply_is_held_to():
    assert answer_format(None) is None and answer_format({"type": "text"}) is None
    assert answer_format({"type": "json_object"}) == json_object()
    fmt = answer_format({"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}})
    assert fmt.kind == "json_schema" and fmt.name == "shape" and json.loads(fmt.schema) == SHAPE
    assert answer_format({"type": "json_schema", "json_schema": {"name": "any"}}) == json_object()
    with pytest.raises(FieldError) as refused:
        answer_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}})
    assert refused.value.param == "response_format.json_schema.schema"

    tools = [{"type": "function", "function": {"name": "report", "parameters": SHAPE}},
             {"type": "function", "function": {"name": "now"}}]
    assert forced_tool({"tools": tools, "tool_choice": "auto"}) is None
    named = forced_tool({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "report"}}})
    assert named.names == ("report",) and json.loads(named.answer.schema) == SHAPE
    [call] = named.calls('{"colour": "red", "shape": "circle"}')
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "report", "arguments": '{"colour": "red", "shape": "circle"}'}
    required = forced_tool({"tools": tools, "tool_choice": "required"})
    union = json.loads(required.answer.schema)["anyOf"]
    assert [u["properties"]["name"]["const"] for u in union] == ["report", "now"]
    assert union[1]["properties"]["arguments"] == {"type": "object", "properties": {}}  # no parameters: {}
    assert required.calls('{"name": "now", "arguments": {}}')[0]["function"] == {"name": "now", "arguments": "{}"}
    assert required.calls('{"name": "now", "argu') is None  # cut before it was a call


def test_a_forced_tool_reply_is_a_call_of_that_tool(handle):
    engine = Engine(handle, SETTINGS)
    tool = forced_tool({"tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "report", "parameters": SHAPE}},
        {"type": "function", "function": {"name": "count", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}}]})
    reply = engine.submit(ask("What is it?", "yellow_circle.png"), GenerationParams(max_new_tokens=60,
                                                                                    answer=tool.answer))
    [call] = tool.calls("".join(reply))
    arguments = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] in ("report", "count")
    assert set(arguments) == ({"colour", "shape"} if call["function"]["name"] == "report" else {"n"})
