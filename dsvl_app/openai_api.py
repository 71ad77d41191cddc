"""An OpenAI-compatible API on the app's own server: `POST /v1/chat/completions` and `GET /v1/models`.

An HTTP adapter over the engine the UI submits to: OpenAI messages become conversation turns, every
image goes through the same intake as an upload (`media.load_image`: the same refusals, the same
words), and the engine renders, budgets and answers the prompt — so batching with everyone else,
reuse across turns, stop strings, stop-on-disconnect and out-of-memory handling come along. Requests
wait for the model in the same first-come-first-served line as the UI's; when `--queue-size` already
wait, the answer is 429. Keys are checked as `Authorization: Bearer …`; an exposed app (share link,
password, non-loopback address) without a key keeps `/v1` closed.

Pure parts (request parsing, stop strings, response bodies) are plain functions; the routes at the
end are thin. No gradio imports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import conversation as conv
from .access import Denied, check_key
from .documents import Document, DocumentRejected, open_pdf
from .engine import Engine, EngineBusy, GenerationError, GenerationParams, GenerationTimeout, OutOfMemory, ReplyStream
from .grammar import SchemaError
from .image_urls import ImageUrlError, ImageUrls
from .media import ImageRejected, load_image
from .model import ModelHandle
from .openai_structured import FieldError, ForcedTool, answer_format, call, forced_tool
from .settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 4
MAX_LOGIT_BIAS = 300  # as OpenAI
# Other servers' names for the same thing (Ollama's and Open WebUI's "Advanced Params", llama.cpp).
ALIASES = {"repeat_penalty": "repetition_penalty", "num_predict": "max_tokens"}
# Everything a request may hold that changes this server's reply; any other field is ignored and reported
# (the X-Ignored-Fields header and the log), as vLLM does: a client's default request must never fail for it.
USED_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "top_k", "min_p", "seed", "stop", "repetition_penalty", "logit_bias", "n", "logprobs",
               "top_logprobs", "response_format", "tool_choice", "function_call", *ALIASES}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def refusal_reason(self) -> str:
        """The metrics' word for this refusal."""
        if self.code == "invalid_image":
            return "bad_image"
        if self.code == "invalid_file":
            return "bad_document"
        if self.code == "context_length_exceeded":
            return "too_many_tokens"
        if self.param and self.param not in ("messages", "model") and not self.param.startswith("messages"):
            return "bad_parameter"
        return "bad_request"

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------- requests (pure)


@dataclass(frozen=True)
class ImageUrl:
    """An image part before it is fetched or decoded: its URL and where it was in the request."""

    url: str
    label: str  # "image 1 of message 2", for messages about it


@dataclass(frozen=True)
class FileData:
    """A `file` part (a PDF as a data: URL) before it is decoded: its name, the pages asked for, its place."""

    data_url: str
    filename: str
    pages: str | None
    label: str


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    messages: list[tuple[str, list[str | ImageUrl | FileData]]]  # (role, parts in order)
    params: GenerationParams
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    model: str = ""
    ignored: tuple[str, ...] = ()  # fields accepted without effect (reported to the client and in the log)
    tool: ForcedTool | None = None  # a forced tool_choice: the reply is answered as this call


