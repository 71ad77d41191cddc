"""`/v1`'s structured answers, as pure functions: `response_format` and a forced `tool_choice` → what the reply
is held to (`grammar.AnswerFormat`), and a held reply → OpenAI's `tool_calls`.

- `response_format`: `{"type": "text"}` (free), `{"type": "json_object"}` (any JSON object), `{"type":
  "json_schema", "json_schema": {"name", "schema", "strict", "description"}}` (the schema; `strict` or not, the
  reply matches it exactly: the grammar never adds a property the schema does not name).
- `tool_choice` naming a function (`{"type": "function", "function": {"name": ...}}`) holds the reply to that
  function's `parameters` and answers it as a call, as vLLM does for any model; `"required"` with several tools
  holds it to `{"name": <one of them>, "arguments": <its parameters>}`. `"auto"` and `"none"` stay text answers
  (the model has no tool-calling format of its own to decide with).
Refusals are `ApiError`s naming the field. No engine, no web framework.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .grammar import AnswerFormat, SchemaError, json_object, json_schema

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for schema and function names
NO_PARAMETERS = {"type": "object", "properties": {}}


class FieldError(ValueError):
    """A refused field: `param` names it (the adapter answers 400)."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class ForcedTool:
    """The reply must be a call of one of `names` (one: its arguments are the reply; several: the reply is
    {"name", "arguments"})."""

    names: tuple[str, ...]
    answer: AnswerFormat

    @property
    def single(self) -> bool:
        return len(self.names) == 1

    def calls(self, text: str) -> list[dict] | None:
        """The reply as OpenAI's `tool_calls` (None: several tools and the reply was cut before naming one)."""
        if self.single:
            return [call(self.names[0], text)]
        try:
            chosen = json.loads(text)
            return [call(chosen["name"], json.dumps(chosen["arguments"], ensure_ascii=False))]
        except (ValueError, KeyError, TypeError):
            return None


def call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name,
                                                                                     "arguments": arguments}}


def answer_format(value: Any) -> AnswerFormat | None:
    """`response_format` → what the reply is held to (None: free text)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise FieldError("'response_format' must be an object with a 'type': 'text', 'json_object' or 'json_schema'",
                         "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind != "json_schema":
        raise FieldError(f"response_format type {kind!r} is not supported (supported: 'text', 'json_object', "
                         "'json_schema')", "response_format.type", "unsupported_value")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise FieldError("response_format 'json_schema' needs a 'json_schema' object: {\"name\": ..., \"schema\": "
                         "{...}}", "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise FieldError("response_format.json_schema.name is required: letters, digits, '_' and '-', at most 64",
                         "response_format.json_schema.name")
    if spec.get("schema") is None:
        return json_object()  # (OpenAI: a format without a schema is any JSON object)
    try:
        return json_schema(spec["schema"], name)
    except SchemaError as exc:
        raise FieldError(str(exc), "response_format.json_schema.schema", "unsupported_schema") from None


def _tools(value: Any) -> dict[str, Any]:
    """`tools` → {name: parameters schema}."""
    if not isinstance(value, list) or not value:
        raise FieldError("A forced tool call needs 'tools': a list of {\"type\": \"function\", \"function\": {\"name\", "
                         "\"parameters\"}}", "tools")
    found: dict[str, Any] = {}
    for n, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping):
            raise FieldError(f"tools[{n}] must be {{\"type\": \"function\", \"function\": {{...}}}}", f"tools[{n}]")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise FieldError(f"tools[{n}].function.name must be letters, digits, '_' or '-' (at most 64)",
                             f"tools[{n}].function.name")
        parameters = function.get("parameters")
        found[name] = NO_PARAMETERS if parameters in (None, {}) else parameters
    return found


def forced_tool(body: Mapping) -> ForcedTool | None:
    """A forced `tool_choice` → the call the reply must be (None: 'auto', 'none' or absent — a text answer)."""
    choice = body.get("tool_choice")
    if choice in (None, "auto", "none"):
        return None
    tools = _tools(body.get("tools"))
    if choice == "required":
        names = tuple(tools)
    elif isinstance(choice, Mapping) and choice.get("type") == "function" and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if name not in tools:
            raise FieldError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(tools)})",
                             "tool_choice")
        names = (name,)
    else:
        raise FieldError("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": "
                         "{\"name\": ...}}", "tool_choice")
    if len(names) == 1:
        schema = tools[names[0]]
    else:
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": tools[name]},
                             "required": ["name", "arguments"]} for name in names]}
    try:
        answer = json_schema(schema, names[0] if len(names) == 1 else "tool_call")
    except SchemaError as exc:
        where = f"the parameters of {names[0]!r}" if len(names) == 1 else "the tools' parameters"
        raise FieldError(f"{exc} (in {where})", "tools", "unsupported_schema") from None
    return ForcedTool(names, answer)
