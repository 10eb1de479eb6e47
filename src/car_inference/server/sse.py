"""One generation streamed as server-sent events: OpenAI's chunk framing (``ChatChunks``,
``CompletionChunks``) sent by a raw ASGI response (``EventStream``).

The HTTP status and headers wait for the first content event (or ``Done``): until then the engine
may still fail over to another model (a second ``RouteEvent``) or raise, and a failure before any
output is an ordinary JSON error response with its proper status. After that, a failure is an
error event in the stream.

A client that disconnects cancels the generation: a watcher reads ``http.disconnect`` while the
pump sends, and the first of the two to finish cancels the other and closes the engine's
iterator, which stops the model at its next token and frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from starlette.responses import Response

from ..errors import InferenceError, InferenceFailed
from ..stream import (
    Done,
    ErrorEvent,
    RouteEvent,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
)
from .common import ServerState, car_headers, dumps
from .errors import ErrorInfo, describe, error_body, error_headers
from .translate import GenerationCall, call_id, dumps_str, finish_reason, usage_json

__all__ = ["SSE_DONE", "ChatChunks", "CompletionChunks", "EventStream", "send_body", "sse", "until_gone"]

Send = Any
Receive = Any

log = logging.getLogger("car_inference.server")


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + dumps_str(data).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class ChatChunks:
    """Stream events as ``chat.completion.chunk`` server-sent events, OpenAI's exact framing:
    a role chunk, content/tool-call deltas, a chunk with ``finish_reason``, the usage chunk when
    ``stream_options.include_usage`` asked for it, then ``data: [DONE]``."""

    object = "chat.completion.chunk"

    def __init__(self, call: GenerationCall) -> None:
        self.include_usage = call.include_usage
        self.max_tokens = call.request.params.max_tokens
        self.created = int(time.time())
        self.id = ""
        self.model = ""
        self.trace_id = ""

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            data["usage"] = None
        return sse(data | extra)

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def head(self, route: RouteEvent) -> bytes:
        self.id = f"chatcmpl-{route.trace_id}"
        self.model = route.model_id
        self.trace_id = route.trace_id
        return self._delta({"role": "assistant", "content": ""})

    def event(self, event: StreamEvent) -> bytes | None:
        if isinstance(event, TextDelta):
            return self._delta({"content": event.text})
        if isinstance(event, ThinkingDelta):
            return self._delta({"reasoning_content": event.text})
        if isinstance(event, ToolCallStart):
            call = {
                "index": event.index,
                "id": call_id(self.trace_id, event.index, event.id),
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return self._delta({"tool_calls": [call]})
        if isinstance(event, ToolCallDelta):
            return self._delta(
                {"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]}
            )
        return None  # usage arrives with Done; route events are headers

    def finish(self, done: Done) -> bytes:
        finish = done.finish_reason or finish_reason(done.tool_calls, done.usage, self.max_tokens)
        out = self._delta({}, finish)
        if self.include_usage:
            out += sse(
                {
                    "id": self.id,
                    "object": self.object,
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage_json(done.usage),
                }
            )
        return out + SSE_DONE

    @staticmethod
    def error(info: ErrorInfo) -> bytes:
        """An error after the stream began: OpenAI's SDK raises ``APIError`` on it."""
        return sse(error_body(info))