def _text_parts(content: Any, where: str, images: bool) -> list[str | dict]:
    """A message's content as a list of string / image-part dicts, refusing what the model cannot take."""
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise _invalid(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    parts: list[str | dict] = []
    for n, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image if isinstance(image, str) else None
            if not isinstance(url, str) or not url:
                raise _invalid(f"{where}.content[{n}].image_url.url must be a URL string", f"{where}.content[{n}]")
            parts.append({"url": url})
        elif kind == "image_url":
            raise _invalid(f"{where}: only user messages can hold images", f"{where}.content[{n}]")
        elif kind == "file" and images:
            parts.append({"file": _file_part(part.get("file"), f"{where}.content[{n}]")})
        elif kind == "file":
            raise _invalid(f"{where}: only user messages can hold files", f"{where}.content[{n}]")
        else:
            raise _invalid(f"{where}.content[{n}]: content parts of type {kind!r} are not supported "
                           "(supported: 'text', and 'image_url' and 'file' (PDF) in user messages)",
                           f"{where}.content[{n}]")
    return parts


def _file_part(value: Any, where: str) -> dict:
    """A `file` content part's object: {"file_data": "data:application/pdf;base64,…", "filename", "pages"?}."""
    if not isinstance(value, Mapping):
        raise _invalid(f"{where}.file must be an object with 'file_data' and 'filename'", where)
    if value.get("file_id") is not None and value.get("file_data") is None:
        raise _invalid(f"{where}: 'file_id' refers to OpenAI's Files API, which this server does not have: send the "
                       "PDF itself as 'file_data' (a data:application/pdf;base64,… URL) with a 'filename'", where,
                       "unsupported_value")
    data = value.get("file_data")
    if not isinstance(data, str) or not data.startswith("data:"):
        raise _invalid(f"{where}.file.file_data must be a data: URL (data:application/pdf;base64,…)", where)
    name = value.get("filename") or "document.pdf"
    pages = value.get("pages")
    if pages is not None and not isinstance(pages, (str, int)):
        raise _invalid(f"{where}.file.pages must be a string of pages, e.g. \"1-3, 5\"", where)
    return {"data": data, "filename": str(name)[:200], "pages": None if pages is None else str(pages)}


def parse_messages(messages: Any) -> list[tuple[str, list[str | ImageUrl | FileData]]]:
    """OpenAI messages → (role, parts) in order; system/developer first, user last."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    out: list[tuple[str, list[str | ImageUrl]]] = []
    image_no = 0
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, Mapping):
            raise _invalid(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role == "developer":
            role = "system"  # OpenAI's newer name for the same thing
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise _invalid(f"{where}: tool and function calls are not supported by DeepSeek-VL", where)
        if role not in ("system", "user", "assistant"):
            raise _invalid(f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}", f"{where}.role")
        if role == "system" and any(r != "system" for r, _ in out):
            raise _invalid(f"{where}: system messages must come before the conversation", where)
        parts: list[str | ImageUrl | FileData] = []
        for part in _text_parts(message.get("content"), where, images=role == "user"):
            if isinstance(part, dict) and "file" in part:
                file = part["file"]
                parts.append(FileData(file["data"], file["filename"], file["pages"],
                                      f"“{file['filename']}” (message {m + 1})"))
            elif isinstance(part, dict):
                image_no += 1
                parts.append(ImageUrl(part["url"], f"Image {image_no} (message {m + 1})"))
            elif part.strip():
                parts.append(part)
        out.append((role, parts))
    if out[-1][0] != "user":
        raise _invalid("The last message must be the user's: it is the one answered", "messages")
    return out


def _number(body: Mapping, name: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise _invalid(f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if not low <= value <= high:
        raise _invalid(f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return kind(value)


def _refuse_unhonourable(body: Mapping) -> None:
    """Fields whose meaning a client relies on and this model cannot give: refused, never silently ignored."""
    if body.get("n") not in (None, 1):
        raise _invalid(f"'n' = {body['n']!r} is not supported: one choice per request; send n requests for n replies",
                       "n", "unsupported_value")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        name = "logprobs" if body.get("logprobs") not in (None, False) else "top_logprobs"
        raise _invalid(f"'{name}' is not supported: log-probabilities are not returned", name, "unsupported_value")
    call = body.get("function_call")
    if call not in (None, "auto", "none"):
        raise _invalid(f"function_call {call!r} (the deprecated 'functions' API) is not supported: send 'tools' and "
                       "tool_choice {'type': 'function', 'function': {'name': ...}} instead", "function_call",
                       "unsupported_value")
    for name in ("tools", "functions"):
        if body.get(name) is not None and not isinstance(body[name], list):
            raise _invalid(f"'{name}' must be a list", name)


def _logit_bias(value: Any, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    if value in (None, ""):  # "": Open WebUI's logit_bias switched to Custom and left empty
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_LOGIT_BIAS:
        raise _invalid(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids → bias", "logit_bias")
    bias = []
    for token, amount in value.items():
        if not str(token).isdigit() or isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise _invalid("'logit_bias' maps token ids (as strings) to numbers", "logit_bias")
        if not -100 <= amount <= 100 or (vocab_size is not None and int(token) >= vocab_size):
            raise _invalid(f"'logit_bias' {token}: {amount} — ids must be below {vocab_size}, biases between -100 and 100",
                           "logit_bias")
        bias.append((int(token), float(amount)))
    return tuple(sorted(bias))


def parse_request(body: Any, model_id: str, max_new_tokens_cap: int, defaults: Mapping[str, Any] | None = None,
                  vocab_size: int | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body; refusals name the field, in OpenAI's error shape.

    `defaults`: the sampling a request gets for what it leaves out (the checkpoint's generation config).
    Other servers' names (`repeat_penalty`, ...) are mapped; fields with no effect here are listed in `ignored`.
    """
    if not isinstance(body, Mapping):
        raise _invalid("The request body must be a JSON object")
    body = dict(body)
    for alias, name in ALIASES.items():
        if body.get(alias) is not None:
            if body.get(name) is not None and body[name] != body[alias]:
                raise _invalid(f"'{alias}' and '{name}' are the same setting and disagree; send one", alias)
            body[name] = body.pop(alias)
        else:
            body.pop(alias, None)
    ignored = sorted(name for name in body if name not in USED_FIELDS and body[name] is not None)
    ignored = [name for name in ignored if name not in ("frequency_penalty", "presence_penalty") or body[name] != 0]
    _refuse_unhonourable(body)
    try:
        answer, tool = answer_format(body.get("response_format")), forced_tool(body)
    except FieldError as exc:
        raise _invalid(str(exc), exc.param, exc.code) from None
    if answer is not None and tool is not None:
        raise _invalid("Send either a response_format or a forced tool_choice: a reply is held to one of them",
                       "response_format")
    if tool is not None:
        answer = tool.answer
        ignored = [name for name in ignored if name != "tools"]
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("'model' is required: GET /v1/models lists it", "model")
    if model != model_id:
        raise ApiError(404, f"The model {model!r} does not exist here; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, Mapping)):
        raise _invalid("'stream_options' ({'include_usage': bool}) is only allowed with stream: true", "stream_options")
    ignored += [f"stream_options.{key}" for key in sorted(options or {}) if key != "include_usage"]
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, tokens_name, int, 1, max_new_tokens_cap, min(DEFAULT_MAX_TOKENS, max_new_tokens_cap))
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise _invalid(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS}", "stop")
    defaults = {"temperature": 1.0, "top_p": 1.0, **(defaults or {})}
    top_k_limit = vocab_size or 2**31
    params = GenerationParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 0, 2, defaults["temperature"]),
        top_p=_number(body, "top_p", float, 0, 1, defaults["top_p"]) or 1e-6,
        top_k=_number(body, "top_k", int, 0, top_k_limit, defaults.get("top_k")),
        min_p=_number(body, "min_p", float, 0, 1, None),
        repetition_penalty=_number(body, "repetition_penalty", float, 0.5, 2, 1.0),
        seed=_number(body, "seed", int, 0, 2**63 - 1, None),
        token_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        answer=answer,
    )
    return ChatRequest(parse_messages(body.get("messages")), params, stream,
                       bool((options or {}).get("include_usage")), stops, model, tuple(ignored), tool)


