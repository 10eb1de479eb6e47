"""Where the key pool's statistics live: table ``key_stats`` beside the router's state, in
``$CAR_HOME/state.db`` (SQLite) or, with ``[state] url = "postgresql://..."``, in the PostgreSQL
database the replicas share.

Counters are written as increments in one SQL upsert (``requests = k.requests +
excluded.requests``), never as totals read earlier, so processes and replicas writing at once lose
no count; ``last_status`` and the health fields (cooling, disabled) are overwritten only by a writer
that has news about them. The same statement serves both databases (``routing.store_sql``'s
dialects: PostgreSQL's parameters and ``GREATEST`` for SQLite's two-argument ``max``).

Errors of either driver come out as ``KeyStatsError``: the pool keeps its pending increments and
tries again at its next write. A PostgreSQL connection that broke is opened again then.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sqlite_wal
from .config import CarConfig
from .redaction import redact_url
from .routing.store_sql import dialect

log = logging.getLogger("car_inference.keys")

__all__ = [
    "KeyStatsDB",
    "KeyStatsError",
    "Pending",
    "PgKeyStats",
    "SqliteKeyStats",
    "as_count",
    "as_status",
    "as_time",
    "import_legacy",
    "key_row",
    "open_key_stats",
]


@dataclass
class Pending:
    """What a process learned about a key since its last write: increments and news."""

    requests: int = 0
    failures: int = 0
    rate_limits: int = 0
    reported: bool = False  # last_status is news
    health: bool = False  # cooling_until / disabled are news

    def counts(self) -> dict[str, int]:
        return {"requests": self.requests, "failures": self.failures, "rate_limits": self.rate_limits}

    def merge(self, earlier: Pending) -> None:
        """A write that failed: its increments and news go back with those that came since."""
        self.requests += earlier.requests
        self.failures += earlier.failures
        self.rate_limits += earlier.rate_limits
        self.reported = self.reported or earlier.reported
        self.health = self.health or earlier.health


_TABLES = (
    """CREATE TABLE IF NOT EXISTS key_stats (
        fingerprint TEXT PRIMARY KEY, env_var TEXT NOT NULL, masked TEXT NOT NULL,
        requests {int} NOT NULL DEFAULT 0, failures {int} NOT NULL DEFAULT 0,
        rate_limits {int} NOT NULL DEFAULT 0, last_used {real}, last_status {int},
        cooling_until {real}, disabled {int} NOT NULL DEFAULT 0)""",
    "CREATE TABLE IF NOT EXISTS key_stats_imports (path TEXT PRIMARY KEY, imported_at {real} NOT NULL)",
)
_WORDS = {
    "sqlite": {"int": "INTEGER", "real": "REAL", "greatest": "max"},
    "postgresql": {"int": "BIGINT", "real": "DOUBLE PRECISION", "greatest": "GREATEST"},
}

# Counters add this writer's increments to what the others wrote.
_UPSERT = """
INSERT INTO key_stats AS k (fingerprint, env_var, masked, requests, failures, rate_limits, last_used,
                            last_status, cooling_until, disabled)
VALUES (:fp, :env_var, :masked, :requests, :failures, :rate_limits, :last_used, :last_status,
        :cooling_until, :disabled)
ON CONFLICT (fingerprint) DO UPDATE SET
    env_var = excluded.env_var,
    masked = excluded.masked,
    requests = k.requests + excluded.requests,
    failures = k.failures + excluded.failures,
    rate_limits = k.rate_limits + excluded.rate_limits,
    last_used = {greatest}(coalesce(k.last_used, excluded.last_used),
                           coalesce(excluded.last_used, k.last_used)),
    last_status = CASE WHEN :reported THEN excluded.last_status ELSE k.last_status END,
    cooling_until = CASE WHEN :health THEN excluded.cooling_until ELSE k.cooling_until END,
    disabled = CASE WHEN :health THEN excluded.disabled ELSE k.disabled END
