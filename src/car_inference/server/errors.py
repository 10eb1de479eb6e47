"""Every failure as an OpenAI-shaped error (HTTP) or a JSON-RPC error object (WebSocket).

``describe`` is the one table from exceptions to (status, type, code, message); the HTTP routes
and the JSON-RPC methods both use it, so a failure reads the same on either side. Anything that
is not ours (a bug) becomes a 500 with a generic message; its traceback goes to the server log,
never to the client.

Status decisions (documented in docs/protocol.md):

- malformed JSON, wrong types, missing fields, UnsupportedMode, TokenizationError: 400
- ModelNotFound, TraceNotFound: 404
- SpendLimitExceeded: 402 (not 429: waiting a few seconds does not help, and SDKs retry 429)
- ModelUnavailable, CircuitOpen, DeviceError, StateUnavailable (the shared state store is away): 503;
  a database error of the state store's (sqlite3, psycopg: a table dropped by hand): 503 ``state_store_error``
- ProviderError, AllModelsFailed, DownloadFailed: 502; a provider timeout: 504; a provider's
  400/413/422 (it refused the input the client sent): 400 ``provider_rejected_input``; a provider's
  429 (every model tried was rate-limited): 429 ``upstream_rate_limited`` with its Retry-After
- our own per-request timeout: 504
- on the speech and image endpoints, ModelUnavailable / UnsupportedMode: 501 naming the capability
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ..errors import (
    AllModelsFailed,
    CircuitOpen,
    ConfigError,
    DeviceError,
    DownloadFailed,
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    ProviderError,
    SpendLimitExceeded,
    StateUnavailable,
    TokenizationError,
    TraceNotFound,
    UnsupportedMode,
    close_matches,
)

__all__ = [
    "ApiError",
    "ErrorInfo",
    "busy",
    "describe",
    "error_body",
    "error_response",
    "guarded",
    "rpc_error",
    "validated",
]

log = logging.getLogger("car_inference.server")

GENERIC_500 = "internal server error; the server log has the details"


class ApiError(Exception):
    """A request the server refuses before the engine sees it (bad JSON, a wrong field...)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = "invalid_value",
        param: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        # None: a refusal that names a time to come back (busy, ...) is one a retry may cure.
        self.retryable = retry_after is not None if retryable is None else retryable
        super().__init__(message)


@dataclass(frozen=True)
class ErrorInfo:
    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None
    error_class: str = "ApiError"
    retryable: bool = False
    retry_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_M = TypeVar("_M", bound=BaseModel)


# Where pydantic names the branch of a union an error came from ("str", "list[...]",
# "function-after[...]") inside an error's location: not a field the client sent.
_BRANCHES = frozenset({"str", "int", "float", "bool", "bytes", "list", "dict", "none"})
# Messages that name our classes ("a valid dictionary or instance of IntentHint"): JSON's word.
_OBJECT_TYPES = frozenset({"model_type", "dict_type", "model_attributes_type"})


def _is_branch(part: int | str) -> bool:
    return isinstance(part, str) and ("[" in part or part in _BRANCHES)


def _branch_at(loc: tuple[int | str, ...]) -> int:
    """The index of the first union branch name in ``loc``; -1 where there is none."""
    return next((i for i, part in enumerate(loc) if _is_branch(part)), -1)


def _first_error(errors: list[Any]) -> tuple[tuple[int | str, ...], str, int]:
    """The location (union branch names removed) and message of the error to report, and how many
    errors that accounts for: the first, or where it is one branch of a union, the branch that got
    furthest into the input (content given as a list fails the ``str`` branch at once and the list
    branch at the offending part)."""
    first = errors[0]
    loc = tuple(first["loc"])
    at, same = _branch_at(loc), [first]
    if at >= 0:
        same = [e for e in errors if tuple(e["loc"])[:at] == loc[:at] and _branch_at(tuple(e["loc"])) == at]
        first = max(same, key=lambda e: len(e["loc"]))
        loc = tuple(p for p in first["loc"] if not _is_branch(p))
    message = "Input should be an object" if first.get("type") in _OBJECT_TYPES else _msg(first)
    return loc, message, len(same)