def completion_body(request_id: str, created: int, model: str, text: str, finish: str, usage: dict,
                    tool_calls: list[dict] | None = None) -> dict:
    """A chat.completion; with `tool_calls` the message is the calls (no content) and the finish 'tool_calls'
    (unless max_tokens cut it: 'length')."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls is not None:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
        finish = "length" if finish == "length" else "tool_calls"
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def chunk_body(request_id: str, created: int, model: str, delta: dict, finish: str | None = None,
               usage: dict | None = None, choices: bool = True) -> dict:
    body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                            if choices else []}
    if usage is not None:
        body["usage"] = usage
    return body


def sse(body: Mapping | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


def model_id_of(handle: ModelHandle) -> str:
    """The id clients send as 'model': the hub id, or a local checkpoint's folder name."""
    return handle.source if not Path(handle.source).exists() else Path(handle.source).name


# ---------------------------------------------------------------- the adapter


@dataclass
class Api:
    """The /v1 endpoints over one engine and its settings."""

    engine: Engine
    settings: Settings
    images: ImageUrls  # image URLs → files the intake reads

    def __post_init__(self) -> None:
        self.handle = self.engine.handle
        self.model_id = model_id_of(self.handle)
        self.created = int(time.time())
        limits = self.settings.limits
        # A body carrying every image the conversation may hold, base64 (4/3), plus text.
        self.max_body_bytes = limits.images_per_conversation * limits.upload_bytes * 4 // 3 + 2**20

    # -- checks

    def authorize(self, request: Request) -> None:
        try:
            check_key(self.settings, request.headers.get("authorization"), "The OpenAI-compatible API")
        except Denied as denied:
            raise ApiError(401, denied.message, code=denied.code) from None

    async def read_body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise self._too_large(len(body))
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _invalid(f"The request body is not valid JSON ({exc})") from None

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"The request is {size / 2**20:.1f} MB, over this server's "
                        f"{self.max_body_bytes / 2**20:.0f} MB limit for one request.", code="request_too_large")

    async def turns(self, chat: ChatRequest, request: Request) -> tuple[list[conv.Turn], dict[str, str]]:
        """Turns for the engine, and each image file's label for error messages (PDFs become page images and
        text: documents.py; what each document became is in `labels["documents"]`)."""
        turns, labels, documents = [], {}, []
        limits = self.settings.limits
        before = 0  # images of the earlier messages (pages included)
        for role, parts in chat.messages:
            resolved: list[conv.Part] = []
            in_message = sum(isinstance(p, ImageUrl) for p in parts)  # then the pages added to it
            for part in parts:
                if isinstance(part, FileData):
                    # A document's default pages are those the image limits still leave room for.
                    slots = min(limits.images_per_message - in_message,
                                limits.images_per_conversation - before - in_message)
                    document = await self._document(part, slots)
                    in_message += len(document.images)
                    documents.append(document.summary())
                    resolved += document.parts()
                elif isinstance(part, ImageUrl):
                    try:
                        path = await self.images.resolve(part.url, part.label, request.url.netloc)
                    except ImageUrlError as exc:
                        raise _invalid(str(exc), "messages", "invalid_image") from None
                    labels[Path(path).name] = part.label
                    resolved.append(conv.ImageRef(path))
                else:
                    resolved.append(part)
            turns.append(conv.Turn(role, tuple(resolved)))
            before += in_message
        if documents:
            labels["documents"] = " | ".join(documents)
        return turns, labels

    # -- the engine

    async def _document(self, part: FileData, slots: int) -> Document:
        """A `file` part's PDF, rendered and read (in a worker thread: PDFium takes one call at a time)."""
        try:
            data = self.images.decode(part.data_url, part.label)
            document = await asyncio.to_thread(open_pdf, data, part.filename, self.images.folder,
                                               self.settings.limits, slots, part.pages)
        except (ImageUrlError, DocumentRejected) as exc:
            raise _invalid(str(exc), "messages", "invalid_file") from None
        self.images.prune()
        return document

    def start(self, turns: list[conv.Turn], labels: dict[str, str], chat: ChatRequest) -> ReplyStream:
        try:
            return self.engine.submit(turns, chat.params, stop=chat.stop, load=load_image, surface="v1")
        except ImageRejected as exc:
            label = labels.get(exc.filename)
            message = f"{label} {exc.reason}" if label else str(exc)
            raise _invalid(message, "messages", "invalid_image") from None
        except conv.ContextOverflow as exc:
            raise _invalid(str(exc), "messages", "context_length_exceeded") from None
        except conv.ConversationError as exc:
            raise _invalid(str(exc), "messages") from None

    @staticmethod
    def failure(exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, EngineBusy):
            # Retry-After (seconds, estimated from the line and recent replies): the openai SDK waits that long.
            return ApiError(429, str(exc), "rate_limit_error", code="queue_full",
                            headers={"Retry-After": str(exc.retry_after_s)})
        if isinstance(exc, OutOfMemory):
            return ApiError(503, str(exc), "server_error", code="out_of_memory")
        if isinstance(exc, GenerationTimeout):
            return ApiError(503, str(exc), "server_error", code="timeout")
        if isinstance(exc, SchemaError):  # a schema the grammar compiler found contradictory
            return ApiError(400, str(exc), param="response_format", code="unsupported_schema")
        if isinstance(exc, GenerationError):
            return ApiError(500, str(exc), "server_error")
        log.exception("unexpected /v1 failure", exc_info=exc)
        return ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", "server_error")

    async def complete(self, request: Request, access: Access) -> Any:
        self.authorize(request)
        engine = self.engine
        with engine.counting_refusals("v1"):  # a request refused before it reaches the engine (the engine counts its own)
            chat = parse_request(await self.read_body(request), self.model_id, self.settings.limits.max_new_tokens,
                                 engine.sampling_defaults, engine.vocab_size)
            access.stream, access.ignored = chat.stream, chat.ignored
            turns, labels = await self.turns(chat, request)
        reply = _Reply(await asyncio.to_thread(self.start, turns, labels, chat), request)
        access.reply = reply.reply
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # What was accepted without effect, for the client (and the log): nothing is dropped silently.
        headers = {"X-Ignored-Fields": ", ".join(chat.ignored)} if chat.ignored else {}
        if "documents" in labels:  # which pages of each PDF the model saw as images, as text, or not at all
            plain = labels["documents"].replace("“", '"').replace("”", '"')
            headers["X-Document-Pages"] = plain.encode("ascii", "replace").decode()
        if chat.stream:
            access.deferred = True  # logged when the stream ends
            return StreamingResponse(self._events(reply, chat, request_id, created, access),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        try:
            async for _ in reply.pieces():
                pass
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's shape
            return self.failure(exc).response()
        calls = chat.tool.calls(reply.text) if chat.tool is not None else None
        return JSONResponse(completion_body(request_id, created, chat.model, reply.text, reply.finish_reason(),
                                            reply.usage(), calls), headers=headers)

    async def _events(self, reply: _Reply, chat: ChatRequest, request_id: str, created: int,
                      access: Access) -> AsyncIterator[str]:
        status = 200
        try:
            yield sse(chunk_body(request_id, created, chat.model, {"role": "assistant", "content": ""}))
            finish = None
            try:
                async for delta in self._deltas(reply, chat.tool):
                    yield sse(chunk_body(request_id, created, chat.model, delta))
                finish = reply.finish_reason()
                if chat.tool is not None and finish != "length":
                    finish = "tool_calls"
            except Exception as exc:  # noqa: BLE001 - the status line is sent: report it as an error event
                error = self.failure(exc)
                status, access.refusal = error.status, (error.param, error.message)
                yield sse(error.body())
                yield sse("[DONE]")
                return
            yield sse(chunk_body(request_id, created, chat.model, {}, finish))
            if chat.include_usage:
                yield sse(chunk_body(request_id, created, chat.model, {}, usage=reply.usage(), choices=False))
            yield sse("[DONE]")
        finally:
            access.done(status)

    @staticmethod
    async def _deltas(reply: _Reply, tool: ForcedTool | None) -> AsyncIterator[dict]:
        """The stream's deltas: text; or one tool call, its arguments streamed as they are written (several tools:
        the call at the end, once the reply has named its function)."""
        if tool is None:
            async for text in reply.pieces():
                yield {"content": text}
            return
        if tool.single:
            first = call(tool.names[0], "")
            yield {"tool_calls": [{"index": 0, **first}]}
            async for text in reply.pieces():
                yield {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
            return
        async for _ in reply.pieces():
            pass
        calls = tool.calls(reply.text)
        yield {"tool_calls": [{"index": 0, **calls[0]}]} if calls else {"content": reply.text}

    def models(self, request: Request) -> dict:
        self.authorize(request)
        handle = self.handle
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "dsvl-chat",
            "name": handle.label, "tiny": handle.is_tiny, "offline_fallback": handle.offline_fallback,
        }]}


