"""What the routes share: the server state, JSON in and out, and the ``x-car-*`` headers."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from ..config import ServerSettings
from .errors import ApiError

if TYPE_CHECKING:
    from ..engine import InferenceEngine
    from .metrics import Metrics

__all__ = [
    "HEADER_MODEL",
    "HEADER_REASON",
    "HEADER_TRACE",
    "Limiter",
    "ServerState",
    "ascii_header",
    "car_headers",
    "dumps",
    "json_response",
    "read_json",
]

HEADER_MODEL = "x-car-model"
HEADER_TRACE = "x-car-trace-id"
HEADER_REASON = "x-car-route-reason"


class Limiter:
    """A bound on requests in flight, shared by HTTP routes and JSON-RPC calls. The server runs
    on one event loop, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


@dataclass
class ServerState:
    engine: InferenceEngine
    settings: ServerSettings
    metrics: Metrics
    limiter: Limiter

    @property
    def max_body_bytes(self) -> int:
        return int(self.settings.max_body_mb * 1024 * 1024)


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), status, headers, media_type="application/json")


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; a 400 saying what is wrong otherwise."""
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"malformed JSON in the request body: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"expected a JSON object, got a JSON {type(data).__name__}", code="invalid_json")
    return data


# Punctuation the routing reasons use, spelled in ASCII; everything else non-ASCII is dropped.
_ASCII = str.maketrans({"—": "-", "–": "-", "→": "->", "≥": ">=", "≤": "<=", "×": "x", "…": "...", "·": "."})


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
