"""A real loopback HTTP server that speaks the OpenAI, Anthropic and Gemini wire formats.

Tests point the *official* SDKs at it (``openai``, ``anthropic``, ``google-genai``) and script what
comes back with :class:`Reply` and :class:`Fault` items queued on the server.

Stdlib only: :class:`http.server.ThreadingHTTPServer` in a daemon thread.

Wire notes (checked against the SDK sources installed in this project's virtualenv):

* Streams are ``text/event-stream`` sent with ``Transfer-Encoding: chunked`` and ``Connection: close``
  (no ``Content-Length``), one flush per event, exactly like the real providers. Chunked framing is what lets
  :meth:`Fault.cut_stream` be detected: the socket is closed before the terminating zero-length chunk, so the
  client's HTTP layer reports an incomplete body instead of a clean end of stream.
* Error bodies use each provider's own JSON shape and the status codes the SDKs map to their error classes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import provider_media, provider_speech

__all__ = [
    "DEFAULT_SERVED_MODELS",
    "FakeProviderServer",
    "Fault",
    "RecordedRequest",
    "Reply",
    "ToolCallSpec",
]

DEFAULT_SERVED_MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "text-embedding-3-small",
    "claude-sonnet-4-6",
    "gemini-2.5-flash",
)

_POLL_S = 0.02  # granularity of every interruptible sleep

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

    kind: str  # "status" | "hang" | "malformed_json" | "cut_stream"
    status: int = 500
    message: str = ""
    retry_after: float | None = None
    seconds: float = 0.0
    after_chunks: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    reply: Reply | None = None  # cut_stream: what the stream carries until the cut (default: the echo)

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


# ------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 resets connections when many clients connect at once
    # (the server benchmark runs at concurrency 16).
    request_queue_size = 256
    block_on_close = False
    allow_reuse_address = True
    fake: FakeProviderServer

    def handle_error(self, request: Any, client_address: Any) -> None:  # silence disconnect tracebacks
        return


class FakeProviderServer:
    """Loopback fake of the OpenAI, Anthropic and Gemini HTTP APIs.

    Usage::

        with FakeProviderServer() as fake:
            fake.queue(Reply(text="hi"), Fault.rate_limit())
            client = openai.OpenAI(base_url=fake.openai_base_url, api_key="sk-test", max_retries=0)

    ``queue`` items are consumed FIFO, one per *generation* request of any protocol (OpenAI chat and
    legacy completions, Anthropic messages, Gemini generateContent/streamGenerateContent). Embeddings, model
    lists and token counts never consume the queue; fault them with :meth:`set_key_behavior`. A key
    behaviour takes precedence over (and does not consume) the queue. An empty queue means ``Reply()``,
    i.e. an echo.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.served_models: list[str] = list(DEFAULT_SERVED_MODELS)
        self._queue: deque[Reply | Fault] = deque()
        self._key_faults: dict[str, Fault] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.media = provider_media.MediaState()  # images and video jobs (provider_media.py)
        self.speech = provider_speech.SpeechState()  # audio in and out (provider_speech.py)

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> FakeProviderServer:
        if self._server is not None:
            return self
        self._stop.clear()
        server = _HTTPServer((self.host, self.port), _Handler)
        server.fake = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-provider", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._stop.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses -----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.base_url

    @property
    def gemini_base_url(self) -> str:
        return self.base_url

    # scripting -----------------------------------------------------------------------------------

    def queue(self, *items: Reply | Fault) -> None:
        for item in items:
            if not isinstance(item, (Reply, Fault)):
                raise TypeError(f"queue() takes Reply or Fault items, not {type(item).__name__}")
        with self._lock:
            self._queue.extend(items)

    @property
    def pending(self) -> int:
        """How many queued items are still waiting to be consumed."""
        with self._lock:
            return len(self._queue)

    def set_key_behavior(self, api_key: str, fault: Fault | None) -> None:
        with self._lock:
            if fault is None:
                self._key_faults.pop(api_key, None)
            else:
                self._key_faults[api_key] = fault

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self._key_faults.clear()
            self.media.reset()
            self.speech.reset()

    # internal ------------------------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _fault_for_key(self, api_key: str | None) -> Fault | None:
        if api_key is None:
            return None
        with self._lock:
            return self._key_faults.get(api_key)

    def _next_item(self) -> Reply | Fault:
        with self._lock:
            return self._queue.popleft() if self._queue else Reply()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _sleep(self, seconds: float) -> None:
        """Interruptible sleep: returns early (raising) when the server stops."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._stop.wait(min(_POLL_S, remaining)):
                raise _ServerStopping


# ------------------------------------------------------------------------------------------------
# Request handler
# --------------------------------------------------------------------------------------------------

_GEMINI_METHOD = re.compile(r"^/(v1beta|v1alpha|v1)/(models|tunedModels)/([^/:]+):(\w+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeProvider/1.0"
    sys_version = ""
    server: _HTTPServer

    # plumbing ------------------------------------------------------------------------------------

    @property
    def fake(self) -> FakeProviderServer:
        return self.server.fake

    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.fake._track(self.connection, False)

    def handle(self) -> None:
        with contextlib.suppress(OSError, _ServerStopping, _StreamCut):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _abort(self) -> None:
        """Drop the connection abruptly (no more bytes, no terminating chunk)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.connection.close()

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send_bytes(status, body, "application/json", headers)

    def _send_bytes(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _common_headers(self, protocol: str) -> dict[str, str]:
        rid = _hex_id(24)
        if protocol == "anthropic":
            return {"request-id": f"req_{rid}"}
        if protocol == "openai":
            return {"x-request-id": f"req_{rid}", "openai-processing-ms": "1"}
        return {}

    # dispatch ------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._cut_after = None
        self._chunks_sent = 0
        self._between = 0.0
        split = urlsplit(self.path)
        path = split.path
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        raw = self._read_body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        api_key: str | None = None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            api_key = auth[7:].strip()
        api_key = api_key or headers.get("x-api-key") or headers.get("x-goog-api-key") or query.get("key")
        api_key = api_key or headers.get("xi-api-key")  # ElevenLabs
        protocol = _protocol_for(path, headers)
        self.fake._record(
            RecordedRequest(
                method=self.command,
                path=path,
                query=query,
                headers=headers,
                json=body,
                api_key=api_key,
                protocol=protocol,
                body=raw,
            )
        )
        self._protocol = protocol
        self._path = path
        self._query = query
        self._body = body if isinstance(body, dict) else {}
        self._raw = raw  # multipart uploads (provider_media.py) parse it themselves

        if path == "/health" and self.command == "GET":
            self._send_json(200, {"status": "ok"})
            return

        route = self._route(path)
        key_fault = self.fake._fault_for_key(api_key)
        if route is None:
            if key_fault is not None:
                self._apply_fault(key_fault, stream=False, success=None)
                return
            self._send_error(404, f"Unknown path {self.command} {path} (fake provider).")
            return
        handler, is_generation, wants_stream = route
        if key_fault is not None:
            self._apply_fault(key_fault, stream=wants_stream, success=handler)
            return
        if not is_generation:
            handler(Reply(), wants_stream)
            return
        item = self.fake._next_item()
        if isinstance(item, Fault):
            self._apply_fault(item, stream=wants_stream, success=handler)
            return
        if item.delay_s > 0:
            self.fake._sleep(item.delay_s)
        handler(item, wants_stream)

    def _route(self, path: str) -> tuple[Any, bool, bool] | None:
        """(handler(reply, stream), consumes_queue, is_stream) for a known endpoint, else None."""
        method = self.command
        body = self._body
        stream = bool(body.get("stream"))
        if (media := provider_media.route(self, method, path)) is not None:
            return media
        if (speech := provider_speech.route(self, method, path)) is not None:
            return speech
        if method == "POST":
            if path == "/v1/chat/completions":
                return self._openai_chat, True, stream
            if path == "/v1/completions":
                return self._openai_legacy, True, stream
            if path == "/v1/embeddings":
                return self._openai_embeddings, False, False
            if path == "/v1/messages":
                return self._anthropic_messages, True, stream
            if path == "/v1/messages/count_tokens":
                return self._anthropic_count_tokens, False, False
            match = _GEMINI_METHOD.match(path)
            if match:
                self._gemini_model = match.group(3)
                verb = match.group(4)
                if verb == "generateContent":
                    return self._gemini_generate, True, False
                if verb == "streamGenerateContent":
                    return self._gemini_generate, True, True
                if verb in ("embedContent", "batchEmbedContents"):
                    return self._gemini_embed, False, False
                if verb == "countTokens":
                    return self._gemini_count_tokens, False, False
            return None
        if method == "GET":
            if path == "/v1/models":
                return self._list_models, False, False
            if path.startswith("/v1/models/"):
                return self._get_model, False, False
            if re.match(r"^/(v1beta|v1alpha|v1)/models$", path):
                return self._gemini_list_models, False, False
            if re.match(r"^/(v1beta|v1alpha|v1)/models/[^/:]+$", path):
                return self._gemini_get_model, False, False
        return None

    # errors and faults ---------------------------------------------------------------------------

    def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        hdrs = self._common_headers(self._protocol)
        hdrs.update(headers or {})
        protocol = self._protocol
        if protocol == "other":  # pick the shape from the credentials the caller sent
            hdr = {k.lower() for k in self.headers}
            protocol = (
                "anthropic"
                if "anthropic-version" in hdr or "x-api-key" in hdr
                else "gemini"
                if "x-goog-api-key" in hdr
                else "openai"
            )
        payload = _error_body(protocol, status, message)
        ctype = "application/json; charset=UTF-8" if protocol == "gemini" else "application/json"
        self._send_bytes(status, json.dumps(payload).encode(), ctype, hdrs)

    def _apply_fault(self, fault: Fault, *, stream: bool, success: Any) -> None:
        if fault.kind == "status":
            headers = dict(fault.headers)
            if fault.retry_after is not None:
                ra = fault.retry_after
                headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            self._send_error(fault.status, fault.message or f"Fake error {fault.status}.", headers)
            return
        if fault.kind == "hang":
            self.close_connection = True
            try:
                self.fake._sleep(fault.seconds)
            finally:
                self._abort()
            return
        if fault.kind == "malformed_json":
            if stream:
                self._start_stream(self._protocol)
                if self._protocol == "anthropic":
                    self._write_event(
                        b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n'
                    )
                else:
                    self._write_event(b'data: {"id": "broken", "choices": [{"delta": \n\n')
                self._end_stream()
                return
            self._send_bytes(200, b'{"id": "broken", "object": ', "application/json", None)
            return
        if fault.kind == "cut_stream":
            if stream and success is not None:
                self._cut_after = max(0, fault.after_chunks)
                try:
                    success(fault.reply or Reply(), True)
                except _StreamCut:
                    self._abort()
                return
            # non-stream: promise a body, send part of it, drop the connection
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "4096")
            self.end_headers()
            self.wfile.write(b'{"id": "cut-short", "obj')
            self._abort()
            return
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    # streaming primitives ------------------------------------------------------------------------

    _cut_after: int | None = None
    _chunks_sent: int = 0
    _between: float = 0.0

    def _start_stream(self, protocol: str) -> None:
        self.close_connection = True
        self._chunks_sent = 0
        self.send_response(200)
        self.send_header(
            "Content-Type", "text/event-stream" + ("; charset=utf-8" if protocol != "gemini" else "")
        )
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        for name, value in self._common_headers(protocol).items():
            self.send_header(name, value)
        self.end_headers()

    def _write_event(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _content_event(self, data: bytes) -> None:
        """An event that carries generated content: counts towards Fault.cut_stream."""
        if self._cut_after is not None and self._chunks_sent >= self._cut_after:
            raise _StreamCut
        if self._chunks_sent and self._between > 0:
            self.fake._sleep(self._between)
        self._write_event(data)
        self._chunks_sent += 1

    def _final_event(self, data: bytes) -> None:
        """A terminating event (finish/usage chunk, [DONE], message_delta/stop): never sent when cutting."""
        if self._cut_after is not None:
            raise _StreamCut
        self._write_event(data)

    def _end_stream(self) -> None:
        if self._cut_after is not None:
            raise _StreamCut  # the reply ended before the cut point: still never terminate cleanly
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    @staticmethod
    def _sse(payload: Any, event: str | None = None) -> bytes:
        head = f"event: {event}\n" if event else ""
        return (head + "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n").encode()

    # shared reply computation --------------------------------------------------------------------

    def _resolve(self, reply: Reply) -> tuple[str, list[ToolCallSpec], int, int, int]:
        """(text, tool_calls, prompt_tokens, completion_tokens, thinking_tokens)."""
        tool_calls = list(reply.tool_calls)
        text = reply.text
        if not text and not tool_calls:
            user = _last_user_text(self._protocol, self._body)
            text = _json_mode_text(self._protocol, self._body, user) or f"echo: {user}"
        thinking_tokens = _tokens(reply.thinking or "")
        prompt = reply.prompt_tokens
        if prompt is None:
            prompt = max(1, _tokens(_collect_text(self._body)))
        completion = reply.completion_tokens
        if completion is None:
            args = "".join(tc.arguments_json() + tc.name for tc in tool_calls)
            completion = max(1, _tokens(text) + _tokens(args)) + thinking_tokens
        return text, tool_calls, prompt, completion, min(thinking_tokens, completion)

    def _model(self, default: str) -> str:
        model = self._body.get("model")
        return model if isinstance(model, str) and model else default

    # OpenAI --------------------------------------------------------------------------------------

    def _openai_usage(self, prompt: int, completion: int, reasoning: int, cached: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _openai_chat(self, reply: Reply, stream: bool) -> None:
        text, tool_calls, prompt, completion, reasoning = self._resolve(reply)
        finish = _finish_reason(reply, "openai", bool(tool_calls))
        cid = f"chatcmpl-{_hex_id(29)}"
        created = int(time.time())
        model = self._model("gpt-4o-mini")
        call_ids = [tc.id or f"call_{_hex_id(24)}" for tc in tool_calls]
        usage = self._openai_usage(prompt, completion, reasoning, reply.cached_tokens)
        if not stream:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text or None,
                "refusal": None,
                "annotations": [],
            }
            if reply.thinking is not None:
                message["reasoning_content"] = reply.thinking
            if tool_calls:
                message["tool_calls"] = [
                    {
                        "id": cid_,
                        "type": "function",
                        "function": {"name": tc.name, "arguments": tc.arguments_json()},
                    }
                    for cid_, tc in zip(call_ids, tool_calls, strict=True)
                ]
            payload = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            self._send_json(200, payload, self._common_headers("openai"))
            return

        include_usage = bool((self._body.get("stream_options") or {}).get("include_usage"))
        self._between = reply.delay_between_chunks_s

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                payload["usage"] = None
            return self._sse(payload)

        self._start_stream("openai")
        self._write_event(chunk({"role": "assistant", "content": "", "refusal": None}))
        for piece in _pieces(reply.thinking or "", reply.chunk_chars):
            self._content_event(chunk({"reasoning_content": piece}))
        for piece in _pieces(text, reply.chunk_chars):
            self._content_event(chunk({"content": piece}))
        for index, (call_id, tc) in enumerate(zip(call_ids, tool_calls, strict=True)):
            head = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": tc.name, "arguments": ""},
            }
            self._content_event(chunk({"tool_calls": [head]}))
            for piece in _pieces(tc.arguments_json(), reply.chunk_chars):
                self._content_event(
                    chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                )
        self._final_event(chunk({}, finish))
        if include_usage:
            final = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            }
            self._final_event(self._sse(final))
        self._final_event(b"data: [DONE]\n\n")
        self._end_stream()

    def _openai_legacy(self, reply: Reply, stream: bool) -> None:
        text, _tools, prompt, completion, _reasoning = self._resolve(reply)
        finish = _finish_reason(reply, "openai_legacy", False)
        cid = f"cmpl-{_hex_id(29)}"
        created = int(time.time())
        model = self._model("gpt-3.5-turbo-instruct")
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

        def obj(choice_text: str, finish_reason: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"text": choice_text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
                ],
            }

        if not stream:
            payload = obj(text, finish)
            payload["usage"] = usage
            self._send_json(200, payload, self._common_headers("openai"))
            return
        self._between = reply.delay_between_chunks_s
        self._start_stream("openai")
        for piece in _pieces(text, reply.chunk_chars):
            self._content_event(self._sse(obj(piece, None)))
        self._final_event(self._sse(obj("", finish)))
        if (self._body.get("stream_options") or {}).get("include_usage"):
            final = obj("", None)
            final["choices"] = []
            final["usage"] = usage
            self._final_event(self._sse(final))
        self._final_event(b"data: [DONE]\n\n")
        self._end_stream()

    def _openai_embeddings(self, reply: Reply, stream: bool) -> None:
        raw_input = self._body.get("input", "")
        if isinstance(raw_input, str):
            inputs: list[str] = [raw_input]
        elif isinstance(raw_input, list) and raw_input and all(isinstance(x, int) for x in raw_input):
            inputs = [json.dumps(raw_input)]  # one pre-tokenised input
        elif isinstance(raw_input, list):
            inputs = [x if isinstance(x, str) else json.dumps(x) for x in raw_input]
        else:
            inputs = [json.dumps(raw_input)]
        dims = self._body.get("dimensions")
        dims = dims if isinstance(dims, int) and dims > 0 else 8
        as_base64 = self._body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _embedding(item, dims)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(max(1, _tokens(x)) for x in inputs)
        payload = {
            "object": "list",
            "data": data,
            "model": self._model("text-embedding-3-small"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        self._send_json(200, payload, self._common_headers("openai"))

    def _list_models(self, reply: Reply, stream: bool) -> None:
        models = list(self.fake.served_models)
        if self._protocol == "gemini":  # google-genai's default api_version is "v1": GET /v1/models
            self._gemini_list_models(reply, stream)
            return
        if self._protocol == "anthropic":
            data = [self._anthropic_model(m) for m in models]
            payload = {
                "data": data,
                "has_more": False,
                "first_id": models[0] if models else None,
                "last_id": models[-1] if models else None,
            }
        else:
            payload = {"object": "list", "data": [self._openai_model(m) for m in models]}
        self._send_json(200, payload, self._common_headers(self._protocol))

    def _get_model(self, reply: Reply, stream: bool) -> None:
        if self._protocol == "gemini":
            self._gemini_get_model(reply, stream)
            return
        name = self._path[len("/v1/models/") :]
        if name not in self.fake.served_models:
            self._send_error(404, f"The model '{name}' does not exist (fake provider).")
            return
        payload = self._anthropic_model(name) if self._protocol == "anthropic" else self._openai_model(name)
        self._send_json(200, payload, self._common_headers(self._protocol))

    @staticmethod
    def _openai_model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake-provider"}

    @staticmethod
    def _anthropic_model(name: str) -> dict[str, Any]:
        return {"type": "model", "id": name, "display_name": name, "created_at": "2025-01-01T00:00:00Z"}

    # Anthropic -----------------------------------------------------------------------------------

    def _anthropic_usage(self, reply: Reply, prompt: int, completion: int) -> dict[str, Any]:
        return {
            "input_tokens": prompt,
            "output_tokens": completion,
            "cache_creation_input_tokens": reply.cache_creation_tokens,
            "cache_read_input_tokens": reply.cached_tokens,
            "service_tier": "standard",
        }

    def _anthropic_messages(self, reply: Reply, stream: bool) -> None:
        problem = _anthropic_thinking_problem(self._body)
        if problem is not None:
            self._send_error(400, problem)
            return
        text, tool_calls, prompt, completion, _thinking_tokens = self._resolve(reply)
        stop_reason = _finish_reason(reply, "anthropic", bool(tool_calls))
        mid = f"msg_{_hex_id(24)}"
        model = self._model("claude-sonnet-4-6")
        tool_ids = [tc.id or f"toolu_{_hex_id(24)}" for tc in tool_calls]
        signature = _signature_for(reply.thinking) if reply.thinking is not None else ""
        if not stream:
            content: list[dict[str, Any]] = []
            if reply.thinking is not None:
                content.append({"type": "thinking", "thinking": reply.thinking, "signature": signature})
            if text:
                content.append({"type": "text", "text": text})
            for tid, tc in zip(tool_ids, tool_calls, strict=True):
                content.append(
                    {"type": "tool_use", "id": tid, "name": tc.name, "input": tc.arguments_object()}
                )
            payload = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": self._anthropic_usage(reply, prompt, completion),
            }
            self._send_json(200, payload, self._common_headers("anthropic"))
            return

        self._between = reply.delay_between_chunks_s
        start_usage = self._anthropic_usage(reply, prompt, 1)
        self._start_stream("anthropic")
        start = {
            "type": "message_start",
            "message": {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": start_usage,
            },
        }
        self._write_event(self._sse(start, "message_start"))
        self._write_event(self._sse({"type": "ping"}, "ping"))
        index = 0

        def block_start(block: dict[str, Any]) -> None:
            self._write_event(
                self._sse(
                    {"type": "content_block_start", "index": index, "content_block": block},
                    "content_block_start",
                )
            )

        def delta(d: dict[str, Any]) -> None:
            self._content_event(
                self._sse({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")
            )

        def block_stop() -> None:
            self._write_event(self._sse({"type": "content_block_stop", "index": index}, "content_block_stop"))

        if reply.thinking is not None:
            block_start({"type": "thinking", "thinking": "", "signature": ""})
            for piece in _pieces(reply.thinking, reply.chunk_chars):
                delta({"type": "thinking_delta", "thinking": piece})
            self._write_event(
                self._sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": signature},
                    },
                    "content_block_delta",
                )
            )
            block_stop()
            index += 1
        if text:
            block_start({"type": "text", "text": ""})
            for piece in _pieces(text, reply.chunk_chars):
                delta({"type": "text_delta", "text": piece})
            block_stop()
            index += 1
        for tid, tc in zip(tool_ids, tool_calls, strict=True):
            block_start({"type": "tool_use", "id": tid, "name": tc.name, "input": {}})
            self._write_event(
                self._sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": ""},
                    },
                    "content_block_delta",
                )
            )
            for piece in _pieces(tc.arguments_json(), reply.chunk_chars):
                delta({"type": "input_json_delta", "partial_json": piece})
            block_stop()
            index += 1
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {
                "input_tokens": prompt,
                "output_tokens": completion,
                "cache_creation_input_tokens": reply.cache_creation_tokens,
                "cache_read_input_tokens": reply.cached_tokens,
            },
        }
        self._final_event(self._sse(message_delta, "message_delta"))
        self._final_event(self._sse({"type": "message_stop"}, "message_stop"))
        self._end_stream()

    def _anthropic_count_tokens(self, reply: Reply, stream: bool) -> None:
        tokens = max(1, _tokens(_collect_text(self._body)))
        self._send_json(200, {"input_tokens": tokens}, self._common_headers("anthropic"))

    # Gemini --------------------------------------------------------------------------------------

    def _gemini_usage(self, reply: Reply, prompt: int, completion: int, thoughts: int) -> dict[str, Any]:
        candidates = max(0, completion - thoughts)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        if reply.cached_tokens:
            usage["cachedContentTokenCount"] = reply.cached_tokens
        return usage

    def _gemini_generate(self, reply: Reply, stream: bool) -> None:
        text, tool_calls, prompt, completion, thoughts = self._resolve(reply)
        finish = _finish_reason(reply, "gemini", bool(tool_calls))
        model = self._gemini_model
        response_id = _hex_id(20)
        usage = self._gemini_usage(reply, prompt, completion, thoughts)
        signature = _signature_for(reply.thinking) if reply.thinking else None

        def call_part(tc: ToolCallSpec) -> dict[str, Any]:
            call: dict[str, Any] = {"name": tc.name, "args": tc.arguments_object()}
            if tc.id:
                call["id"] = tc.id
            return {"functionCall": call}

        def response(
            parts: list[dict[str, Any]], finish_reason: str | None, usage_md: dict[str, Any]
        ) -> dict:
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
            if finish_reason is not None:
                candidate["finishReason"] = finish_reason
            return {
                "candidates": [candidate],
                "usageMetadata": usage_md,
                "modelVersion": model,
                "responseId": response_id,
            }

        if not stream:
            parts: list[dict[str, Any]] = []
            if reply.thinking:
                parts.append({"text": reply.thinking, "thought": True})
            if text:
                parts.append({"text": text})
            parts.extend(call_part(tc) for tc in tool_calls)
            if signature and len(parts) > 1:
                parts[1]["thoughtSignature"] = signature
            self._send_json(200, response(parts, finish, usage))
            return

        self._between = reply.delay_between_chunks_s
        running = {"promptTokenCount": prompt, "totalTokenCount": prompt}
        self._start_stream("gemini")
        for piece in _pieces(reply.thinking or "", reply.chunk_chars):
            self._content_event(self._sse(response([{"text": piece, "thought": True}], None, running)))
        first_answer = True
        for piece in _pieces(text, reply.chunk_chars):
            part: dict[str, Any] = {"text": piece}
            if signature and first_answer:
                part["thoughtSignature"] = signature
            first_answer = False
            self._content_event(self._sse(response([part], None, running)))
        last_parts: list[dict[str, Any]] = []
        for tc in tool_calls:  # Gemini sends function calls whole, never as partial JSON
            part = call_part(tc)
            if signature and first_answer:
                part["thoughtSignature"] = signature
            first_answer = False
            last_parts.append(part)
        self._final_event(self._sse(response(last_parts or [{"text": ""}], finish, usage)))
        self._end_stream()

    def _gemini_embed(self, reply: Reply, stream: bool) -> None:
        body = self._body
        config_dims = body.get("outputDimensionality")

        def values_for(req: dict[str, Any]) -> dict[str, Any]:
            parts = (req.get("content") or {}).get("parts") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            dims = req.get("outputDimensionality") or config_dims
            dims = dims if isinstance(dims, int) and dims > 0 else 8
            return {"values": _embedding(text, dims)}

        if "requests" in body:
            payload: dict[str, Any] = {"embeddings": [values_for(r) for r in body.get("requests") or []]}
        else:
            payload = {"embedding": values_for(body)}
        self._send_json(200, payload)

    def _gemini_count_tokens(self, reply: Reply, stream: bool) -> None:
        self._send_json(200, {"totalTokens": max(1, _tokens(_collect_text(self._body)))})

    def _gemini_model_obj(self, name: str) -> dict[str, Any]:
        methods = [
            "generateContent",
            "streamGenerateContent",
            "countTokens",
            "embedContent",
            "batchEmbedContents",
        ]
        return {
            "name": f"models/{name}",
            "version": "001",
            "displayName": name,
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": methods,
        }

    def _gemini_list_models(self, reply: Reply, stream: bool) -> None:
        self._send_json(200, {"models": [self._gemini_model_obj(m) for m in self.fake.served_models]})

    def _gemini_get_model(self, reply: Reply, stream: bool) -> None:
        name = self._path.rsplit("/", 1)[-1]
        if name not in self.fake.served_models:
            self._send_error(404, f"models/{name} is not found (fake provider).")
            return
        self._send_json(200, self._gemini_model_obj(name))