async def _watch(reply: ReplyStream, request: Request) -> None:
    """Cancel `reply` when its client goes away. A function of its own, not a method: a cancelled task keeps its
    CancelledError, whose traceback holds this frame; were `self` in it, reply → task → frame → reply would be a
    reference cycle that keeps the reply's image tensors (~50 MB for four images) until a full garbage collection."""
    while not reply.finished:
        if await request.is_disconnected():
            log.info("/v1 client went away: stopping its reply")
            reply.cancel()
            return
        await asyncio.sleep(0.2)


class _Reply:
    """One /v1 reply's life: text as the engine streams it (stop strings already cut); the engine's request
    cancelled when the client goes away (a watcher notices even while nothing is being written, e.g. during
    a long prefill or while waiting in line)."""

    def __init__(self, reply: ReplyStream, request: Request):
        self.reply, self.request = reply, request
        self.text = ""
        self._watcher: asyncio.Task | None = asyncio.get_running_loop().create_task(_watch(reply, request))

    async def pieces(self) -> AsyncIterator[str]:
        try:
            async for text in self.reply.aiter():
                self.text += text
                yield text
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None
            self.reply.close()

    def usage(self) -> dict:
        stats = self.reply.stats
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
                "total_tokens": stats.prompt_tokens + stats.new_tokens}

    def finish_reason(self) -> str:
        return self.reply.finish_reason


