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

import contextlib
import json
import re
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import provider_media, provider_speech
from .provider_formats import _AnthropicReplies, _GeminiReplies, _OpenAIReplies
from .provider_wire import (
    Fault,
    RecordedRequest,
    Reply,
    ToolCallSpec,
    _collect_text,
    _error_body,
    _hex_id,
    _json_mode_text,
    _last_user_text,
    _protocol_for,
    _ServerStopping,
    _StreamCut,
    _tokens,
)

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


class _Handler(_OpenAIReplies, _AnthropicReplies, _GeminiReplies, BaseHTTPRequestHandler):
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
        if fault.kind == "ignore_stream" and success is not None:
            success(fault.reply or Reply(), False)
            return
        if fault.kind == "keep_alive":
            self._start_stream(self._protocol)
            deadline = time.monotonic() + fault.seconds
            while time.monotonic() < deadline:
                self._write_event(b": keep-alive\n\n")
                self.fake._sleep(fault.retry_after or 0.2)
            self._end_stream()
            return
        if fault.kind == "raw_stream":
            self._start_stream(self._protocol)
            for data in fault.events:
                named = b""  # Anthropic's SDK reads an event's kind from its `event:` line
                if self._protocol == "anthropic":
                    with contextlib.suppress(ValueError, AttributeError):
                        named = b"event: " + json.loads(data).get("type", "").encode() + b"\n"
                self._write_event(named + b"data: " + data + b"\n\n")
            self._end_stream()
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
