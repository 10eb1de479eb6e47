"""JSON-RPC 2.0 over a WebSocket at ``/ws``.

Every message is a request (with ``id``), a notification (without) or a batch (a list of them).
Each request runs in its own task, so several can be in flight on one socket and answers come
back in the order they finish; ``cancel`` stops one by id, and a closed socket stops them all.
A client may also run delegated models for the server (``runner.register``; server/runner_rpc.py):
the server then sends it ``infer`` requests and reads its responses on the same socket.
``infer`` with ``"stream": true`` (or ``infer.stream``) sends each engine event as an
``infer.event`` notification ``{"request_id", "event"}`` and then the final result as the
response. The ``infer`` result has exactly the keys of ``InferenceResult``'s wire contract.
Errors are JSON-RPC error objects whose ``data`` carries our error class, the HTTP-equivalent
status and whether a retry may help (see ``errors.rpc_error`` and docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..backends.fair import CLIENT
from ..errors import InferenceError, close_matches
from ..requests import GenerateRequest, InferenceResult
from ..stream import Done, ErrorEvent, RouteEvent
from .common import ServerState, client_of, parse_json
from .errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    ApiError,
    busy,
    describe,
    error_response,
    rpc_error,
    validated,
)
from .rpc_methods import CAPABILITIES, METHODS, Method, Params, auto, unknown_param, valid_id
from .runner_rpc import RpcRunner

__all__ = ["METHODS", "Session", "register"]

REQUEST_CANCELLED = -32800
TRY_AGAIN_LATER = 1013  # the WebSocket close code for "over a limit: come back later" (RFC 6455)
# Methods the concurrency limit does not count: they free work or feed a call in flight.
_UNCOUNTED = frozenset({"cancel", "runner.event"})
# Methods that write no record, answered while the state store is behind, as HTTP's reads are.
_READS = frozenset({"health", "models.list", "voices"})
EVENT_METHOD = "infer.event"


_FULL = (
    "this connection has more unanswered messages than a client that reads its answers has; while"
    " the server waits for this socket's runner, only its answers and events are taken"
)


def _answers_ours(item: Any) -> bool:
    """Whether a parsed request ``item`` answers or feeds one of our calls to a runner, or
    cancels: a response, ``runner.event`` or ``cancel``."""
    if not isinstance(item, dict):
        return False
    method = item.get("method")
    if method is None:
        return "result" in item or "error" in item
    return isinstance(method, str) and method in _UNCOUNTED  # a list was a TypeError, the socket closed


def _only_answers(raw: str | bytes, runner: RpcRunner | None) -> bool:
    """Whether a message only answers calls of ours ``runner`` has in flight: responses to them
    and ``runner.event`` notifications for them, alone or in a batch. Nothing else is read past
    the bound (cancels with 500 KB ids, each answered, grew the server by 1 MB a message), and
    these leave no answer behind."""
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    items = data if isinstance(data, list) else [data]
    return bool(items) and runner is not None and all(_for_our_call(i, runner) for i in items)


def _for_our_call(item: Any, runner: RpcRunner) -> bool:
    if not isinstance(item, dict):
        return False
    method = item.get("method")
    if method is None:
        return ("result" in item or "error" in item) and runner.calls(item.get("id"))
    params = item.get("params")
    return (
        method == "runner.event"
        and "id" not in item
        and isinstance(params, dict)
        and runner.calls(params.get("id"))
    )


def _id_of(raw: str | bytes) -> Any:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data.get("id") if isinstance(data, dict) and valid_id(data.get("id")) else None


def _error(rid: Any, code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


class Session:
    """One WebSocket connection."""

    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.ws = websocket
        self.state = state
        self.engine = state.engine
        self.in_flight: dict[Any, asyncio.Task[Any]] = {}
        self.cancelled: set[Any] = set()
        self.active = 0  # counted calls of this socket in flight (at most [server] ws_max_in_flight)
        self._tasks: set[asyncio.Task[Any]] = set()
        # Messages read and not yet answered (their answers sent): past a bound the socket is not
        # read until some are, so a client that sends and never reads holds a bounded amount.
        self._unanswered = 0
        self._unanswered_bytes = 0
        self._answered = asyncio.Event()
        self._freed = asyncio.Event()  # a counted call ended: a batch's next may start
        self._send_lock = asyncio.Lock()
        self._open = True
        self.runner: RpcRunner | None = None  # set by runner.register (server/runner_rpc.py)
        self.client = client_of(websocket.scope, bool(state.settings.api_keys))

    async def run(self) -> None:
        CLIENT.set(self.client)  # the calls' tasks inherit it: local models take turns by client
        await self.ws.accept()
        if not self.state.open_socket(self.client):
            limit = self.state.settings.ws_max_sockets_per_client
            self.state.metrics.request("/ws", None, 429)
            reason = f"this client has {limit} WebSockets open (server.ws_max_sockets_per_client)"
            await self.ws.close(code=TRY_AGAIN_LATER, reason=reason)
            return
        try:
            while True:
                answers_only = await self._room()
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw: str | bytes = message.get("text") or message.get("bytes") or b""
                if answers_only and not _only_answers(raw, self.runner):
                    await self.send(self._busy("message", _id_of(raw), _FULL))
                    continue
                task = asyncio.create_task(self._message(raw))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                size = len(raw)
                self._unanswered += 1
                self._unanswered_bytes += size
                task.add_done_callback(functools.partial(self._answered_one, size))
                self.state.active.add(task)
                task.add_done_callback(self.state.active.discard)
        except WebSocketDisconnect:
            pass
        finally:
            self._open = False
            self.state.close_socket(self.client)
            if self.runner is not None:  # its calls in flight fail now; its models go
                self.runner.close()
                self.runner = None
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _room(self) -> bool:
        """Wait while this socket has more unanswered messages than a client that reads its
        answers ever has: each holds its text, its parsed form and its answer until the answer
        is sent, and a client that never read them grew the server by 11 MB a message, for as
        long as it kept the socket open. Messages then wait in the client's socket instead;
        one that reads, pipelining up to the in-flight limit and its batches, never waits here.
        True instead of waiting while our calls to this socket's runner are in flight: its
        answers are in that socket, and its own calls waiting on them were never answered
        (they timed out, and the model's breaker opened for everyone); messages are then read,
        and those that answer nothing of ours are refused as busy."""
        settings = self.state.settings
        frames = 2 * settings.ws_max_in_flight + 16
        size = 2 * settings.ws_max_message_mb * 1024 * 1024
        while self._unanswered >= frames or self._unanswered_bytes >= size:
            if self.runner is not None and self.runner.waiting():
                return True
            self._answered.clear()
            if self.runner is None:
                await self._answered.wait()
                continue
            with contextlib.suppress(TimeoutError):  # a call to its runner may start meanwhile
                await asyncio.wait_for(self._answered.wait(), 0.05)
        return False

    def _answered_one(self, size: int, _: object) -> None:
        self._unanswered -= 1
        self._unanswered_bytes -= size
        self._answered.set()

    async def send(self, payload: Any) -> None:
        if not self._open:
            return
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        async with self._send_lock:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.ws.send_text(text)

    async def notify(self, method: str, params: Params) -> None:
        await self.send({"jsonrpc": "2.0", "method": method, "params": params})

    async def _message(self, raw: str | bytes) -> None:
        """Answer one WebSocket message; whatever goes wrong, the client gets an answer."""
        try:
            await self._answer(raw)
        except Exception as exc:
            info = describe(exc)  # logs what is not ours
            await self.send({"jsonrpc": "2.0", "id": None, "error": rpc_error(info)})

    async def _answer(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):  # a binary frame: its bad bytes were replaced, silently
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                await self.send(
                    _error(
                        None,
                        PARSE_ERROR,
                        f"parse error: the message is not UTF-8 text ({exc.reason} at byte {exc.start})",
                    )
                )
                return
        limit = self.state.settings.ws_max_message_mb
        if len(raw) > limit * 1024 * 1024:  # uvicorn refuses such frames first under `car serve`
            await self.send(
                _error(None, INVALID_REQUEST, f"message larger than {limit:g} MB (server.ws_max_message_mb)")
            )
            return
        try:
            data = parse_json(raw)
        except ApiError as exc:
            await self.send(_error(None, PARSE_ERROR, f"parse error: {exc.message}"))
            return
        if isinstance(data, list):
            await self._batch(data)
            return
        reply = await self.call(data)
        if reply is not None:
            await self.send(reply)

    async def _batch(self, items: list[Any]) -> None:
        """Run a batch's calls concurrently, starting one per loop turn: a batch of quick calls
        (each done in its first step) then takes turns with every other client's work instead of
        running as one block."""
        limit = self.state.settings.ws_max_batch
        if not items or len(items) > limit:
            what = "an empty batch" if not items else f"a batch of {len(items)} calls (at most {limit})"
            await self.send(_error(None, INVALID_REQUEST, f"invalid request: {what}"))
            return

        async def in_turn(item: Any) -> dict[str, Any] | None:
            # The socket's free in-flight slots at once, the rest in turn (84 of 100 were
            # server_busy); slots are counted when taken, so batches sent together, and single
            # calls meanwhile, share them (each batch sized its turns on its own: 24 of 40 busy).
            # A runner's answer takes none: it waited for a slot its own call held.
            if not _answers_ours(item):
                await self._slot()
            return await self.call(item)

        tasks = []
        for i, item in enumerate(items):
            if i:
                await asyncio.sleep(0)
            tasks.append(asyncio.ensure_future(in_turn(item)))
        try:
            answers = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        replies = [a for a in answers if a is not None]
        if replies:
            await self.send(replies)

    async def _slot(self) -> None:
        """Wait until this socket and its client have an in-flight slot free. Nothing runs
        between the return and the call taking it (``_run``), unless the fleet's limit is
        waited for (a busy answer, then, as for a single call)."""
        limit, limiter = self.state.settings.ws_max_in_flight, self.state.limiter
        while self.active >= limit or limiter.client_full(self.client):
            self._freed.clear()
            with contextlib.suppress(TimeoutError):  # another socket of the client frees none here
                await asyncio.wait_for(self._freed.wait(), 0.05)

    async def call(self, data: Any) -> dict[str, Any] | None:
        """Run one request; its response (None for a notification)."""
        if not isinstance(data, dict):
            return _error(None, INVALID_REQUEST, "invalid request: expected a JSON-RPC 2.0 request object")
        if not valid_id(data.get("id")):
            return _error(
                None, INVALID_REQUEST, "invalid request: `id` must be a string, a whole number or null"
            )
        rid = data.get("id")
        notification = "id" not in data
        name = data.get("method")
        if name is None and ("result" in data or "error" in data) and self.runner is not None:
            self.runner.deliver(data)  # a runner's answer to one of our calls (a late one is dropped)
            return None
        if data.get("jsonrpc") != "2.0" or not isinstance(name, str):
            return _error(
                rid, INVALID_REQUEST, 'invalid request: needs "jsonrpc": "2.0" and a "method" string'
            )
        method = METHODS.get(name)
        if method is None:
            close = close_matches(name, list(METHODS))
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            known = ", ".join(sorted(METHODS))
            message = f"method not found: {name} ({hint}methods: {known})"
            return None if notification else _error(rid, METHOD_NOT_FOUND, message)
        params = data.get("params", {})
        params = {} if params is None else params
        if not isinstance(params, dict):
            return _error(rid, INVALID_PARAMS, "invalid params: params must be an object (by name)")
        unknown = unknown_param(name, params)
        if unknown is not None:  # as the methods validated by our request models refuse one
            self.state.metrics.request(f"ws:{name}", None, 400)
            error = rpc_error(describe(unknown))
            return None if notification else {"jsonrpc": "2.0", "id": rid, "error": error}
        reply = await self._run(name, method, params, rid)
        return None if notification else reply

    def _busy(self, name: str, rid: Any, message: str, code: str = "server_busy") -> dict[str, Any]:
        """A 429 ``server_busy`` (or ``code``) answer (retry after a second)."""
        self.state.metrics.request(f"ws:{name}", None, 429)
        return {"jsonrpc": "2.0", "id": rid, "error": rpc_error(describe(busy(message, code)))}

    async def _run(self, name: str, method: Method, params: Params, rid: Any) -> dict[str, Any]:
        if rid is not None and rid in self.in_flight:  # two replies with one id; cancel reached one
            return _error(rid, INVALID_REQUEST, f"invalid request: id {rid!r} is already in flight here")
        metrics = self.state.metrics
        limiter = self.state.limiter
        counted = name not in _UNCOUNTED
        behind = self.state.behind_error() if counted and name not in _READS else None
        if behind is not None:
            metrics.request(f"ws:{name}", None, 503)
            return {"jsonrpc": "2.0", "id": rid, "error": rpc_error(describe(behind))}
        own_limit = self.state.settings.ws_max_in_flight
        if counted and self.active >= own_limit:
            message = f"this connection has {self.active} calls in flight, its limit"
            return self._busy(name, rid, message + " ([server] ws_max_in_flight); wait for one to finish")
        if counted and limiter.client_full(self.client):
            message = f"this client has {limiter.per_client} calls in flight, its limit"
            return self._busy(
                name,
                rid,
                message + " ([server] max_in_flight_per_client); wait for one to finish",
                "client_busy",
            )
        if counted and not limiter.try_acquire(self.client):
            return self._busy(name, rid, f"the server is at its limit of {limiter.limit} concurrent requests")
        fleet = self.state.fleet_limiter if counted else None
        slot = await fleet.acquire() if fleet is not None else None
        if fleet is not None and slot is False:
            limiter.release(self.client)
            message = f"the fleet is at its limit of {fleet.limit} concurrent requests"
            return self._busy(name, rid, message + " ([coordination] global_concurrency); retry shortly")
        task = asyncio.current_task()
        if rid is not None and task is not None:
            self.in_flight[rid] = task
        self.active += counted
        if counted:  # the gauge counted HTTP requests only: 16 embed calls showed as none
            metrics.in_flight.inc()
        timeout_s = self.state.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                result = await method(self, params, rid)
        except asyncio.CancelledError:
            if self.state.stopping and task is not None:  # ServerState.stop: answer, then go
                task.uncancel()
                metrics.request(f"ws:{name}", None, 503)
                return {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "error": rpc_error(describe(self.state.shutdown_error())),
                }
            if rid is None or rid not in self.cancelled:
                metrics.request(f"ws:{name}", None, 499)  # the socket closed: counted, as over HTTP
                raise
            self.cancelled.discard(rid)
            if task is not None:
                task.uncancel()
            metrics.request(f"ws:{name}", None, 499)
            return _error(rid, REQUEST_CANCELLED, "request cancelled")
        except Exception as exc:
            capability = CAPABILITIES.get(name)
            if isinstance(exc, InferenceError):
                metrics.failure(exc, capability)
            info = describe(exc, capability=capability, timeout_s=timeout_s, retry_hint=self.state.retry_hint)
            metrics.request(f"ws:{name}", None, info.status)
            return {"jsonrpc": "2.0", "id": rid, "error": rpc_error(info)}
        finally:
            if counted:
                limiter.release(self.client)
                self.active -= 1
                self._freed.set()
                metrics.in_flight.dec()
            if fleet is not None:
                fleet.release(slot)
            if rid is not None and self.in_flight.get(rid) is task:
                del self.in_flight[rid]
        model = result.get("model_used") if isinstance(result, dict) else None
        metrics.request(f"ws:{name}", model, 200)
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    # --- generation -------------------------------------------------------------------------------

    def _record(self, result: InferenceResult) -> None:
        metrics = self.state.metrics
        routing = result.routing
        if routing is not None:
            metrics.decision(str(routing.decision.strategy))
            metrics.fallback(model for model, _ in routing.attempts)
        metrics.generation(result.model_used, result.latency_ms, result.time_to_first_token_ms, result.usage)

    async def infer(self, params: Params, rid: Any, *, stream: bool = False) -> Any:
        params = auto(params)
        if "stream" in params:
            flag = params.get("stream")
            if flag is not None and not isinstance(flag, bool):
                raise ApiError(400, "`stream` must be a boolean", param="stream")
            stream = stream or flag is True
            params = {k: v for k, v in params.items() if k != "stream"}
        request = validated(GenerateRequest, params, {})  # a check across fields names its field too
        if stream:
            return await self._stream(request, rid)
        result = await self.engine.generate(request)
        self._record(result)
        return result.model_dump(mode="json")

    async def _stream(self, request: GenerateRequest, rid: Any) -> Any:
        metrics = self.state.metrics
        route: RouteEvent | None = None
        events = self.engine.stream(request)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Done):
                    result = event.result()
                    metrics.generation(
                        result.model_used, result.latency_ms, result.time_to_first_token_ms, result.usage
                    )
                    return result.model_dump(mode="json")
                if isinstance(event, ErrorEvent):
                    raise ApiError(  # retryable as the stream's event says (SSE passes it on too)
                        502,
                        event.message,
                        type="upstream_error",
                        code="stream_failed",
                        retryable=event.retryable,
                    )
                if isinstance(event, RouteEvent):
                    if route is None:
                        metrics.decision(event.strategy)
                    else:
                        metrics.fallback([route.model_id])
                    route = event
                if rid is not None:  # a notification (or id null) has no call to tie events to
                    payload = {"request_id": rid, "event": event.model_dump(mode="json")}
                    await self.notify(EVENT_METHOD, payload)
        raise ApiError(502, "the stream ended without a result", type="upstream_error", code="stream_failed")


def register(app: FastAPI, state: ServerState) -> None:
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await Session(websocket, state).run()

    app.add_api_websocket_route("/ws", websocket_endpoint)

    async def plain_http(request: Request) -> Response:  # a browser or curl without the upgrade
        message = "/ws speaks JSON-RPC 2.0 over a WebSocket: connect with a WebSocket client"
        return error_response(describe(ApiError(426, message, code="upgrade_required")))

    app.add_route("/ws", plain_http, methods=["GET"])
