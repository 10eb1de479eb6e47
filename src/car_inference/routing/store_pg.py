"""PgOutcomeStore: the outcome store in PostgreSQL, shared by several ``car serve`` replicas.

The same tables, methods and results as the SQLite ``OutcomeStore`` (``store.py``, whose docstring
describes the data); only where the rows live differs. Chosen by ``[state] url =
"postgresql://..."`` (``store_api.open_store``).

How replicas share it without losing updates:

- every counter changes by SQL arithmetic in an upsert (``calls = t.calls + 1``), never by writing
  back a value read earlier, and one outcome is one transaction (or one savepoint of a ``batch()``);
- transactions that change counters (finishing or recording a trace, feedback, an import) first
  take one transaction-scoped advisory lock, ``WRITE_LOCK``: writers of counters take turns, as
  SQLite's ``BEGIN IMMEDIATE`` makes them. Without it two replicas' batches, each touching several
  models' rows in its own order, could deadlock; with it, a trace's residual (computed from the
  rows as they were before it) and "a trace is counted once" hold across replicas too. Readers
  never wait for it, and traces and spend are written without it;
- the schema is versioned in a ``schema_version`` table with the SQLite store's numbers and
  migrations applied in order, under a second advisory lock so that replicas starting together
  migrate once.

Connections come from a ``psycopg_pool`` pool; a ``batch()`` holds one for the calling thread,
and the store's other calls on that thread run in it (as savepoints), so they see its writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..config import redact_url
from ..errors import ConfigError
from .estimate import residual
from .store import (
    ALL,
    EMA_ALPHA,
    QUALITY_DECAY,
    SCHEMA_VERSION,
    QualityChange,
    TraceRow,
    baseline_rows,
    stat_keys,
    trace_quality,
)
from .store_pg_sql import (
    ADJUST_PROFILE,
    ADJUST_TASK,
    COPY_COLUMNS,
    MIGRATIONS,
    PROFILE_REPLACE,
    PROFILE_UPSERT,
    SCHEMA,
    TASK_REPLACE,
    TASK_UPSERT,
    insert_missing,
)

try:
    import psycopg
    from psycopg.rows import DictRow, dict_row
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - the extra is part of the test install
    raise ImportError(
        "a postgresql:// state url needs psycopg: pip install 'car-inference[postgres]'"
    ) from exc

__all__ = ["MIGRATE_LOCK", "WRITE_LOCK", "PgOutcomeStore"]

# Advisory lock keys (per database): "car-stat" and "car-migr" as 64-bit integers.
WRITE_LOCK = int.from_bytes(b"car-stat", "big") >> 1
MIGRATE_LOCK = int.from_bytes(b"car-migr", "big") >> 1

Conn = psycopg.Connection[DictRow]


class PgOutcomeStore:
    """PostgreSQL-backed outcome storage. Open one per process; it is thread-safe."""

    backend = "postgresql"

    def __init__(self, url: str, *, max_connections: int = 4, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.location = redact_url(url)
        self._local = threading.local()
        _probe(url, connect_timeout_s)  # a clear error now beats a pool that retries in the background
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"row_factory": dict_row, "autocommit": True},
            check=ConnectionPool.check_connection,  # a connection the server dropped is replaced
            open=False,
            timeout=connect_timeout_s,  # waiting for a connection: bounded like connecting
            name="car-state",
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    # --- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _conn(self) -> Iterator[Conn]:
        """The calling thread's batch connection, or one from the pool."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _tx(self, *, counters: bool = False) -> Iterator[Conn]:
        """One write transaction; inside ``batch()`` a savepoint of the batch's transaction, undone
        alone on error. ``counters``: it changes profiles/task_stats, so it takes ``WRITE_LOCK``
        (a batch took it when it began)."""
        batch: Conn | None = getattr(self._local, "conn", None)
        if batch is not None:
            with batch.transaction():
                yield batch
            return
        with self._pool.connection() as conn, conn.transaction():
            if counters:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield conn

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside (on this thread) into one transaction and one commit. Each
        write stays atomic on its own (a savepoint); the batch commits what succeeded. Nested
        batches join the outer one. The write lock is taken up front: a lock taken inside a
        savepoint that rolls back would be let go while the batch still holds row locks."""
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = int(row["version"]) if row else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"written by a newer car-inference (schema {version} > {SCHEMA_VERSION})",
                    path=self.location,
                )
            if version == 0:  # a new database: the latest schema at once
                conn.execute(SCHEMA)
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    conn.execute(MIGRATIONS[step])
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
            else:
                conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        with self._conn() as conn:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row["version"]) if row else 0

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PgOutcomeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- traces --------------------------------------------------------------------------------

    def start_trace(self, row: TraceRow, *, retry_window_s: float | None = None) -> str | None:
        """Insert a pending trace; with ``retry_window_s``, the earlier trace it quickly retried."""
        with self._tx() as conn:
            previous = _quick_retry_of(conn, row, retry_window_s)
            conn.execute(
                "INSERT INTO traces (trace_id, model_id, task, family, cluster, reason, prompt_hash,"
                " started_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (row.trace_id, row.model_id, row.task, row.family, row.cluster, row.reason,
                 row.prompt_hash, row.started_at),
            )  # fmt: skip
            return previous

    def finish_trace(
        self,
        trace_id: str,
        *,
        success: bool,
        latency_ms: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        ttft_ms: float | None = None,
        error_class: str | None = None,
        error: str | None = None,
        now: float | None = None,
        prior_strength: float = 10.0,
    ) -> tuple[TraceRow, float, float] | None:
        """Complete a pending trace and count it: (trace, quality, residual), or None when the
        trace is unknown or already completed (a trace is counted once)."""
        now = time.time() if now is None else now
        base = 1.0 if success else 0.0
        with self._tx(counters=True) as conn:
            row = conn.execute("SELECT * FROM traces WHERE trace_id = %s", (trace_id,)).fetchone()
            if row is None or row["outcome"] != "pending":
                return None
            quality = trace_quality(base, row["penalty"], row["feedback"])
            conn.execute(
                "UPDATE traces SET outcome = %s, completed_at = %s, latency_ms = %s, ttft_ms = %s,"
                " input_tokens = %s, output_tokens = %s, error_class = %s, error = %s, base = %s,"
                " quality = %s WHERE trace_id = %s",
                ("success" if success else "failure", now, latency_ms, ttft_ms, input_tokens, output_tokens,
                 error_class, error, base, quality, trace_id),
            )  # fmt: skip
            trace = _trace_row(row)
            q = quality if quality is not None else base
            resid = _count(
                conn, trace, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
                output_tokens=output_tokens, quality=q, now=now, prior_strength=prior_strength,
            )  # fmt: skip
            return trace, float(q), resid

    def record_trace(
        self,
        row: TraceRow,
        *,
        success: bool | None,
        latency_ms: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        ttft_ms: float | None = None,
        error_class: str | None = None,
        error: str | None = None,
        now: float | None = None,
        prior_strength: float = 10.0,
        retry_window_s: float | None = None,
        score: float | None = None,
    ) -> tuple[str | None, float, float]:
        """A whole attempt in one transaction (see ``OutcomeStore.record_trace``)."""
        now = time.time() if now is None else now
        base = None if success is None else (1.0 if success else 0.0)
        outcome = "abandoned" if success is None else ("success" if success else "failure")
        quality = base if score is None or base is None else score
        with self._tx(counters=success is not None) as conn:
            previous = _quick_retry_of(conn, row, retry_window_s)
            conn.execute(
                "INSERT INTO traces (trace_id, model_id, task, family, cluster, reason, prompt_hash,"
                " started_at, outcome, completed_at, latency_ms, ttft_ms, input_tokens, output_tokens,"
                " error_class, error, base, quality, feedback) VALUES (" + ", ".join(["%s"] * 19) + ")",
                (row.trace_id, row.model_id, row.task, row.family, row.cluster, row.reason, row.prompt_hash,
                 row.started_at, outcome, now, latency_ms, ttft_ms, input_tokens, output_tokens, error_class,
                 error, base, quality, score if base is not None else None),
            )  # fmt: skip
            if success is None or base is None or quality is None:
                return previous, 0.0, 0.0
            if score is not None:
                conn.execute(
                    "INSERT INTO feedback (trace_id, kind, value, created_at)"
                    " VALUES (%s, 'explicit', %s, %s)",
                    (row.trace_id, score, now),
                )
            resid = _count(
                conn, row, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
                output_tokens=output_tokens, quality=quality, now=now, prior_strength=prior_strength,
            )  # fmt: skip
            return previous, quality, resid

    def adjust_quality(
        self, trace_id: str, kind: str, value: float, *, explicit: bool, now: float | None = None
    ) -> QualityChange | None:
        """Record feedback or an implicit signal; the change to a completed trace's quality."""
        now = time.time() if now is None else now
        with self._tx(counters=True) as conn:
            row = conn.execute("SELECT * FROM traces WHERE trace_id = %s", (trace_id,)).fetchone()
            if row is None:
                return None
            conn.execute(
                "INSERT INTO feedback (trace_id, kind, value, created_at) VALUES (%s, %s, %s, %s)",
                (trace_id, kind, value, now),
            )
            penalty, feedback = row["penalty"], row["feedback"]
            if explicit:
                feedback = value
            else:
                penalty += value
            old = row["quality"]
            new = trace_quality(row["base"], penalty, feedback)
            conn.execute(
                "UPDATE traces SET penalty = %s, feedback = %s, quality = %s WHERE trace_id = %s",
                (penalty, feedback, new, trace_id),
            )
            if old is None or new is None or new == old:
                return None
            delta = new - old
            conn.execute(ADJUST_PROFILE, {"d": delta, "a": EMA_ALPHA, "now": now, "m": row["model_id"]})
            keys = stat_keys(row["family"], row["cluster"])
            rows = [(row["model_id"], key, delta) for key in keys]
            rows += [(model_id, key, 0.0) for model_id, key in baseline_rows(row["family"], row["cluster"])]
            with conn.cursor() as cur:
                cur.executemany(
                    ADJUST_TASK,
                    [
                        {"d": delta, "rd": rd, "a": EMA_ALPHA, "now": now, "m": model_id, "k": key}
                        for model_id, key, rd in rows
                    ],
                )
            return QualityChange(trace_id, row["model_id"], keys, float(old), float(new))

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        with self._conn() as conn:
            return conn.execute("SELECT * FROM traces WHERE trace_id = %s", (trace_id,)).fetchone()

    def feedback_for(self, trace_id: str) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return conn.execute(
                "SELECT kind, value, created_at FROM feedback WHERE trace_id = %s ORDER BY id", (trace_id,)
            ).fetchall()

    def prune_traces(self, older_than: float) -> int:
        """Delete traces (and their feedback) started before ``older_than``; counters stay."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM feedback WHERE trace_id IN (SELECT trace_id FROM traces WHERE started_at < %s)",
                (older_than,),
            )
            return conn.execute("DELETE FROM traces WHERE started_at < %s", (older_than,)).rowcount

    # --- profiles ------------------------------------------------------------------------------

    def profiles(self) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return conn.execute("SELECT * FROM profiles ORDER BY model_id").fetchall()

    def task_stats(self) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return conn.execute("SELECT * FROM task_stats ORDER BY model_id, key").fetchall()

    def recent_latencies(self, limit_per_model: int = 256) -> dict[str, list[float]]:
        """The latest successful latencies per model, oldest first."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT model_id, latency_ms FROM ("
                " SELECT model_id, latency_ms, completed_at, ROW_NUMBER() OVER"
                " (PARTITION BY model_id ORDER BY completed_at DESC) AS rn"
                " FROM traces WHERE outcome = 'success' AND latency_ms IS NOT NULL) AS recent"
                " WHERE rn <= %s ORDER BY model_id, completed_at",
                (limit_per_model,),
            ).fetchall()
        out: dict[str, list[float]] = {}
        for r in rows:
            out.setdefault(r["model_id"], []).append(float(r["latency_ms"]))
        return out

    def replace_profiles(
        self, profiles: Iterable[dict[str, Any]], task_rows: Iterable[dict[str, Any]]
    ) -> None:
        """Write imported profiles over the stored ones (whole rows: an import is a restore)."""
        with self._tx(counters=True) as conn, conn.cursor() as cur:
            cur.executemany(PROFILE_REPLACE, list(profiles))
            cur.executemany(TASK_REPLACE, list(task_rows))

    def insert_missing(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Copy rows of other stores' tables (``car state migrate``), each unless already there,
        in one transaction; the rows written per table."""
        written: dict[str, int] = {}
        with self._tx(counters=True) as conn, conn.cursor() as cur:
            for table in COPY_COLUMNS:
                if rows.get(table):
                    cur.executemany(insert_missing(table), rows[table])
                    written[table] = max(cur.rowcount, 0)
                else:
                    written[table] = 0
        return written

    # --- spend ---------------------------------------------------------------------------------

    def add_spend(self, provider: str, model_id: str, usd: float, ts: float | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO spend (ts, provider, model_id, usd) VALUES (%s, %s, %s, %s)",
                (time.time() if ts is None else ts, provider, model_id, float(usd)),
            )

    def spend_by_provider(self, since: float, until: float | None = None) -> dict[str, float]:
        """Total USD per provider for entries with ``since <= ts < until``."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT provider, SUM(usd) AS usd FROM spend"
                " WHERE ts >= %s AND (%s::double precision IS NULL OR ts < %s) GROUP BY provider",
                (since, until, until),
            ).fetchall()
        return {r["provider"]: float(r["usd"] or 0.0) for r in rows}


