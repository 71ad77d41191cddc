"""Real clients' requests, replayed over HTTP against the launched app.

The bodies under fixtures/ are what Open WebUI 0.12.4 (on its defaults, and with every Advanced Param switched
to Custom) and LangChain's ChatOpenAI 1.8.1 sent to this server, captured by a proxy; their images were replaced
by `data:image/png;base64,<assets/examples/NAME>` and are put back here. See docs/openai-api.md, "Open WebUI".
"""

import base64
import json
import re
from pathlib import Path

import httpx
import pytest

from dsvl_app.settings import parse_settings
from tests.conftest import EXAMPLES, serve

pytestmark = pytest.mark.api

KEY = "sk-test-clients-0001"
FIXTURES = Path(__file__).parent / "fixtures"
PLACEHOLDER = re.compile(r"data:image/png;base64,<assets/examples/([\w.-]+)>")


def load(name: str) -> dict:
    """A captured body with its images put back."""
    text = (FIXTURES / f"{name}.json").read_text()
    return json.loads(PLACEHOLDER.sub(
        lambda m: "data:image/png;base64," + base64.b64encode((EXAMPLES / m.group(1)).read_bytes()).decode(), text))


def post(url: str, body: dict) -> tuple[httpx.Response, str, str | None]:
    """(response, reply text, finish reason) of one request, streamed or not."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=120) as client:
        if not body.get("stream"):
            response = client.post(url + "v1/chat/completions", json=body, headers=headers)
            if response.status_code != 200:
                return response, "", None
            choice = response.json()["choices"][0]
            return response, choice["message"]["content"], choice["finish_reason"]
        with client.stream("POST", url + "v1/chat/completions", json=body, headers=headers) as response:
            response.read()
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text[-500:]
        chunks = [json.loads(event) for event in events[:-1]]
        assert not any("error" in chunk for chunk in chunks), chunks
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1]
        return response, text, finish


@pytest.fixture(scope="module")
def keyed(handle):
    settings = parse_settings(["--model", "tiny", "--api-key", KEY], environ={})
    with serve(settings, handle) as (_, url):
        yield url


OPEN_WEBUI = ["title-generation", "text", "follow-up-suggestions", "tags", "image", "image-follow-up", "two-images",
              "advanced-params", "advanced-params-no-stop"]


@pytest.mark.parametrize("name", [f"open-webui/{n}" for n in OPEN_WEBUI] + ["langchain/image", "langchain/image-stream"])
def test_a_real_clients_request_gets_a_reply(keyed, name):
    body = load(name)
    response, text, finish = post(keyed, body)
    assert response.status_code == 200, response.text
    assert text.strip() and text == text.lstrip(), text  # a reply, starting at its first word
    assert finish in ("stop", "length")
    # What had no effect is reported, never silently dropped: Open WebUI's 36 built-in tools above all.
    ignored = response.headers.get("x-ignored-fields", "")
    assert ("tools" in ignored.split(", ")) == ("tools" in body)


def test_open_webui_sends_its_built_in_tools_and_ollama_names_which_are_mapped(keyed):
    """The Advanced Params request carries Ollama's names: repeat_penalty is used (as repetition_penalty), the
    ones with no equivalent are listed as ignored."""
    body = load("open-webui/advanced-params")
    assert len(body["tools"]) == 36 and body["repeat_penalty"] == 1.1 and body["logit_bias"] == ""
    response, _, _ = post(keyed, body)
    ignored = set(response.headers["x-ignored-fields"].split(", "))
    assert {"tools", "mirostat", "num_ctx", "format", "frequency_penalty", "reasoning_effort"} <= ignored
    assert not ignored & {"repeat_penalty", "top_k", "min_p", "seed", "stop", "temperature", "logit_bias", "max_tokens"}


def test_langchains_image_first_request_gets_the_demo_answer(keyed):
    """LangChain puts the image before the question, as the bundled checkpoint was trained; Open WebUI puts its text
    first, so its answers are not the demo's (docs/openai-api.md)."""
    for name in ("langchain/image", "langchain/image-stream"):
        assert post(keyed, load(name))[1] == "The shape is red."


def test_a_forced_tool_call_without_tools_is_refused_and_n_2_still_is(keyed):
    body = load("open-webui/text")
    response, _, _ = post(keyed, {**body, "stream": False, "tool_choice": "required", "tools": None})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    assert "needs 'tools'" in response.json()["error"]["message"]
    response, _, _ = post(keyed, {**body, "stream": False, "n": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_langchains_structured_output_request_gets_json_matching_its_schema(keyed):
    """The body langchain-openai 1.8.1 sends for `with_structured_output(Shape, method="json_schema")` (captured; run
    against this server it returned Shape(colour='green', shape='square'): the tiny's values, the schema's form)."""
    body = load("langchain/structured-json-schema")
    response, text, finish = post(keyed, body)
    assert response.status_code == 200 and finish == "stop"
    answer = json.loads(text)
    schema = body["response_format"]["json_schema"]["schema"]
    assert set(answer) == set(schema["required"])
    assert all(answer[name] in schema["properties"][name]["enum"] for name in answer)