def _msg(error: Any) -> str:
    """pydantic's message without the "Value error, " it puts before a validator's own words."""
    return str(error["msg"]).removeprefix("Value error, ")


def _misspelt(errors: list[Any]) -> tuple[Any, list[str]]:
    """The first field sent that the model does not take and that looks like a field it misses
    beside it, with those close names; (None, []) when there is none."""
    for extra in (e for e in errors if e.get("type") == "extra_forbidden"):
        parent, name = tuple(extra["loc"][:-1]), str(extra["loc"][-1])
        missing = [
            str(e["loc"][-1]) for e in errors if e.get("type") == "missing" and tuple(e["loc"][:-1]) == parent
        ]
        near = close_matches(name, missing)
        if near:
            return extra, near
    return None, []


def validation_info(exc: ValidationError, prefix: str = "") -> ErrorInfo:
    """A pydantic error as a 400 naming the first offending field (``messages[0].content``)."""
    errors = exc.errors(include_url=False, include_input=False)
    # A field the model does not take that looks like one it misses goes first, saying so (`text`
    # sent to embed said "texts: Field required" and never named `text`).
    typo, near = _misspelt(errors)
    if typo is not None:
        errors = [typo, *(e for e in errors if e is not typo)]
    loc, msg, covered = _first_error(errors) if errors else ((), str(exc), 0)
    if typo is not None:
        msg += f"; did you mean {', '.join(near)}?"
    where = _loc((*((prefix,) if prefix else ()), *loc))
    message = f"{where}: {msg}" if where else msg
    if len(errors) > covered:
        message += f" (and {len(errors) - covered} more error(s))"
    details = [{"param": _loc(tuple(e["loc"])) or None, "message": _msg(e)} for e in errors]
    return ErrorInfo(
        400, "invalid_request_error", "invalid_value", message, where or None, "ValidationError",
        extra={"details": details},
    )  # fmt: skip


_FIELD_PATH = re.compile(r"([a-z_]+)((?:\[\d+\])*(?:\.[a-z_]+(?:\[\d+\])*)*) ")


def _named_field(cls: type[BaseModel], message: str) -> str | None:
    """The field a model-level check's ``message`` starts with (``tool_choice 'x' is neither...``,
    ``tools[0] names no function``), when it is one of ``cls``'s fields or of a model it holds
    (``params``: those the client sent at the top level); None otherwise."""
    match = _FIELD_PATH.match(message)
    if match is None:
        return None
    head = match.group(1)
    fields = cls.model_fields
    if head in fields:
        return head + match.group(2)
    for name, info in fields.items():
        inner = info.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel) and head in inner.model_fields:
            return f"{name}.{head}{match.group(2)}"
    return None


