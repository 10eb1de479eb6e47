"""What the routes share: the server state, JSON in and out, and the ``x-car-*`` headers."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from ..config import ServerSettings
from ..errors import CircuitOpen, InvalidInput, close_matches
from .errors import ApiError

T = TypeVar("T")

if TYPE_CHECKING:
    from ..engine import InferenceEngine
    from ..routing.coord_limit import FleetLimiter
    from .metrics import Metrics

__all__ = [
    "HEADER_MODEL",
    "HEADER_REASON",
    "HEADER_TRACE",
    "Limiter",
    "ServerState",
    "as_object",
    "ascii_header",
    "car_headers",
    "dumps",
    "json_response",
    "parse_json",
    "read_call",
    "read_json",
    "record_feedback",
]

log = logging.getLogger(__name__)

HEADER_MODEL = "x-car-model"
HEADER_TRACE = "x-car-trace-id"
HEADER_REASON = "x-car-route-reason"
# How long a feedback request waits for the state store (the writer's queue, a lock another
# program or replica holds) before it is answered 503 and written when the store lets it.
FEEDBACK_WAIT_S = 10.0


class Limiter:
    """A bound on requests in flight, shared by HTTP routes and JSON-RPC calls, and on those of
    one client (``per_client``; 0: none). The server runs on one event loop, so plain counters
    are enough."""

    def __init__(self, limit: int, per_client: int = 0) -> None:
        self.limit = limit
        self.per_client = per_client
        self.in_flight = 0
        self.clients: dict[str, int] = {}

    def client_full(self, client: str | None) -> bool:
        """Whether ``client`` has its share in flight already."""
        return bool(self.per_client) and client is not None and self.clients.get(client, 0) >= self.per_client

    def try_acquire(self, client: str | None = None) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        if client is not None:
            self.clients[client] = self.clients.get(client, 0) + 1
        return True

    def release(self, client: str | None = None) -> None:
        self.in_flight -= 1
        if client is not None:
            left = self.clients.get(client, 0) - 1
            if left > 0:
                self.clients[client] = left
            else:
                self.clients.pop(client, None)


def bearer_token(headers: Any) -> bytes:
    """The token of an ``Authorization: Bearer`` header (any case of the scheme, spaces around
    the token dropped); empty when there is none."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def client_of(scope: Mapping[str, Any], keyed: bool) -> str | None:
    """Who sent a request, for ``Limiter.per_client``: its bearer key (hashed) on a server with
    API keys, else its address; None when neither is known."""
    if keyed:
        token = bearer_token(scope.get("headers", ()))
        # The token as matched (authorized), not the raw header: "bearer a" and "Bearer  a" were
        # clients of their own, each with its own share of the limits.
        return "key:" + hashlib.blake2b(token, digest_size=8).hexdigest() if token else None
    peer = scope.get("client")
    return f"addr:{peer[0]}" if peer else None


SHUTTING_DOWN = "the server is shutting down; retry shortly"


