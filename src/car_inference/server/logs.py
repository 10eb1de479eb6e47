"""Secrets out of the server's log: the server's own API keys, bearer tokens and key-like query
parameters are masked in every record of the loggers that see requests.

uvicorn's access log writes the request target with its query (``GET /ws?api_key=...``) at info
level, and the WebSocket handshake goes to ``uvicorn.error`` header by header at debug level
(``< authorization: Bearer ...``). A filter on those loggers rewrites each record's message and
string arguments in place; the arguments keep their positions, which uvicorn's access formatter
unpacks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "REQUEST_LOGGERS", "install_redaction", "redact"]

MASK = "***"
REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error", "websockets.server")

_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s,;'\"]+")
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:api[_-]?key|key|access[_-]?token|token|auth|password|secret)=)[^&\s#'\"]*"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with bearer tokens, key-like query values and each of ``secrets`` masked where it
    stands as a whole token: a key "a" turned "Started server process" into "St***rted ...", and
    which letters were masked told the reader the keys."""
    for secret in secrets:
        if secret and secret in text:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(rf"\g<1>{MASK}", text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(rf"\g<1> {MASK}", text)
    return text


class _Redactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__("car_inference.redact")
        self.secrets: set[str] = set()

    def _clean(self, value: Any) -> Any:
        return redact(value, self.secrets) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._clean(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(self._clean(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: self._clean(v) for k, v in args.items()}
        return True


_redactor = _Redactor()


def install_redaction(api_keys: Iterable[str] = ()) -> None:
    """Mask secrets (and ``api_keys``, the server's own) in the request loggers. Idempotent: one
    filter per logger, its set of keys growing with each server."""
    _redactor.secrets.update(k for k in (k.strip() for k in api_keys) if k)
    for name in REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if _redactor not in logger.filters:
            logger.addFilter(_redactor)