def validated(cls: type[_M], data: dict[str, Any], names: Mapping[str, str]) -> _M:
    """``cls.model_validate(data)``, its error naming the field as the client sent it (``names``:
    ours to theirs, ``voice_instruction`` to ``instructions``; to "" for a level of ours the
    client never sent, such as ``params``) rather than as the engine calls it."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        info = validation_info(exc)
        # A check across fields has no location; its message starts with the field's path.
        named = _named_field(cls, info.message) if info.param is None else None
        head, _, rest = (named or info.param or "").partition(".")
        theirs = names.get(head)
        if theirs is None and named is None:
            raise
        if theirs is None:
            raise ApiError(400, info.message, code="invalid_value", param=named) from None
        param = f"{theirs}.{rest}" if theirs and rest else theirs or rest
        message = info.message if named else f"{param}: {info.message.split(': ', 1)[-1]}"
        raise ApiError(400, message, code="invalid_value", param=param) from None


def busy(message: str, code: str = "server_busy") -> ApiError:
    """A 429 that says to retry after a second (a bound on requests in flight is reached)."""
    return ApiError(429, message, type="rate_limit_error", code=code, retry_after=1)


# Provider statuses that mean "this request is malformed" rather than "this provider failed".
_INPUT_REFUSED = frozenset({400, 413, 422})


# Where the state stores' drivers raise from: an error of theirs that reaches a route.
_DATABASE_MODULES = frozenset({"sqlite3", "psycopg", "psycopg_pool"})


def _upstream_busy(message: str, name: str, retry_after: float | None, extra: dict[str, Any]) -> ErrorInfo:
    return ErrorInfo(
        429, "rate_limit_error", "upstream_rate_limited", message, None, name, True, retry_after, extra
    )


def _is_timeout(exc: ProviderError) -> bool:
    return exc.status in (408, 504) or exc.timeout


RetryHint = Callable[[BaseException], "float | None"]


# Exceptions described by their class alone, in order (a subclass before its base): (class, status,
# type, code, param). ``_LAST`` is tried after the provider errors, whose classes they include.
_TABLE: tuple[tuple[type[BaseException], int, str, str, str | None], ...] = (
    (TraceNotFound, 404, "invalid_request_error", "trace_not_found", "trace_id"),
    (ModelUnavailable, 503, "server_error", "model_unavailable", "model"),
    (UnsupportedMode, 400, "invalid_request_error", "unsupported_mode", None),
    (InvalidInput, 400, "invalid_request_error", "invalid_input", None),
    (TokenizationError, 400, "invalid_request_error", "tokenization_error", None),
    (SpendLimitExceeded, 402, "insufficient_quota", "spend_limit_exceeded", None),
    (DeviceError, 503, "server_error", "device_unavailable", None),
)
_LAST: tuple[tuple[type[BaseException], int, str, str, str | None], ...] = (
    (DownloadFailed, 502, "upstream_error", "download_failed", None),
    (ConfigError, 500, "server_error", "configuration_error", None),
    (InferenceError, 500, "server_error", "inference_failed", None),
)


def _simple(
    exc: BaseException,
    name: str,
    table: tuple[tuple[type[BaseException], int, str, str, str | None], ...] = _TABLE,
) -> ErrorInfo | None:
    for cls, status, kind, code, param in table:
        if isinstance(exc, cls):
            return ErrorInfo(status, kind, code, str(exc), getattr(exc, "param", None) or param, name)
    return None


def _upstream(exc: BaseException, name: str) -> ErrorInfo | None:
    """A provider's failure (or every candidate's) as the client sees it; None for anything else."""
    if isinstance(exc, ProviderError) and exc.status in _INPUT_REFUSED:
        # The provider refused what the client sent (a bad tool schema, ...): the client's to fix.
        return ErrorInfo(
            400, "invalid_request_error", "provider_rejected_input", str(exc), None, name,
            extra={"upstream_status": exc.status},
        )  # fmt: skip
    if isinstance(exc, ProviderError) and exc.status == 429:
        # The provider's rate limit (every key of it resting): a 429 the client's SDK retries after
        # the provider's Retry-After, told apart from our own bounds by its code.
        return _upstream_busy(str(exc), name, exc.retry_after, {"upstream_status": 429})
    if isinstance(exc, ProviderError):
        timeout = _is_timeout(exc)
        return ErrorInfo(
            504 if timeout else 502, "upstream_error", "upstream_timeout" if timeout else "provider_error",
            str(exc), None, name, exc.retryable, exc.retry_after, {"upstream_status": exc.status},
        )  # fmt: skip
    if isinstance(exc, AllModelsFailed):
        attempts = [{"model": m, "error": type(e).__name__, "message": str(e)} for m, e in exc.attempts]
        limited = [e for _, e in exc.attempts if isinstance(e, ProviderError) and e.status == 429]
        if limited and len(limited) == len(exc.attempts):
            waits = [e.retry_after for e in limited if e.retry_after is not None]
            return _upstream_busy(str(exc), name, min(waits, default=None), {"attempts": attempts})
        retryable = any(getattr(e, "retryable", False) for _, e in exc.attempts)
        return ErrorInfo(
            502, "upstream_error", "all_models_failed", str(exc), None, name, retryable,
            extra={"attempts": attempts},
        )  # fmt: skip
    return None


def describe(
    exc: BaseException,
    *,
    capability: str | None = None,
    timeout_s: float = 0,
    retry_hint: RetryHint | None = None,
) -> ErrorInfo:
    """The client-facing description of ``exc``. ``capability`` marks the speech/image endpoints,
    where no model to run it is a 501 naming it; ``retry_hint`` says when an open circuit closes
    (its ``Retry-After``)."""
    name = type(exc).__name__
    if isinstance(exc, ApiError):
        return ErrorInfo(
            exc.status, exc.type, exc.code, exc.message, exc.param, name, exc.retryable, exc.retry_after
        )
    if isinstance(exc, ValidationError):
        return validation_info(exc)
    # No model for a capability is the server's lack (501); a model named for a task it does not
    # declare (UnsupportedMode) is the client's mistake, a 400 below, as on every other route. A
    # model that cannot run here (not pulled, no key) is the 503 naming it, as on every route: it
    # was a 501 saying the capability was missing while other models of it answered.
    if capability is not None and isinstance(exc, ModelUnavailable) and exc.no_model_for_capability:
        reason = exc.reason
        return ErrorInfo(
            501, "not_implemented_error", "capability_unavailable",
            f"{capability} is not available on this server: {reason}", None, name,
            extra={"capability": capability},
        )  # fmt: skip
    if isinstance(exc, ModelNotFound):
        message = f"The model `{exc.name}` does not exist."
        if exc.suggestions:
            message += f" Did you mean: {', '.join(exc.suggestions)}?"
        if exc.why:  # an endpoint that did not say what it serves: the log was the only place
            message += f" ({exc.why})"
        return ErrorInfo(
            404, "invalid_request_error", "model_not_found", message, "model", name,
            extra={"suggestions": exc.suggestions},
        )  # fmt: skip
    # Before the table: ProviderRejectedInput is an InvalidInput too, and its code says whose it is.
    upstream = _upstream(exc, name)
    if upstream is not None:
        return upstream
    simple = _simple(exc, name)
    if simple is not None:
        return simple
    if isinstance(exc, StateUnavailable):
        retry = exc.retry_after
        return ErrorInfo(503, "server_error", "state_unavailable", str(exc), None, name, True, retry)
    if isinstance(exc, CircuitOpen):
        retry = getattr(exc, "retry_after", None)
        if retry is None and retry_hint is not None:
            retry = retry_hint(exc)
        return ErrorInfo(503, "server_error", "circuit_open", str(exc), None, name, True, retry)
    simple = _simple(exc, name, _LAST)
    if simple is not None:
        return simple
    if type(exc).__module__.split(".")[0] in _DATABASE_MODULES:
        # The state database refused a statement (a table dropped by hand, say): the server's
        # set-up, not the request, and /v1/health's `state` names what is missing.
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        log.warning("the state store refused a request's statement: %s", reason)
        return ErrorInfo(
            503, "server_error", "state_store_error",
            f"the state store refused a statement ({reason}); /v1/health's `state` says more",
            None, name,
        )  # fmt: skip
    if isinstance(exc, TimeoutError):
        message = "the request did not finish in time"
        if timeout_s:
            message += f" ({timeout_s:g} s, server.request_timeout_s)"
        return ErrorInfo(504, "timeout_error", "request_timeout", message, None, name, retryable=True)
    log.error("unexpected error while serving a request", exc_info=exc)
    return ErrorInfo(500, "server_error", "internal_error", GENERIC_500, None, "InternalError")


def error_body(info: ErrorInfo) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code", ...}}``, OpenAI's shape plus our extras."""
    return {
        "error": {"message": info.message, "type": info.type, "param": info.param, "code": info.code}
        | info.extra
    }