"""
_SELECT = (
    "SELECT fingerprint, env_var, masked, requests, failures, rate_limits, last_used, last_status,"
    " cooling_until, disabled FROM key_stats"
)
_IMPORTED = "INSERT INTO key_stats_imports (path, imported_at) VALUES (?, ?) ON CONFLICT (path) DO NOTHING"
# Replicas creating the tables together take turns (the state store's migration lock).
_CREATE_LOCK = int.from_bytes(b"car-migr", "big") >> 1


class KeyStatsError(Exception):
    """The statistics could not be read or written (the database's own error as the message)."""


class KeyStatsDB:
    """One database's ``key_stats``: read all rows, add increments, import a file's rows once."""

    backend = "sqlite"

    def __init__(self, location: str) -> None:
        self.location = location
        self.sql = dialect(self.backend)
        words = _WORDS[self.backend]
        self._upsert = self.sql.q(_UPSERT.format(**words))
        self._tables = tuple(self.sql.q(t.format(**words)) for t in _TABLES)
        self._lock = threading.Lock()

    def _transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _many(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def _call(self, fn: Any) -> Any:
        try:
            with self._lock, self._transaction() as conn:
                return fn(conn)
        except self._errors() as exc:
            raise KeyStatsError(f"{self.location}: {exc}") from exc

    def read(self) -> list[tuple[Any, ...]]:
        """Every key's row: (fingerprint, env_var, masked, requests, failures, rate_limits,
        last_used, last_status, cooling_until, disabled)."""
        return list(self._call(lambda conn: [tuple(r) for r in conn.execute(_SELECT).fetchall()]))

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Add each row's increments (``_UPSERT``'s parameters), in one transaction."""
        rows = [{**r, "disabled": int(bool(r["disabled"]))} for r in rows]
        self._call(lambda conn: self._many(conn, self._upsert, rows))

    def import_once(self, path: str, rows: list[dict[str, Any]]) -> bool:
        """Add ``rows`` unless ``path`` was imported already (recorded in the same transaction,
        so two processes starting together do not both add them); whether they were added."""

        def run(conn: Any) -> bool:
            done = conn.execute(self.sql.q(_IMPORTED), (path, time.time()))
            if not done.rowcount:
                return False
            self._many(conn, self._upsert, [{**r, "disabled": int(bool(r["disabled"]))} for r in rows])
            return True

        return bool(self._call(run))

    def close(self) -> None:
        raise NotImplementedError


class SqliteKeyStats(KeyStatsDB):
    backend = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 10.0) -> None:
        super().__init__(str(path))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite_wal.connect(path, busy_timeout_s=busy_timeout_s)
            with sqlite_wal.immediate(self._conn):  # the write lock first, waiting for it
                for statement in self._tables:
                    self._conn.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise KeyStatsError(f"{path}: {exc}") from exc

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_wal.immediate(self._conn)

    def _many(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> None:
        conn.executemany(sql, rows)

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PgKeyStats(KeyStatsDB):
    backend = "postgresql"

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        super().__init__(redact_url(url))
        try:
            import psycopg
        except ImportError as exc:
            raise KeyStatsError(
                "a postgresql:// state url needs psycopg: pip install 'car-inference[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._call(lambda conn: None)  # connect now and create the tables: a bad URL says so at once

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            from .routing.store_pg import LIBPQ_TIMEOUTS  # psycopg is there: imported above

            # A partitioned database ends the call in seconds, as for the store's connections.
            options: dict[str, Any] = {
                "connect_timeout": max(1, round(self.connect_timeout_s)),
                **LIBPQ_TIMEOUTS,
            }
            conn = self._psycopg.connect(self.url, autocommit=True, **options)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
                for statement in self._tables:
                    conn.execute(statement)
            self._conn = conn
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        conn = self._connect()
        with conn.transaction():
            yield conn

    def _many(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            with conn.cursor() as cur:
                cur.executemany(sql, rows)

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def open_key_stats(config: CarConfig) -> KeyStatsDB:
    """The statistics' database for ``config``: its ``[state] url`` when that is PostgreSQL, else
    ``state.db``. Raises ``KeyStatsError`` when it cannot be opened."""
    url = config.state.url
    if url is not None:
        from .routing.store_api import is_postgres_url

        if is_postgres_url(url):
            return PgKeyStats(url)
    return SqliteKeyStats(config.paths.state_db)


def key_row(fp: str, raw: dict[str, Any], *, reported: bool, health: bool) -> dict[str, Any]:
    """A row to store: every value checked (a legacy file's ``"cooling_until": "soon"`` was
    stored as it was, and every hosted call then failed with a TypeError until a reset)."""
    return {
        "fp": fp,
        "env_var": str(raw["env_var"]),
        "masked": str(raw.get("masked") or "…"),
        "requests": as_count(raw.get("requests")),
        "failures": as_count(raw.get("failures")),
        "rate_limits": as_count(raw.get("rate_limits")),
        "last_used": as_time(raw.get("last_used")),
        "last_status": as_status(raw.get("last_status")),
        "cooling_until": as_time(raw.get("cooling_until")),
        "disabled": raw.get("disabled") is True or raw.get("disabled") == 1,
        "reported": reported,
        "health": health,
    }


def as_count(value: Any) -> int:
    """A count as stored, or 0 for anything else (text, a float past any count, a negative)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**62:
        return 0
    return int(value)


def as_time(value: Any) -> float | None:
    """Epoch seconds as stored, or None (unknown) for anything that is no time of this era."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e11:
        return None
    return float(value)


def as_status(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value < 600:
        return None
    return value


def import_legacy(db: KeyStatsDB, path: Path) -> None:
    """Add the counts of an earlier version's JSON statistics file, once (the import is recorded
    in the same transaction, so two processes starting together do not both add them)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        log.warning("ignoring unreadable key statistics in %s", path)
        return
    entries = data.get("keys", {}) if isinstance(data, dict) else {}
    try:
        rows = [
            key_row(fp, raw, reported=True, health=True)
            for fp, raw in (entries.items() if isinstance(entries, dict) else ())
            if isinstance(raw, dict) and isinstance(raw.get("env_var"), str)
        ]
        db.import_once(str(path.resolve()), rows)
    except (KeyStatsError, TypeError, ValueError) as exc:
        log.warning("could not import key statistics from %s: %s", path, exc)
