"""The /v1 adapter's pure parts: request validation, stop strings, and remote image fetching rules."""

import asyncio
import http.server

import pytest

from dsvl_app.fetch import RemoteImageError, RemoteImages, is_public_address
from dsvl_app.openai_api import ApiError, ImageUrl, parse_request
from tests.conftest import loopback_http

BASE = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def parse(**fields):
    return parse_request({**BASE, **fields}, "m", 2048, vocab_size=1000)


def test_unset_sampling_is_the_checkpoints_and_fields_map_to_generation():
    chat = parse()  # no defaults given: OpenAI's own
    assert chat.params.temperature == 1.0 and chat.params.top_p == 1.0 and chat.params.max_new_tokens == 512
    greedy = parse_request(BASE, "m", 2048, defaults={"temperature": 0.0, "top_p": 1.0})
    assert greedy.params.greedy and not greedy.ignored  # a checkpoint that does not sample by default
    sampled = parse_request({**BASE, "top_p": 0.5}, "m", 2048, defaults={"temperature": 0.6, "top_p": 0.9, "top_k": 40})
    assert (sampled.params.temperature, sampled.params.top_p, sampled.params.top_k) == (0.6, 0.5, 40)
    chat = parse(temperature=0, max_completion_tokens=30, seed=4, stop="END", stream=True,
                 stream_options={"include_usage": True}, repetition_penalty=1.1, user="ann", n=1, logprobs=False)
    assert (chat.params.temperature, chat.params.max_new_tokens, chat.params.seed) == (0.0, 30, 4)
    assert chat.stop == ("END",) and chat.stream and chat.include_usage and chat.params.repetition_penalty == 1.1
    assert parse(max_tokens=7).params.max_new_tokens == 7


def test_messages_keep_their_order_roles_and_images():
    chat = parse(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "image_url", "image_url": {"url": "data:b"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two shapes."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:c"}}, {"type": "text", "text": "And?"}]},
    ])
    assert [role for role, _ in chat.messages] == ["system", "user", "assistant", "user"]
    assert chat.messages[1][1] == ["Look:", ImageUrl("data:a", "Image 1 (message 2)"), ImageUrl("data:b", "Image 2 (message 2)")]
    assert chat.messages[3][1] == [ImageUrl("data:c", "Image 3 (message 4)"), "And?"]


def test_what_other_clients_send_is_used_mapped_or_ignored_with_a_record():
    """Open WebUI's defaults (36 tools), its Advanced Params (Ollama's names), LangChain's and others' extras."""
    chat = parse(tools=[{"type": "function", "function": {"name": "get_current_timestamp"}}], tool_choice="auto",
                 top_k=20, min_p=0.05, repeat_penalty=1.1, num_predict=64, logit_bias={"7": -100, "9": 5},
                 frequency_penalty=0.5, presence_penalty=0, reasoning_effort="low", parallel_tool_calls=True,
                 user="ann", colour="red", stream=True, stream_options={"include_usage": True, "include_obfuscation": 0},
                 functions=None, function_call="none", n=1, logprobs=False)
    p = chat.params
    assert (p.top_k, p.min_p, p.repetition_penalty, p.max_new_tokens) == (20, 0.05, 1.1, 64)
    assert p.token_bias == ((7, -100.0), (9, 5.0))
    assert chat.ignored == ("colour", "frequency_penalty", "parallel_tool_calls", "reasoning_effort", "tools", "user",
                            "stream_options.include_obfuscation")
    kwargs = p.generate_kwargs()  # what transformers builds the processors from
    assert kwargs["sequence_bias"] == {(7,): -100.0, (9,): 5.0} and kwargs["top_k"] == 20 and kwargs["min_p"] == 0.05


