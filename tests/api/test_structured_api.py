"""Structured answers through the real `openai` SDK: `parse()` with a Pydantic model (alone, and four at once beside
four free-text streams), `json_object`, a streamed `json_schema`, a reply cut by max_tokens, a schema feature no
grammar enforces, and forced tool calls (named, and `required` over several tools), streamed and not."""

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pydantic
import pytest

from dsvl_app.settings import parse_settings
from tests.conftest import EXAMPLES, serve

pytestmark = pytest.mark.api

MODEL = "tiny-dsvl-hybrid"


class Shape(pydantic.BaseModel):
    colour: Literal["red", "green", "blue", "yellow"]
    shape: Literal["circle", "square", "triangle"]


def ask(text: str, image: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode((EXAMPLES / image).read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def client(handle):
    with serve(parse_settings(["--model", "tiny"], environ={}), handle) as served:
        yield openai.OpenAI(base_url=served[1] + "v1", api_key="unused", max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ask("What colour is the shape?", "red_circle.png"),
                                               response_format=Shape)
    choice = completion.choices[0]
    assert isinstance(choice.message.parsed, Shape) and choice.finish_reason == "stop"
    assert json.loads(choice.message.content) == choice.message.parsed.model_dump()


def test_four_parses_at_once_beside_four_free_text_streams(client):
    images = ["red_circle.png", "blue_square.png", "green_triangle.png", "yellow_circle.png"]
    expected = {"red_circle.png": "The shape is red.", "blue_square.png": "The shape is blue.",
                "green_triangle.png": "The shape is green.", "yellow_circle.png": "The shape is yellow."}

    def parsed(image: str) -> Shape:
        return client.chat.completions.parse(model=MODEL, messages=ask("What colour is the shape?", image),
                                             response_format=Shape).choices[0].message.parsed

    def streamed(image: str) -> str:
        stream = client.chat.completions.create(model=MODEL, messages=ask("What colour is the shape?", image),
                                                stream=True, temperature=0)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    with ThreadPoolExecutor(8) as pool:
        shapes = [pool.submit(parsed, image) for image in images]
        texts = [pool.submit(streamed, image) for image in images]
        assert all(isinstance(f.result(), Shape) for f in shapes)
        assert [f.result() for f in texts] == [expected[i] for i in images]  # the free rows are as alone


def test_json_object_streamed_schema_and_a_cut_reply(client):
    messages = ask("Describe it.", "green_triangle.png")
    whole = client.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "json_object"},
                                           max_tokens=8)
    assert whole.choices[0].message.content.startswith("{") and whole.choices[0].finish_reason == "length"
    schema = {"type": "json_schema", "json_schema": {"name": "shape", "schema": Shape.model_json_schema(),
                                                     "strict": True}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, response_format=schema, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert Shape.model_validate_json(text) and len([c for c in chunks if c.choices]) > 3  # streamed, not in one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 5
    cut = client.chat.completions.create(model=MODEL, messages=messages, response_format=schema, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"  # as OpenAI: the JSON is incomplete and says why


def test_a_schema_feature_no_grammar_enforces_is_a_400_naming_it(client):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                        "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ask("Tags?", "red_circle.png"), response_format={
            "type": "json_schema", "json_schema": {"name": "tags", "schema": schema}})
    assert refused.value.body["param"] == "response_format.json_schema.schema"
    assert "'uniqueItems' at #/properties/tags" in refused.value.body["message"]


TOOLS = [{"type": "function", "function": {"name": "report_shape", "description": "Report the shape seen",
                                           "parameters": Shape.model_json_schema()}},
         {"type": "function", "function": {"name": "count_shapes", "parameters": {
             "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["n"]}}}]


def test_a_named_tool_choice_is_answered_as_that_call(client):
    named = {"type": "function", "function": {"name": "report_shape"}}
    completion = client.chat.completions.create(model=MODEL, messages=ask("What is it?", "blue_square.png"),
                                                tools=TOOLS, tool_choice=named)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "report_shape" and Shape.model_validate_json(call.function.arguments)
    # Streamed: the call's name first, then its arguments as they are written.
    chunks = [c for c in client.chat.completions.create(model=MODEL, messages=ask("What is it?", "blue_square.png"),
                                                        tools=TOOLS, tool_choice=named, stream=True) if c.choices]
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "report_shape" and deltas[0].id.startswith("call_") and len(deltas) > 3
    assert Shape.model_validate_json("".join(d.function.arguments or "" for d in deltas))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_picks_one_of_several_tools(client):
    completion = client.chat.completions.create(model=MODEL, messages=ask("How many shapes?", "three_shapes.png"),
                                                tools=TOOLS, tool_choice="required", max_tokens=80)
    [call] = completion.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name in ("report_shape", "count_shapes")
    assert set(arguments) == ({"colour", "shape"} if call.function.name == "report_shape" else {"n"})


@pytest.fixture(scope="module")
def chat_client(client):
    from gradio_client import Client

    return Client(str(client.base_url).removesuffix("v1/"), verbose=False)


def test_chat_takes_the_same_answer_formats(chat_client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    message = {"text": "What colour is the shape?", "files": [handle_file(str(EXAMPLES / "red_circle.png"))]}
    reply = chat_client.predict(message, [], 60, 0, 1, 1, 0, answer_format="json_schema",
                                json_schema=json.dumps(Shape.model_json_schema()), api_name="/chat")
    assert Shape.model_validate_json(reply)
    assert chat_client.predict(message, [], 8, 0, 1, 1, 0, answer_format="json", api_name="/chat").startswith("{")
    with pytest.raises(AppError, match="needs a schema"):
        chat_client.predict(message, [], 40, 0, 1, 1, 0, answer_format="json_schema", api_name="/chat")
    with pytest.raises(AppError, match="'not'"):
        chat_client.predict(message, [], 40, 0, 1, 1, 0, answer_format="json_schema",
                            json_schema='{"not": {"type": "string"}}', api_name="/chat")
    assert chat_client.predict(message, [], 40, 0, 1, 1, 0, api_name="/chat") == "The shape is red."