@dataclass
class ServerState:
    engine: InferenceEngine
    settings: ServerSettings
    metrics: Metrics
    limiter: Limiter
    # The fleet's bound ([coordination] global_concurrency), set by the guard; None without one.
    fleet_limiter: FleetLimiter | None = None
    # Requests (HTTP) and JSON-RPC messages being answered: what `stop` cuts short.
    active: set[asyncio.Task[Any]] = field(default_factory=set)
    stopping: bool = False
    # WebSockets open, by client (``[server] ws_max_sockets_per_client``).
    sockets: Counter[str | None] = field(default_factory=Counter)
    # Run when the app shuts down, whatever stopped it (SIGTERM too: a process-exit hook is not).
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)

    def open_socket(self, client: str | None) -> bool:
        """Count a WebSocket of ``client`` as open; False (not counted) when it holds its limit."""
        limit = self.settings.ws_max_sockets_per_client
        if limit and self.sockets[client] >= limit:
            return False
        self.sockets[client] += 1
        return True

    def close_socket(self, client: str | None) -> None:
        self.sockets[client] -= 1
        if self.sockets[client] <= 0:
            del self.sockets[client]

    async def stop(self, grace_s: float = 1.0) -> None:
        """Ask everything in flight to end now, with an answer: a stream ends with an error
        event and ``[DONE]``, a waiting request gets a 503 ``server_shutdown``, a JSON-RPC call
        its error. Waits for them up to ``grace_s`` (the server then closes connections and
        writes the outcome records still queued)."""
        self.stopping = True
        tasks = [t for t in self.active if not t.done()]
        for task in tasks:
            task.cancel(SHUTTING_DOWN)
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)

    def shutdown_error(self) -> ApiError:
        return ApiError(503, SHUTTING_DOWN, type="server_error", code="server_shutdown", retry_after=1)

    def behind_error(self) -> ApiError | None:
        """The refusal while the state store is ``server.max_pending_records`` records behind the
        answers (their requests wait in memory for it): shed load rather than grow without bound."""
        limit = self.settings.max_pending_records
        pending = self.engine.bookkeeper.pending
        if not limit or pending < limit:
            return None
        return ApiError(
            503,
            f"the state store is {pending} records behind the answers (server.max_pending_records = "
            f"{limit}); retry shortly",
            type="server_error",
            code="state_store_behind",
            retry_after=1,
        )

    @property
    def max_body_bytes(self) -> int:
        return int(self.settings.max_body_mb * 1024 * 1024)

    def retry_hint(self, exc: BaseException) -> float | None:
        """Seconds until an open circuit lets a probe through (a ``Retry-After``), else None."""
        model_id = getattr(exc, "model_id", None)
        if not isinstance(exc, CircuitOpen) or model_id is None:
            return None
        breaker = self.engine.breakers.snapshot().get(model_id) or {}
        retry = breaker.get("retry_in_s")
        return float(retry) if retry is not None else self.engine.config.breaker.cooldown_s


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), status, headers, media_type="application/json")


