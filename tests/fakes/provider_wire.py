"""What the fake provider server (``provider_server``: a real loopback HTTP server that speaks the
OpenAI, Anthropic and Gemini wire formats) is scripted with, and the wire-format helpers its
handlers share (``provider_formats``): replies, faults, recorded requests, error bodies, token
counts, ids.

The wire notes are in ``provider_server``'s text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fault", "RecordedRequest", "Reply", "ToolCallSpec"]

# -------------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------------


@dataclass
class ToolCallSpec:
    """One tool/function call the fake model makes.

    ``arguments`` is a dict (serialised with ``json.dumps``) or a raw string sent verbatim where the
    wire format carries a string (OpenAI ``arguments``; Anthropic streamed ``partial_json``), so invalid JSON
    can be simulated. Where the wire format only carries an object (Anthropic non-stream ``input``,
    Gemini ``args``) a string that is not a JSON object is sent as ``{"_raw": "<the string>"}``.
    """

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"))

    def arguments_object(self) -> dict[str, Any]:
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {"_raw": self.arguments}
        return value if isinstance(value, dict) else {"_raw": self.arguments}


@dataclass
class Reply:
    """A scripted successful answer. Any protocol can consume it.

    * ``text`` empty and no ``tool_calls``: the answer is ``"echo: " + <last user message text>`` (or a JSON
      object when the request asked for JSON output, see ``FakeProviderServer``).
    * ``finish_reason`` may be given in any provider's vocabulary; well-known values are translated
      (``"length"`` becomes ``"max_tokens"`` for Anthropic and ``"MAX_TOKENS"`` for Gemini, and so on),
      unknown values are sent verbatim.
    * ``cached_tokens`` / ``cache_creation_tokens`` (extensions): reported as OpenAI
      ``prompt_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens`` /
      ``cache_creation_input_tokens`` and Gemini ``cachedContentTokenCount``.
    """

    text: str = ""
    thinking: str | None = None
    tool_calls: list[ToolCallSpec] | tuple[ToolCallSpec, ...] = ()
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    chunk_chars: int = 4
    delay_s: float = 0.0
    delay_between_chunks_s: float = 0.0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0


@dataclass
class Fault:
    """A scripted failure. Build one with the classmethods."""

    # "status" | "hang" | "malformed_json" | "cut_stream" | "raw_stream" | "keep_alive" | "ignore_stream"
    kind: str
    status: int = 500
    message: str = ""
    retry_after: float | None = None
    seconds: float = 0.0
    after_chunks: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    reply: Reply | None = None  # cut_stream: what the stream carries until the cut (default: the echo)
    events: tuple[bytes, ...] = ()  # raw_stream: each event's data, sent as it is

    @classmethod
    def rate_limit(cls, retry_after: float | None = 1.0) -> Fault:
        return cls(
            "status", status=429, message="Rate limit reached (fake provider).", retry_after=retry_after
        )

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        return cls("status", status=status, message="The server had an error processing your request (fake).")

    @classmethod
    def unauthorized(cls) -> Fault:
        return cls("status", status=401, message="Incorrect API key provided (fake provider).")

    @classmethod
    def forbidden(cls) -> Fault:
        return cls("status", status=403, message="This key may not use this resource (fake provider).")

    @classmethod
    def bad_request(cls, message: str = "Invalid request (fake provider).") -> Fault:
        return cls("status", status=400, message=message)

    @classmethod
    def hang(cls, seconds: float = 30) -> Fault:
        return cls("hang", seconds=seconds)

    @classmethod
    def malformed_json(cls) -> Fault:
        return cls("malformed_json", status=200)

    @classmethod
    def cut_stream(cls, after_chunks: int = 2, reply: Reply | None = None) -> Fault:
        return cls("cut_stream", status=200, after_chunks=after_chunks, reply=reply)

    @classmethod
    def keep_alive(cls, seconds: float = 30, every_s: float = 0.2) -> Fault:
        """A 200 event stream of SSE comments only (``: keep-alive``, every ``every_s``) for
        ``seconds``, then its end: a proxy holding a request that the model never answers."""
        return cls("keep_alive", status=200, seconds=seconds, retry_after=every_s)

    @classmethod
    def ignore_stream(cls, reply: Reply | None = None) -> Fault:
        """The answer as one JSON object even when a stream was asked for (a server that
        ignores ``"stream": true``)."""
        return cls("ignore_stream", status=200, reply=reply)

    @classmethod
    def raw_stream(cls, *events: bytes) -> Fault:
        """A 200 event stream of exactly these ``data:`` payloads, then its end: chunks of the wrong
        shape, or a stream that ignores ``max_tokens``."""
        return cls("raw_stream", status=200, events=events)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    api_key: str | None
    protocol: str  # "openai" | "anthropic" | "gemini" | "other"
    body: bytes = b""


# ------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

_FINISH_FAMILIES: dict[str, tuple[str, str, str, str]] = {
    # key: (openai, anthropic, gemini, openai legacy completions)
    "stop": ("stop", "end_turn", "STOP", "stop"),
    "length": ("length", "max_tokens", "MAX_TOKENS", "length"),
    "tool_calls": ("tool_calls", "tool_use", "STOP", "stop"),
    "content_filter": ("content_filter", "refusal", "SAFETY", "content_filter"),
}
_FINISH_ALIASES = {
    "stop": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "STOP": "stop",
    "length": "length",
    "max_tokens": "length",
    "MAX_TOKENS": "length",
    "tool_calls": "tool_calls",
    "tool_use": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "refusal": "content_filter",
    "SAFETY": "content_filter",
}
_FINISH_INDEX = {"openai": 0, "anthropic": 1, "gemini": 2, "openai_legacy": 3}


def _finish_reason(reply: Reply, flavour: str, has_tools: bool) -> str:
    if reply.finish_reason is None:
        family = "tool_calls" if has_tools else "stop"
        return _FINISH_FAMILIES[family][_FINISH_INDEX[flavour]]
    family_key = _FINISH_ALIASES.get(reply.finish_reason)
    if family_key is None:
        return reply.finish_reason
    if reply.finish_reason == "stop_sequence" and flavour == "anthropic":
        return "stop_sequence"
    return _FINISH_FAMILIES[family_key][_FINISH_INDEX[flavour]]


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4) if text else 0


def _pieces(text: str, size: int) -> list[str]:
    size = max(1, size)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _hex_id(n: int = 24) -> str:
    return uuid.uuid4().hex[:n]


_TEXT_KEYS = ("text", "content", "thinking", "prompt", "input", "system", "systemInstruction")


def _collect_text(value: Any) -> str:
    """Every string that looks like message text inside a request body (for prompt-token estimates)."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for key, item in v.items():
                if key in _TEXT_KEYS or isinstance(item, (dict, list)):
                    walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(value)
    return " ".join(out)