def _probe(url: str, timeout_s: float) -> None:
    """Connect once: an unreachable server or a wrong database is a ``ConfigError`` that says so."""
    try:
        psycopg.connect(url, connect_timeout=max(1, round(timeout_s)), autocommit=True).close()
    except psycopg.Error as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ConfigError(
            f"PostgreSQL state store at {redact_url(url)} is not reachable: {reason}", field="state.url"
        ) from exc


def _count(
    conn: Conn,
    trace: TraceRow,
    *,
    success: bool,
    latency_ms: float | None,
    input_tokens: int,
    output_tokens: int,
    quality: float,
    now: float,
    prior_strength: float,
) -> float:
    """Count one finished attempt in ``profiles`` and ``task_stats`` (inside the caller's
    transaction, under ``WRITE_LOCK``); returns its residual, from the rows as they were before."""
    keys = stat_keys(trace.family, trace.cluster)
    found = {
        (r["model_id"], r["key"]): (r["decayed_sum"], r["decayed_n"])
        for r in conn.execute(
            "SELECT model_id, key, decayed_sum, decayed_n FROM task_stats"
            " WHERE key = ANY(%s) AND model_id = ANY(%s)",
            (list(keys), [ALL, trace.model_id]),
        )
    }
    none = (0.0, 0.0)
    levels = [(*found.get((ALL, k), none), *found.get((trace.model_id, k), none)) for k in keys]
    resid = residual(quality, prior_strength, levels)
    params: dict[str, Any] = {
        "model_id": trace.model_id,
        "ok": int(success),
        "fail": int(not success),
        "latency": float(latency_ms or 0.0),
        "in_tok": int(input_tokens),
        "out_tok": int(output_tokens),
        "q": float(quality),
        "r": resid,
        "now": now,
        "alpha": EMA_ALPHA,
        "decay": QUALITY_DECAY,
    }
    conn.execute(PROFILE_UPSERT, params)
    rows = [(trace.model_id, key, resid) for key in keys]
    rows += [(m, key, 0.0) for m, key in baseline_rows(trace.family, trace.cluster)]
    model_ids, row_keys, resids = (list(column) for column in zip(*rows, strict=True))
    conn.execute(TASK_UPSERT, {**params, "model_ids": model_ids, "keys": row_keys, "resids": resids})
    return resid


def _trace_row(row: dict[str, Any]) -> TraceRow:
    return TraceRow(
        trace_id=row["trace_id"],
        model_id=row["model_id"],
        task=row["task"],
        family=row["family"],
        cluster=row["cluster"],
        reason=row["reason"] or "",
        prompt_hash=row["prompt_hash"],
        started_at=row["started_at"],
    )


def _quick_retry_of(conn: Conn, row: TraceRow, window_s: float | None) -> str | None:
    """The latest earlier trace of the same prompt started within ``window_s`` (not a failure)."""
    if window_s is None or not row.prompt_hash:
        return None
    hit = conn.execute(
        "SELECT trace_id FROM traces WHERE prompt_hash = %s AND started_at >= %s"
        " AND outcome != 'failure' ORDER BY started_at DESC LIMIT 1",
        (row.prompt_hash, row.started_at - window_s),
    ).fetchone()
    return hit["trace_id"] if hit else None