class CompletionChunks(ChatChunks):
    """Stream events as legacy ``text_completion`` chunks."""

    object = "text_completion"

    def _text(self, text: str, finish: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def head(self, route: RouteEvent) -> bytes:
        self.id = f"cmpl-{route.trace_id}"
        self.model = route.model_id
        self.trace_id = route.trace_id
        return b""

    def event(self, event: StreamEvent) -> bytes | None:
        return self._text(event.text) if isinstance(event, TextDelta) else None

    def finish(self, done: Done) -> bytes:
        finish = done.finish_reason or finish_reason(done.tool_calls, done.usage, self.max_tokens)
        out = self._text("", finish)
        if self.include_usage:
            usage = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
            out += sse(usage | {"choices": [], "usage": usage_json(done.usage)})
        return out + SSE_DONE


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_gone(pump: Coroutine[Any, Any, None], receive: Receive) -> None:
    """Run ``pump`` (a response's sending) until it ends or the client disconnects, whichever
    comes first; the other is cancelled and waited for."""
    sending = asyncio.ensure_future(pump)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((sending, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, watcher):
            task.cancel()
        await asyncio.gather(sending, watcher, return_exceptions=True)


class EventStream(Response):
    """ASGI response for ``engine.stream(...)`` rendered by ``chunks`` (chat or legacy text)."""

    def __init__(self, state: ServerState, events: AsyncIterator[StreamEvent], chunks: ChatChunks) -> None:
        # A Response only so that FastAPI passes it through; it sends everything itself.
        self.background = None
        self.state = state
        self.events = events
        self.chunks = chunks
        self.route: RouteEvent | None = None

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        try:
            await until_gone(self._pump(send), receive)
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()  # stops the model if it is still generating
                except Exception:
                    log.warning("closing a generation stream failed", exc_info=True)

    def _on_route(self, event: RouteEvent) -> None:
        metrics = self.state.metrics
        if self.route is None:
            metrics.decision(event.strategy)
        else:
            metrics.fallback([self.route.model_id])
        self.route = event

    async def _pump(self, send: Send) -> None:
        started = False
        timeout_s = self.state.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                event = await anext(self.events)
                while isinstance(event, RouteEvent):
                    self._on_route(event)
                    event = await anext(self.events)
                await self._start(send)
                started = True
                while not isinstance(event, Done | ErrorEvent):
                    if isinstance(event, RouteEvent):  # another model took over: its name from here
                        self._on_route(event)
                        self.chunks.model = event.model_id
                    elif data := self.chunks.event(event):
                        await send_body(send, data)
                    event = await anext(self.events)
                if isinstance(event, Done):
                    self._on_done(event)
                    await send_body(send, self.chunks.finish(event))
                else:
                    await self._fail(send, event, started)
        except asyncio.CancelledError:
            if not self.state.stopping:
                raise
            await self._stopped(send, started)
            return
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            await self._fail(send, exc, started)
        except OSError:  # the client went away while we were writing
            return
        except StopAsyncIteration:
            await self._fail(send, InferenceFailed("the stream ended without a result"), started)
        except Exception as exc:
            await self._fail(send, exc, started)
        if started:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stopped(self, send: Send, started: bool) -> None:
        """The server is stopping: a stream ends with an error event and ``[DONE]`` (the client
        knows it was cut, and its SSE reader ends), one not begun is a 503."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        info = describe(self.state.shutdown_error())
        with contextlib.suppress(OSError):
            if not started:
                await self._fail(send, self.state.shutdown_error(), started)
                return
            await send_body(send, self.chunks.error(info) + SSE_DONE)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _start(self, send: Send) -> None:
        route = self.route
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        headers["x-accel-buffering"] = "no"
        if route is not None:
            headers |= car_headers(route.model_id, route.trace_id, route.reason)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        if route is not None:
            head = self.chunks.head(route)
            if head:
                await send_body(send, head)

    def _on_done(self, done: Done) -> None:
        model = done.model_used or (self.route.model_id if self.route else None)
        if model:
            self.state.metrics.generation(model, done.latency_ms, done.time_to_first_token_ms, done.usage)

    async def _fail(self, send: Send, error: Exception | ErrorEvent, started: bool) -> None:
        metrics = self.state.metrics
        model = self.route.model_id if self.route else None
        if isinstance(error, ErrorEvent):
            info = _stream_error(error)
            metrics.error(model, "ErrorEvent")
        else:
            info = describe(
                error, timeout_s=self.state.settings.request_timeout_s, retry_hint=self.state.retry_hint
            )
            if isinstance(error, InferenceError):
                metrics.failure(error)
            else:
                metrics.error(model, info.error_class)
        with contextlib.suppress(OSError):
            if started:
                await send_body(send, self.chunks.error(info))
                return
            headers = [(b"content-type", b"application/json")]  # a streamed request was retried
            headers += [(k.encode(), v.encode()) for k, v in error_headers(info).items()]  # when permanent
            await send({"type": "http.response.start", "status": info.status, "headers": headers})
            await send({"type": "http.response.body", "body": dumps(error_body(info))})


async def send_body(send: Send, data: bytes) -> None:
    """One more piece of a response's body."""
    await send({"type": "http.response.body", "body": data, "more_body": True})


def _stream_error(event: ErrorEvent) -> ErrorInfo:
    return ErrorInfo(
        502, "upstream_error", "stream_failed", event.message, None, "ErrorEvent", retryable=event.retryable
    )