class Access:
    """One line in the app's log per /v1 request: status, time, tokens, images, what was ignored, and for a
    refusal the field and the reason. Never the key, never image data."""

    def __init__(self, method: str, path: str):
        self.method, self.path, self.t0 = method, path, time.perf_counter()
        self.stream, self.ignored, self.reply, self.refusal = False, (), None, None
        self.deferred, self._logged = False, False

    def done(self, status: int) -> None:
        if self._logged:
            return
        self._logged = True
        parts = [f"{self.method} {self.path} {status}", f"{time.perf_counter() - self.t0:.2f} s"]
        if self.reply is not None:
            stats = self.reply.stats
            parts.append(f"{stats.prompt_tokens} prompt + {stats.new_tokens} completion tokens, {stats.images} image(s), "
                         f"{'stream' if self.stream else 'one response'}, ended: {stats.stop_reason}")
            if stats.reused_tokens:
                parts.append(f"{stats.reused_tokens} prompt tokens reused")
            if stats.replica:
                parts.append(f"replica {stats.replica}")
        if self.ignored:
            parts.append("ignored: " + ", ".join(self.ignored))
        if self.refusal is not None:
            param, message = self.refusal
            parts.append(f"refused{f' {param!r}' if param else ''}: {message}")
        log.info(" · ".join(parts))


def router(api: Api) -> APIRouter:
    """The /v1 routes; every failure is answered in OpenAI's error shape, every request is logged."""
    routes = APIRouter()

    async def guarded(call: Callable, request: Request):
        access = Access(request.method, request.url.path)
        try:
            result = await call(request, access)
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's shape
            error = api.failure(exc)
            access.refusal = (error.param, error.message)
            access.done(error.status)
            return error.response()
        if not access.deferred:
            access.done(getattr(result, "status_code", 200))
        return result

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await guarded(api.complete, request)

    @routes.get("/v1/models")
    async def models(request: Request):
        async def call(req: Request, access: Access):
            return JSONResponse(api.models(req))

        return await guarded(call, request)

    @routes.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(request: Request, rest: str):
        async def call(req: Request, access: Access):
            raise ApiError(404, f"Unknown endpoint /v1/{rest}: this server has /v1/chat/completions and /v1/models",
                           code="unknown_url")

        return await guarded(call, request)

    return routes
