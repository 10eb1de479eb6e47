"""Secrets kept out of what is shown: database and Redis URLs with their passwords masked
(``redact_url``), URLs whose user part a driver would read otherwise than we do refused
(``checked_userinfo``), and keys shortened to their ends (``mask_secret``)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["checked_userinfo", "mask_secret", "redact_url"]


# Where else libpq and redis-py take a password: a query parameter (``?password=``), or a
# keyword of a libpq connection string (``host=db password=...``). Each was shown in clear.
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_SECRET_KEYWORD = re.compile(r"\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its passwords masked (in the user part, the query, or a libpq keyword
    string), fit for logs, reports and ``/v1/health``."""
    if "://" not in url:
        return _SECRET_KEYWORD.sub(r"\1***", url)
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    pairs = parts.query.split("&") if parts.query else []
    query = "&".join(
        f"{pair.split('=', 1)[0]}=***" if pair.split("=", 1)[0].lower() in _SECRET_PARAMS else pair
        for pair in pairs
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide: as given (urlunsplit drops the empty host of sqlite:///x)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def checked_userinfo(url: str, prefix: str = "") -> str:
    """``url``, unless its user or password holds what the database's driver reads otherwise than
    we do: a bare "@" (libpq split there and named the rest of the password as the host in its
    error) or a "%" not starting an escape (quoted back whole by the driver)."""
    userinfo = urlsplit(url).netloc.rpartition("@")[0] if "://" in url else ""
    bad = "@" if "@" in userinfo else "%" if re.search(r"%(?![0-9A-Fa-f]{2})", userinfo) else None
    if bad is not None:
        escape = {"@": "%40", "%": "%25"}[bad]
        where = redact_url(url)
        raise ValueError(f"{prefix}the user or password in {where} holds a bare {bad!r}: write it {escape}")
    return url


def mask_secret(secret: str) -> str:
    return secret[:3] + "…" + secret[-2:] if len(secret) > 8 else "…"