def _text_of_openai_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "input_text")
        )
    return ""


def _text_of_anthropic_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
    if texts:
        return "".join(texts)
    for block in content:  # a user turn made only of tool results: echo their text
        if isinstance(block, dict) and block.get("type") == "tool_result":
            inner = block.get("content")
            return inner if isinstance(inner, str) else _text_of_anthropic_content(inner)
    return ""


def _last_user_text(protocol: str, body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    if protocol == "openai":
        if "prompt" in body:  # legacy completions
            prompt = body["prompt"]
            if isinstance(prompt, list):
                prompt = prompt[-1] if prompt else ""
            return prompt if isinstance(prompt, str) else ""
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of_openai_content(message.get("content"))
        return ""
    if protocol == "anthropic":
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of_anthropic_content(message.get("content"))
        return ""
    if protocol == "gemini":
        contents = body.get("contents") or []
        for content in reversed(contents):
            if isinstance(content, dict) and content.get("role", "user") == "user":
                parts = content.get("parts") or []
                return "".join(p.get("text", "") for p in parts if isinstance(p, dict) and "text" in p)
        return ""
    return ""


def _instance_for_schema(schema: Any, text: str, defs: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A minimal JSON value that validates against ``schema``; string leaves carry ``text``."""
    if not isinstance(schema, dict) or depth > 12:
        return text
    defs = defs if defs is not None else {**schema.get("$defs", {}), **schema.get("definitions", {})}
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return _instance_for_schema(defs.get(name, {}), text, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [o for o in schema[key] if not (isinstance(o, dict) and o.get("type") == "null")]
            return _instance_for_schema((options or schema[key])[0], text, defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    kind = kind.lower() if isinstance(kind, str) else kind  # Gemini's OpenAPI schema uses "OBJECT", "STRING"
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        if not props:
            return {"echo": text}
        return {name: _instance_for_schema(sub, text, defs, depth + 1) for name, sub in props.items()}
    if kind == "array":
        min_items = int(schema.get("minItems", 0) or 0)
        return [
            _instance_for_schema(schema.get("items", {}), text, defs, depth + 1) for _ in range(min_items)
        ]
    if kind == "integer":
        return int(schema.get("minimum", 0) or 0)
    if kind == "number":
        return float(schema.get("minimum", 0) or 0)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text


def _json_mode_text(protocol: str, body: dict[str, Any], user_text: str) -> str | None:
    """The JSON text to answer with when the request asked for JSON output, else None."""
    schema: Any = None
    wants_json = False
    if protocol == "openai":
        fmt = body.get("response_format")
        if isinstance(fmt, dict):
            if fmt.get("type") == "json_object":
                wants_json = True
            elif fmt.get("type") == "json_schema":
                wants_json = True
                schema = (fmt.get("json_schema") or {}).get("schema")
    elif protocol == "anthropic":
        fmt = (body.get("output_config") or {}).get("format") or body.get("output_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            wants_json = True
            schema = fmt.get("schema")
    elif protocol == "gemini":
        config = body.get("generationConfig") or {}
        if config.get("responseMimeType") == "application/json":
            wants_json = True
            schema = config.get("responseJsonSchema") or config.get("responseSchema")
    if not wants_json:
        return None
    value = _instance_for_schema(schema, user_text) if schema else {"echo": user_text}
    if not isinstance(value, dict):
        value = {"echo": user_text} if schema is None else value
    return json.dumps(value)


def _embedding(text: str, dims: int = 8) -> list[float]:
    """Deterministic unit-ish vector in [-1, 1] derived from sha256(text)."""
    raw = b""
    counter = 0
    while len(raw) < dims * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(int.from_bytes(raw[i * 4 : i * 4 + 4], "big") / 0xFFFFFFFF) * 2.0 - 1.0 for i in range(dims)]
    return [round(v, 6) for v in values]


def _signature_for(thinking: str) -> str:
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _anthropic_thinking_problem(body: dict[str, Any]) -> str | None:
    """Anthropic's rule for tool loops with thinking on: the last assistant turn, when it used a
    tool, starts with the thinking block it was given, its signature intact."""
    if (body.get("thinking") or {}).get("type") not in ("enabled", "adaptive"):
        return None
    turns = body.get("messages") or []
    for index in range(len(turns) - 1, -1, -1):
        turn = turns[index]
        if turn.get("role") != "assistant":
            continue
        blocks = turn.get("content")
        if not isinstance(blocks, list) or not any(b.get("type") == "tool_use" for b in blocks):
            return None
        first = blocks[0].get("type")
        if first not in ("thinking", "redacted_thinking"):
            return (
                f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                f"`{first}`. When `thinking` is enabled, a final `assistant` message must start with a "
                "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
            )
        for block in blocks:
            if block.get("type") == "thinking" and block.get("signature") != _signature_for(
                block["thinking"]
            ):
                return f"messages.{index}.content.0: Invalid `signature` in `thinking` block"
        return None
    return None


# Error shapes -----------------------------------------------------------------------------------

_OPENAI_ERR = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERR = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _error_body(protocol: str, status: int, message: str) -> dict[str, Any]:
    if protocol == "anthropic":
        kind = _ANTHROPIC_ERR.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if protocol == "gemini":
        gstatus = _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        return {"error": {"code": status, "message": message, "status": gstatus}}
    kind, code = _OPENAI_ERR.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _protocol_for(path: str, headers: dict[str, str]) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if re.match(r"^/v1(beta|alpha)?\d*/(models|tunedModels)/[^/]+:\w+$", path) or path.startswith(
        ("/v1beta/", "/v1alpha/")
    ):
        return "gemini"
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        return "openai"
    if path == "/v1/models" or path.startswith("/v1/models/"):
        if "anthropic-version" in headers or "x-api-key" in headers:
            return "anthropic"
        if "x-goog-api-key" in headers:
            return "gemini"
        return "openai"
    return "other"


class _StreamCut(Exception):
    """Raised inside a stream writer to abort the connection (Fault.cut_stream)."""


class _ServerStopping(Exception):
    pass