@pytest.mark.parametrize("fields, status, param, words", [
    ({"temperature": 3}, 400, "temperature", "between 0 and 2"),
    ({"max_tokens": 5000}, 400, "max_tokens", "between 1 and 2048"),
    ({"max_tokens": "ten"}, 400, "max_tokens", "an integer"),
    ({"n": 3}, 400, "n", "one choice per request"),
    ({"n": 2}, 400, "n", "one choice per request"),
    ({"logprobs": True}, 400, "logprobs", "not returned"),
    ({"top_logprobs": 3}, 400, "top_logprobs", "not returned"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, 400, "tools[0]", "must be"),
    ({"tool_choice": "required"}, 400, "tools", "needs 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "g"}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice", "not among the tools (g)"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"}, 400, "tool_choice",
     "must be 'auto'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"}, 400, "tools",
     "'uniqueItems' at #/properties/x"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "f"}}, 400, "function_call", "deprecated"),
    ({"tools": "all of them"}, 400, "tools", "must be a list"),
    ({"response_format": {"type": "xml"}}, 400, "response_format.type", "not supported"),
    ({"response_format": "json"}, 400, "response_format", "must be an object"),
    ({"response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", "needs a 'json_schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema.name", "is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}, "then": {}}}}},
     400, "response_format.json_schema.schema", "'if'/'then'/'else' at #"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "https://example.com/a.json"}}}}}}, 400, "response_format.json_schema.schema", "remote '$ref'"),
    ({"response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, 400, "response_format", "either"),
    ({"top_k": -1}, 400, "top_k", "between 0"),
    ({"min_p": 1.5}, 400, "min_p", "between 0 and 1"),
    ({"repeat_penalty": 5}, 400, "repetition_penalty", "between 0.5 and 2"),
    ({"repeat_penalty": 1.2, "repetition_penalty": 1.1}, 400, "repeat_penalty", "disagree"),
    ({"logit_bias": {"50": 200}}, 400, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"99999999": 1}}, 400, "logit_bias", "below 1000"),
    ({"logit_bias": {"word": 1}}, 400, "logit_bias", "token ids"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed with stream"),
    ({"model": "other"}, 404, "model", "serves 'm'"),
    ({"messages": []}, 400, "messages", "non-empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages",
     "last message must be the user's"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]", "tool and function calls"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]},
     400, "messages[1]", "system messages must come before"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
                   {"role": "user", "content": "c"}]}, 400, "messages[0].content[0]", "only user messages"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "messages[0].content[0]", "'input_audio' are not supported"),
])
def test_refusals_name_the_field(fields, status, param, words):
    with pytest.raises(ApiError) as raised:
        parse(**fields)
    error = raised.value
    assert error.status == status and error.param == param and words in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- remote images


class _Server(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1/secret")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif self.path == "/slow":
            import time

            time.sleep(2)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"PNG")

    def log_message(self, *args):
        pass


def fetch(url, **kwargs):
    """Fetch on a thread of its own (the browser tests' Playwright keeps an event loop in this one)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, RemoteImages(**{"max_bytes": 1000, **kwargs}).fetch(url)).result()


def test_addresses_that_are_never_fetched():
    for ip in ["127.0.0.1", "10.1.2.3", "192.168.0.9", "172.16.0.1", "169.254.169.254", "::1", "fe80::1", "0.0.0.0",
               "::ffff:127.0.0.1", "100.64.0.1", "224.0.0.1"]:
        assert not is_public_address(ip), ip
    assert is_public_address("93.184.216.34") and is_public_address("2606:2800:220:1::1")


def test_loopback_and_non_http_urls_are_refused():
    with loopback_http(_Server) as base:
        with pytest.raises(RemoteImageError, match="loopback, private or link-local"):
            fetch(base + "/ok")
    with pytest.raises(RemoteImageError, match="not an http"):
        fetch("file:///etc/passwd")


def test_fetch_rules_no_redirects_a_byte_cap_and_a_timeout():
    anywhere = {"address_allowed": lambda ip: True}  # loopback stands in for a public host here
    with loopback_http(_Server) as base:
        assert fetch(base + "/ok", **anywhere) == b"PNG"
        with pytest.raises(RemoteImageError, match="redirect"):
            fetch(base + "/redirect", **anywhere)
        with pytest.raises(RemoteImageError, match="over the .* upload limit"):
            fetch(base + "/big", **anywhere)
        with pytest.raises(RemoteImageError, match="did not arrive within 0.5 s"):
            fetch(base + "/slow", timeout_s=0.5, **anywhere)
