"""Structured answers: a reply held to JSON, a JSON schema or a tool's parameters, by masking at each step the
tokens the grammar forbids (xgrammar, vLLM's and SGLang's default backend).

- `AnswerFormat` is what a request asks for (plain, hashable: it travels in `GenerationParams`, to replicas too).
  `json_object()` / `json_schema(schema)` build one; a schema keyword the grammar cannot enforce is refused by
  name (`SchemaError`) instead of being silently ignored — xgrammar compiles `not`, `if`/`then`/`else` as if
  they were absent, and `uniqueItems`, `contains`, `dependentRequired` into grammars no array or object matches.
- `Grammars` is one model's compiler (its tokenizer, sized to the logits' width); a schema is compiled once and
  cached (xgrammar's own cache). `matcher()` gives a request its own state.
- `mask_rows` applies every constrained row's mask to a step's logits in place, before any other processing;
  rows without a grammar are untouched (the scheduler's other replies are unaffected).

Whitespace: a model that never learned JSON fills every place JSON allows whitespace (measured: `{ "colour"`
then tabs until max_tokens), so the grammars allow none (`any_whitespace=False`): compact JSON. A reply ends as
soon as its JSON is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .sampling import GenerationError

MAX_SCHEMA_BYTES = 64 * 1024
# Keywords xgrammar 0.2.8 cannot enforce (checked on its compiler: ignored, or no output matches).
UNENFORCEABLE = {
    "not": "'not' (a negated schema)", "if": "'if'/'then'/'else'", "then": "'if'/'then'/'else'",
    "else": "'if'/'then'/'else'", "uniqueItems": "'uniqueItems'", "contains": "'contains'",
    "minContains": "'minContains'", "maxContains": "'maxContains'", "dependentRequired": "'dependentRequired'",
    "dependentSchemas": "'dependentSchemas'", "dependencies": "'dependencies'",
    "unevaluatedProperties": "'unevaluatedProperties'", "unevaluatedItems": "'unevaluatedItems'",
    "$dynamicRef": "'$dynamicRef'", "$recursiveRef": "'$recursiveRef'",
}
# Keywords whose value is a schema, a list of schemas, or a map of name → schema (walked for the above).
SUBSCHEMA = ("items", "additionalProperties", "propertyNames", "additionalItems")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


class SchemaError(GenerationError):
    """A response format or schema that cannot be enforced; the message names what and where."""


@dataclass(frozen=True)
class AnswerFormat:
    """What a reply is held to: "json_object" (any JSON object) or "json_schema" (`schema` as JSON text)."""

    kind: str
    schema: str = ""
    name: str = ""


def json_object() -> AnswerFormat:
    return AnswerFormat("json_object")


def json_schema(schema: Any, name: str = "") -> AnswerFormat:
    """A schema as an AnswerFormat (raises SchemaError naming an unenforceable keyword or a malformed schema)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise SchemaError(f"The JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping):
        raise SchemaError("The JSON schema must be an object, e.g. {\"type\": \"object\", \"properties\": {...}}")
    text = json.dumps(schema, ensure_ascii=False)  # (its order kept: properties are written in the order given)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"The JSON schema is {len(text.encode()) // 1024} KB; at most {MAX_SCHEMA_BYTES // 1024} KB")
    if problems := unenforceable(schema):
        raise SchemaError("This JSON schema uses what cannot be enforced while generating: " + "; ".join(problems)
                          + ". Remove it (check it after the reply instead).")
    return AnswerFormat("json_schema", text, name)


ANSWER_CHOICES = ("text", "json", "json_schema")  # /chat's and MCP's answer_format; the UI says Text, JSON, JSON schema


def answer_for(choice: str | None, schema: Any = None) -> AnswerFormat | None:
    """/chat's and the UI's answer format ("text", "json", "json_schema" with `schema`) → what the reply is held to."""
    choice = (choice or "text").strip().lower().replace(" ", "_")
    if choice == "text":
        return None
    if choice in ("json", "json_object"):
        return json_object()
    if choice == "json_schema":
        if schema in (None, "", {}) or (isinstance(schema, str) and not schema.strip()):
            raise SchemaError("Answer format 'JSON schema' needs a schema: paste one, e.g. {\"type\": \"object\", "
                              "\"properties\": {\"colour\": {\"type\": \"string\"}}}")
        return json_schema(schema)
    raise SchemaError(f"answer_format must be one of {', '.join(ANSWER_CHOICES)}, got {choice!r}")


def pretty(text: str) -> str | None:
    """A complete JSON reply indented for reading (None when it does not parse: cut, or not JSON)."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return None


def unenforceable(schema: Any, path: str = "#") -> list[str]:
    """Each unenforceable keyword in `schema`, with its place ("'not' at #/properties/a")."""
    if not isinstance(schema, Mapping):
        return []
    found = []
    for key, value in schema.items():
        if key in UNENFORCEABLE:
            found.append(f"{UNENFORCEABLE[key]} at {path}")
        elif key == "$ref" and isinstance(value, str) and not value.startswith("#"):
            found.append(f"a remote '$ref' ({value}) at {path}")
        elif key == "multipleOf" and schema.get("type") != "integer":
            found.append(f"'multipleOf' on a non-integer at {path}")
        elif key in SUBSCHEMA:
            found += unenforceable(value, f"{path}/{key}")
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            for n, item in enumerate(value):
                found += unenforceable(item, f"{path}/{key}/{n}")
        elif key in SUBSCHEMA_MAPS and isinstance(value, Mapping):
            for name, item in value.items():
                found += unenforceable(item, f"{path}/{key}/{name}")
    return sorted(set(found), key=found.index)


class Grammars:
    """One model's grammar compiler: its tokenizer, sized to the logits (`vocab_size` columns)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        import xgrammar as xgr  # (imported when the first structured answer is asked for)

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True)
        self.vocab_size = vocab_size

    def compile(self, answer: AnswerFormat) -> Any:
        """The compiled grammar (cached by xgrammar: a schema is compiled once)."""
        try:
            if answer.kind == "json_object":
                # Any object (not strict: properties of any name), compact.
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            return self.compiler.compile_json_schema(answer.schema, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # noqa: BLE001 - xgrammar's reasons (a contradiction in the schema) are the user's
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            reason = reason.split(": ", 1)[-1] if ".cc:" in reason else reason
            raise SchemaError(f"The JSON schema cannot be enforced: {reason}") from None

    def matcher(self, answer: AnswerFormat) -> Any:
        """A request's own grammar state; the reply ends as soon as its JSON is complete."""
        return self.xgr.GrammarMatcher(self.compile(answer), terminate_without_stop_token=True)


def mask_rows(matchers: Sequence[Any], logits: torch.Tensor) -> None:
    """Forbid, in place, each constrained row's disallowed tokens (rows whose matcher is None are untouched)."""
    rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    if logits.device.type != "cpu":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