# 5xx answers a retry cannot change until someone changes the server (a model not pulled, no key,
# a bad config file, a state table dropped by hand). OpenAI's SDKs retry every 5xx twice unless
# told not to: ``x-should-retry: false``, which they honour.
PERMANENT = frozenset(
    {"model_unavailable", "capability_unavailable", "configuration_error", "state_store_error"}
)


def error_headers(info: ErrorInfo) -> dict[str, str]:
    """When to come back (``retry-after``), or that a retry cannot help (``x-should-retry:
    false``, which OpenAI's SDKs honour): for every error response, streamed requests' too."""
    if info.retry_after is not None:
        return {"retry-after": str(max(1, round(info.retry_after)))}
    return {"x-should-retry": "false"} if info.code in PERMANENT else {}


def error_response(info: ErrorInfo) -> Response:
    body = json.dumps(error_body(info), ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, info.status, error_headers(info), media_type="application/json")


def guarded(
    capability: str | None = None, *, timeout_s: float = 0, retry_hint: RetryHint | None = None
) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]:
    """Wrap a route so that every exception becomes an error response (never a traceback)."""

    def wrap(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            try:
                return await _unless_gone(request, fn)
            except Exception as exc:
                info = describe(exc, capability=capability, timeout_s=timeout_s, retry_hint=retry_hint)
                if isinstance(exc, InferenceError):
                    _count(request, exc, capability)
                return error_response(info)

        return endpoint

    return wrap


def _count(request: Request, exc: InferenceError, capability: str | None) -> None:
    """``exc`` in ``car_errors_total`` (``metrics.failure``), on every route of the app."""
    app = request.scope.get("app")
    server = getattr(getattr(app, "state", None), "car", None)  # ServerState, set by app.py
    if server is not None:
        server.metrics.failure(exc, capability)


async def _unless_gone(request: Request, fn: Callable[[Request], Awaitable[Response]]) -> Response:
    """``fn(request)``, cancelled when the client disconnects first: an answer nobody will read
    must not hold a model (a generation stops at its next token once its task is cancelled; a
    streaming route returns its response at once and watches the client itself)."""
    await request.body()  # read and kept first: after it, receive() only says "disconnected"
    work = asyncio.ensure_future(fn(request))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left (or the server stops): end the work, then go
            work.cancel()
            await asyncio.wait((work,))
    if work.cancelled():  # nobody reads this
        return Response(status_code=499)
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- JSON-RPC -------------------------------------------------------------------------------------

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Application errors: -32000 .. -32099 ("server error" range of JSON-RPC 2.0).
RPC_CODES: dict[str | None, int] = {
    "inference_failed": -32000,
    "model_not_found": -32001,
    "model_unavailable": -32002,
    "unsupported_mode": -32003,
    "spend_limit_exceeded": -32004,
    "provider_error": -32005,
    "provider_rejected_input": INVALID_PARAMS,
    "upstream_timeout": -32005,
    "upstream_rate_limited": -32005,
    "all_models_failed": -32006,
    "request_timeout": -32007,
    "server_busy": -32008,
    "client_busy": -32008,
    "server_shutdown": -32016,
    "state_store_behind": -32017,
    "state_unavailable": -32017,
    "state_store_error": -32017,
    "trace_not_found": -32009,
    "capability_unavailable": -32010,
    "circuit_open": -32011,
    "device_unavailable": -32011,
    "tokenization_error": -32012,
    "invalid_input": INVALID_PARAMS,
    "download_failed": -32013,
    "configuration_error": -32014,
    "stream_failed": -32015,
    "internal_error": INTERNAL_ERROR,
    "invalid_value": INVALID_PARAMS,
}


def rpc_error(info: ErrorInfo) -> dict[str, Any]:
    """A JSON-RPC error object; ``data`` carries our error class, HTTP-equivalent status,
    retryability and the extras (suggestions, attempts, field details)."""
    code = RPC_CODES.get(info.code)
    if code is None:
        code = INVALID_PARAMS if info.status in (400, 413, 422) else -32000
    data: dict[str, Any] = {
        "error": info.error_class,
        "code": info.code,
        "status": info.status,
        "retryable": info.retryable,
    }
    if info.param:
        data["param"] = info.param
    if info.retry_after is not None:
        data["retry_after"] = info.retry_after
    data.update(info.extra)
    return {"code": code, "message": info.message, "data": data}
