"""The ASGI middleware in front of every route: API keys, body size, the concurrency bound, and
the request counter of ``/metrics``.

A plain ASGI class rather than Starlette's ``BaseHTTPMiddleware``: it adds no task per request
and leaves streaming responses alone. In order, for HTTP:

1. ``/health`` passes untouched (liveness probes need no key and are never refused).
2. With ``server.api_keys`` set, ``Authorization: Bearer <key>`` must match one of them,
   compared in constant time; otherwise 401.
3. The body is read in full before the request takes a concurrency slot: a body over
   ``server.max_body_mb`` is refused with 413 (at once when ``Content-Length`` says so and the
   client waits for ``100 Continue``; a client already sending has up to ``DRAIN_BYTES`` more read
   and dropped first, so it reads the 413 instead of a reset), one that has not arrived within
   ``server.body_timeout_s`` with 408; both close the connection.
4. While the state store is ``server.max_pending_records`` records behind, 503
   ``state_store_behind`` with ``Retry-After`` for requests with a body (the records wait in
   memory); reads (``GET``: ``/v1/health`` says how far behind) are still served.
5. Beyond ``server.max_in_flight_per_client`` requests in flight from one client (its API key,
   else its address), 429 ``client_busy``; beyond ``server.max_concurrency`` in all, 429 with
   ``Retry-After``; with
   ``[coordination] global_concurrency`` (and ``redis_url``), also beyond that many across the
   fleet (``routing/coord_limit.py``: leases in Redis that lapse when a replica dies; local only,
   with a warning, while Redis is away).

A WebSocket handshake without a valid key is refused (HTTP 403); JSON-RPC calls on an open socket
take a slot of the same concurrency bound each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from typing import Any

from ..backends.fair import CLIENT
from ..routing.coord_limit import FleetLimiter
from .common import HEADER_MODEL, HEADER_TRACE, ServerState, bearer_token, client_of, dumps
from .errors import ApiError, busy, describe, error_body

__all__ = ["Guard", "authorized"]

OPEN_PATHS = frozenset({"/health"})
UNLIMITED_PATHS = frozenset({"/health", "/metrics"})

Scope = dict[str, Any]


_TRACE = HEADER_TRACE.encode()


def _with_request_id(send: Any) -> Any:
    """``send`` that puts ``x-request-id`` on every response, refusals included, as OpenAI's API
    does (its SDKs expose it as ``_request_id`` for a support question): the answer's trace id
    where it has one (``x-car-trace-id``, what feedback rates), else a fresh one."""

    async def stamped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            trace = next((value for name, value in headers if name == _TRACE), None)
            headers.append((b"x-request-id", trace or uuid.uuid4().hex.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return stamped


def route_label(path: str, routes: frozenset[str]) -> str:
    """A bounded name for ``path`` (metrics' label, spans' name): a route of the server as it is,
    a model's page as its template, anything else ``other`` (a client's made-up paths and ids)."""
    if path in routes:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def authorized(headers: list[tuple[bytes, bytes]], keys: list[bytes]) -> bool:
    """Whether the ``Authorization: Bearer`` header holds one of ``keys``. Every key is compared,
    each in constant time, so timing tells nothing about which prefix matched."""
    given = bearer_token(headers)
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok and bool(given)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _TooLarge(Exception):
    def __init__(self, more: bool) -> None:
        self.more = more  # whether the client is still sending the body


class _Gone(Exception):
    """The client disconnected before its body was in."""


class _Refused(Exception):
    def __init__(self, error: ApiError) -> None:
        self.error = error


_BODILESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class Guard:
    def __init__(self, app: Any, state: ServerState, routes: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.state = state
        self.keys = [k.encode() for k in state.settings.api_keys]
        self.routes = routes
        fleet = getattr(state.engine, "fleet", None)
        bound = state.engine.config.coordination.global_concurrency
        self.fleet_limiter = FleetLimiter(fleet, bound) if fleet is not None and bound else None
        state.metrics.watch_fleet(fleet, self.fleet_limiter)
        state.fleet_limiter = self.fleet_limiter  # JSON-RPC calls take the fleet's slots too

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan" and self.fleet_limiter is not None:
            await self.app(scope, receive, self._on_shutdown(send))
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            if self.keys and not authorized(scope["headers"], self.keys):
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or invalid API key"})
                return
            await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _on_shutdown(self, send: Any) -> Any:
        """``send`` that gives the fleet's slots back before the server says it has stopped."""
        limiter = self.fleet_limiter
        assert limiter is not None

        async def send_then(message: dict[str, Any]) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await limiter.aclose()
            await send(message)

        return send_then

    async def _fleet_slot(self, send: Any, route: str) -> bool | None:
        """A slot of the fleet's bound: True (held), None (no bound, or Redis away), or False
        (the fleet is full: answered 429 here)."""
        if self.fleet_limiter is None:
            return None
        slot = await self.fleet_limiter.acquire()
        if slot is False:
            full = busy(
                f"the fleet is at its limit of {self.fleet_limiter.limit} concurrent requests "
                "([coordination] global_concurrency); retry shortly"
            )
            self.state.metrics.request(route, None, await self._refuse(send, full))
        return slot

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than {self.state.settings.max_body_mb:g} MB (server.max_body_mb)",
            code="request_too_large",
        )

    async def _body(self, receive: Any, headers: list[tuple[bytes, bytes]]) -> Any:
        """Read the body (at most server.max_body_mb, within server.body_timeout_s) and return a
        ``receive`` that replays it. Raises ``_Refused`` (413, 408) or ``_Gone``."""
        length = _content_length(headers)
        settings = self.state.settings
        if length is not None and length > self.state.max_body_bytes:
            # A client that asked to wait (``Expect: 100-continue``) sends nothing until we read:
            # its answer goes at once; any other is sending the body already.
            if not _expects_continue(headers):
                await _drain(receive, settings.body_timeout_s)
            raise _Refused(self._too_large())
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                body = await _read_body(receive, self.state.max_body_bytes)
        except _TooLarge as big:
            if big.more:  # the last part already read: nothing more will come to drain
                await _drain(receive, settings.body_timeout_s)
            raise _Refused(self._too_large()) from None
        except TimeoutError:
            timeout = ApiError(
                408,
                f"the request body did not arrive within {settings.body_timeout_s:g} s "
                "(server.body_timeout_s)",
                code="request_timeout",
            )
            raise _Refused(timeout) from None
        return _replay(body, receive)

    async def _refuse(self, send: Any, error: ApiError, headers: dict[str, str] | None = None) -> int:
        info = describe(error)
        raw = [(b"content-type", b"application/json")]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        if info.retry_after is not None:
            raw.append((b"retry-after", str(round(info.retry_after)).encode()))
        await send({"type": "http.response.start", "status": info.status, "headers": raw})
        await send({"type": "http.response.body", "body": dumps(error_body(info))})
        return info.status

    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        send = _with_request_id(send)
        path = scope["path"]
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        route = route_label(path, self.routes)
        admitted = await self._admit(scope, receive, send, route)
        if admitted is None:
            return
        receive, client, slot = admitted
        metrics = self.state.metrics
        limiter = self.state.limiter
        outcome: dict[str, Any] = {"status": 500, "model": None, "started": False}

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                outcome["started"] = True
                outcome["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name == HEADER_MODEL.encode():
                        outcome["model"] = value.decode()
            await send(message)

        state = self.state
        task = asyncio.current_task()
        if task is not None:
            state.active.add(task)
        metrics.in_flight.inc()
        turns = CLIENT.set(client)  # local models take turns by client (backends.fair)
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if not state.stopping or task is None:
                raise
            # The server is stopping (ServerState.stop): answer, unless the route already did.
            task.uncancel()
            if not outcome["started"]:
                with contextlib.suppress(OSError):
                    outcome["status"] = await self._refuse(send, state.shutdown_error())
        finally:
            CLIENT.reset(turns)
            state.active.discard(task)
            metrics.in_flight.dec()
            if path not in UNLIMITED_PATHS:
                limiter.release(client)
            if slot and self.fleet_limiter is not None:
                self.fleet_limiter.release(slot)
            metrics.request(route, outcome["model"], int(outcome["status"]))

    async def _admit(
        self, scope: Scope, receive: Any, send: Any, route: str
    ) -> tuple[Any, str | None, bool | None] | None:
        """Everything a request passes before it runs: its API key, its whole body (read under
        ``server.body_timeout_s``), the shedding of writes while the store is behind, the client's
        and the server's concurrency limits and the fleet's slot. Returns the body's ``receive``,
        the client and the fleet slot; None when the request was refused (and answered) or gone."""
        path = scope["path"]
        metrics = self.state.metrics
        headers = scope["headers"]
        if self.keys and not authorized(headers, self.keys):
            error = ApiError(
                401,
                "missing or invalid API key: send `Authorization: Bearer <key>` with a key of this server",
                type="authentication_error",
                code="invalid_api_key",
            )
            status = await self._refuse(send, error, {"www-authenticate": "Bearer"})
            metrics.request(route, None, status)
            return None
        if scope["method"] not in _BODILESS:
            # The whole body is read before the request takes a concurrency slot, under
            # server.body_timeout_s: a client that stalls mid-body holds no slot, and is answered.
            try:
                receive = await self._body(receive, headers)
            except _Refused as refused:
                status = await self._refuse(send, refused.error, {"connection": "close"})
                metrics.request(route, None, status)
                return None
            except _Gone:
                return None
        # Only requests that write records are shed (reads, polls and deletes write none).
        writes = scope["method"] not in _BODILESS
        behind = self.state.behind_error() if writes else None
        if behind is not None:
            metrics.request(route, None, await self._refuse(send, behind))
            return None
        limiter = self.state.limiter
        client = client_of(scope, bool(self.keys))
        if path not in UNLIMITED_PATHS and limiter.client_full(client):
            mine = busy(
                f"this client has {limiter.per_client} requests in flight, its limit "
                "([server] max_in_flight_per_client); wait for one to finish",
                "client_busy",
            )
            metrics.request(route, None, await self._refuse(send, mine))
            return None
        if path not in UNLIMITED_PATHS and not limiter.try_acquire(client):
            full = (
                f"the server is at its limit of {limiter.limit} concurrent requests (server.max_concurrency)"
            )
            metrics.request(route, None, await self._refuse(send, busy(full + "; retry shortly")))
            return None
        slot = None if path in UNLIMITED_PATHS else await self._fleet_slot(send, route)
        if slot is False:
            limiter.release(client)
            return None
        return receive, client, slot


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Gone
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise _TooLarge(bool(message.get("more_body", False)))
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


# What is read and dropped of a refused body, at most, before its 413 (``_drain``).
DRAIN_BYTES = 64 * 1024 * 1024


async def _drain(receive: Any, timeout_s: float) -> None:
    """Read and drop what the client still sends of a body refused as too large (at most
    ``DRAIN_BYTES``, within ``timeout_s``) so that the 413 reaches it: closing a connection that
    holds unread data resets it, and the client sees the reset, not the answer (the reason for
    nginx's lingering close). Nothing is kept; a body larger still gets the reset."""
    left = DRAIN_BYTES
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while left > 0:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                left -= len(message.get("body", b""))


def _expects_continue(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` once, then what the client sends (its disconnect)."""
    replay: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict[str, Any]:
        if replay:
            return replay.pop()
        return await receive()

    return receive_again