# Limits on what a JSON body may hold. Python's parser would recurse until RecursionError on deep
# nesting and refuse integers of over 4,300 digits with a ValueError; either was a 500 before.
MAX_JSON_DEPTH = 100
MAX_INT_DIGITS = 100
# A JSON escape of a UTF-16 surrogate: the only way a lone surrogate (not UTF-8 encodable, so a
# crash wherever the string is written out) can get into a parsed body.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class _Refused(ValueError):
    pass


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON value")


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    level: list[Any] = [data]
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def parse_json(raw: bytes | str) -> Any:
    """A JSON text as Python data, or an ``ApiError`` 400 (``invalid_json``) saying what is wrong:
    malformed, not UTF-8 (strictly: ``json.loads`` of bytes would take UTF-16 and the bytes of a
    lone surrogate), nested deeper than ``MAX_JSON_DEPTH``, an integer longer than
    ``MAX_INT_DIGITS`` digits, NaN/Infinity, or a lone UTF-16 surrogate in a string."""
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
        data = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except UnicodeDecodeError:
        raise _invalid("the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise _invalid(f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # _Refused, or a number Python will not convert
        raise _invalid(f"unacceptable JSON: {exc}") from None
    # Cheap tests first: most bodies cannot nest that deep or hold a surrogate escape at all.
    opened = text.count("[") + text.count("{")
    if opened > MAX_JSON_DEPTH and isinstance(data, dict | list) and _depth_exceeds(data, MAX_JSON_DEPTH):
        raise _invalid(f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    if _SURROGATE.search(text) is not None:
        try:
            dumps(data)
        except UnicodeEncodeError:
            raise _invalid(
                "a string holds a lone UTF-16 surrogate (such as \\ud800): strings must be valid Unicode"
            ) from None
    return data


def _json_kind(data: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "a boolean"
    if isinstance(data, int | float):
        return "a number"
    return "a string" if isinstance(data, str) else "an array" if isinstance(data, list) else "an object"


def _invalid(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_json")


# Bodies larger than this (bytes) are parsed off the event loop (``read_json``).
BIG_BODY = 256 * 1024


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; a 400 saying what is wrong otherwise."""
    return await read_call(request, _same)


async def read_call(request: Request, build: Callable[[dict[str, Any]], T]) -> T:
    """``build`` applied to the request body's JSON object (a route's translation into the
    engine's request); a 400 saying what is wrong otherwise. A large body is parsed *and* built on
    a worker thread: half a second of parsing 28 MB on the event loop was half a second of no
    answers for every other client, and validating a million content parts took 5 s more."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # read as JSON, a gzip body was "not UTF-8 text"
        raise ApiError(
            415, f"Content-Encoding {encoding} is not supported: send the body uncompressed",
            code="unsupported_content_encoding",
        )  # fmt: skip
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    if len(body) > BIG_BODY:
        return await asyncio.to_thread(lambda: build(_object_of(body)))
    return build(_object_of(body))


def _same(data: dict[str, Any]) -> dict[str, Any]:
    return data


def _object_of(body: bytes) -> dict[str, Any]:
    try:
        data = parse_json(body)
    except ApiError as exc:
        exc.message = f"the request body: {exc.message}"
        exc.args = (exc.message,)
        raise
    return as_object(data)


def as_object(data: Any) -> dict[str, Any]:
    """``data`` if it is a JSON object; a 400 naming what it is otherwise."""
    if not isinstance(data, dict):
        raise ApiError(400, f"expected a JSON object, got {_json_kind(data)}", code="invalid_json")
    return data


# Punctuation the routing reasons use, spelled in ASCII; everything else non-ASCII is dropped.
_ASCII = str.maketrans(
    {"—": "-", "–": "-", "→": "->", "≥": ">=", "≤": "<=", "×": "x", "…": "...", "·": ".", "±": "+-"}
)


def refuse_fields(
    sent: Mapping[str, Any], takes: frozenset[str], at_default: Mapping[str, tuple[Any, ...]] | None = None
) -> None:
    """A 400 naming the first field of ``sent`` a route neither takes nor finds at a value it
    honours (``at_default``: OpenAI's ``quality: "auto"``): `quality: "high"` and the like were
    dropped without a word and the default came back, billed. A list field sent as ``name[]`` or
    ``name[i]`` (a form) counts as ``name``."""
    defaults = at_default or {}
    for key, value in sent.items():
        name = key.split("[", 1)[0]
        if name in takes or value is None or value in defaults.get(name, ()):
            continue
        honoured = f" (only {', '.join(map(repr, defaults[name]))})" if name in defaults else ""
        near = close_matches(name, takes, n=1) if not honoured else []
        hint = f" (did you mean `{near[0]}`?)" if near else ""
        raise ApiError(
            400,
            f"`{name}` is not supported here{honoured}{hint}; this route takes: {', '.join(sorted(takes))}",
            param=name,
        )


def given(body: Mapping[str, Any], key: str, default: Any) -> Any:
    """``body[key]``, or ``default`` when it is absent or null: a value of a wrong type, even a
    falsy one (``[]``, ``0``, ``""``), goes on to its check instead of becoming the default."""
    value = body.get(key)
    return default if value is None else value


def ascii_header(value: str, limit: int = 512) -> str:
    """``value`` as a safe HTTP header value: ASCII, printable, one line, at most ``limit`` chars."""
    if value.isascii() and value.isprintable():
        return value if len(value) <= limit else value[: limit - 3] + "..."
    text = unicodedata.normalize("NFKD", value.translate(_ASCII))
    text = "".join(c for c in text if " " <= c <= "~")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def car_headers(model: str | None, trace_id: str | None = None, reason: str | None = None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if model:
        headers[HEADER_MODEL] = ascii_header(model)
    if trace_id:
        headers[HEADER_TRACE] = ascii_header(trace_id)
    if reason:
        headers[HEADER_REASON] = ascii_header(reason)
    return headers


# What a route-only caller measured of the call it made (``engine.feedback``'s keywords), besides
# the score: numbers >= 0, tokens whole.
MEASURED = ("latency_ms", "output_tokens", "cost_usd")
FEEDBACK_FIELDS = frozenset({"trace_id", "score", "success", *MEASURED})


def measured_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``MEASURED`` fields of a feedback body, typed as JSON gives them (the engine checks ranges)."""
    found: dict[str, Any] = {}
    for name in MEASURED:
        value = body.get(name)
        if value is None:
            continue
        whole = name == "output_tokens"
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
            kind = "a whole number" if whole else "a number"
            raise ApiError(400, f"`{name}` must be {kind} >= 0", code="invalid_value", param=name)
        found[name] = value if whole else float(value)
    return found


async def feedback_call(engine: InferenceEngine, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/feedback`` and the JSON-RPC ``feedback``: ``{trace_id, score}``, a route-only
    call's measurements (``MEASURED``), or ``success: false`` (no score, or 0) for a call that
    failed; the answer ``{trace_id, score, recorded}`` (``success`` too when given)."""
    if extra := next((key for key in body if key not in FEEDBACK_FIELDS), None):
        # A misspelt `latency` completed the trace without it, and the real one was then refused.
        close = close_matches(extra, sorted(FEEDBACK_FIELDS))
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        takes = ", ".join(sorted(FEEDBACK_FIELDS))
        raise ApiError(400, f"`{extra}` is not a field of feedback (it takes: {takes}){hint}",
                       code="invalid_value", param=extra)  # fmt: skip
    trace_id, score, success = body.get("trace_id"), body.get("score"), body.get("success", True)
    if not isinstance(trace_id, str) or not trace_id:
        raise ApiError(400, "`trace_id` must be the trace id of an answer", param="trace_id")
    if not isinstance(success, bool):
        raise ApiError(400, "`success` must be true or false", param="success")
    if score is None and not success:
        score = 0.0  # a failed call has no answer to rate
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ApiError(400, "`score` must be a number from 0 (bad) to 1 (good)", param="score")
    measured = measured_fields(body)  # a route-only decision's call, measured by the caller
    if not success:
        measured["success"] = False
    try:
        await record_feedback(engine, trace_id, float(score), measured)
    except InvalidInput as exc:
        raise ApiError(400, str(exc), param=exc.param or "score") from None
    return {"trace_id": trace_id, "score": float(score), "recorded": True} | (
        {} if success else {"success": False}
    )


async def record_feedback(
    engine: InferenceEngine, trace_id: str, score: float, measured: dict[str, Any] | None = None
) -> None:
    """``engine.feedback`` off the loop, waited for ``FEEDBACK_WAIT_S`` at most: it writes the
    answer's record first, behind whatever the writer has queued, and a table another program
    locked held the request until ``request_timeout_s``. Past the wait the client gets 503
    ``state_store_behind`` with ``Retry-After``; the write goes on and may land (not if the
    database stays away: it was promised and then lost), so the client is told to send it again;
    the same score twice changes nothing more."""
    call = functools.partial(engine.feedback, trace_id, score, **(measured or {}))
    work = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        await asyncio.wait_for(asyncio.shield(work), FEEDBACK_WAIT_S)
    except TimeoutError:
        work.add_done_callback(functools.partial(_late, trace_id))
        raise ApiError(
            503,
            f"the state store did not take the feedback within {FEEDBACK_WAIT_S:g} s (its writes are "
            "queued, a table is locked, or the database is away); it may still be written, which"
            " is not certain: send it again (the same score twice changes nothing more)",
            type="server_error",
            code="state_store_behind",
            retry_after=FEEDBACK_WAIT_S,
        ) from None
    except asyncio.CancelledError:  # the client went away: the write goes on all the same
        work.add_done_callback(functools.partial(_late, trace_id))
        raise


def _late(trace_id: str, work: asyncio.Future[Any]) -> None:
    """A feedback that finished after its request was answered 503 (or its client left): a
    failure goes to the log, where nobody else would see it."""
    error = None if work.cancelled() else work.exception()
    if error is not None:
        log.warning(
            "feedback for trace %s, written after its request was answered, failed: %s", trace_id, error
        )
