"""What both outcome stores do, written once: traces, counting, feedback, reads and spend, over
the SQL of ``store_sql`` in the store's dialect. The stores themselves (``store.OutcomeStore`` on
SQLite, ``store_pg.PgOutcomeStore`` on PostgreSQL) only say how to reach their database: a read
connection, a write transaction (``counters``: it changes profiles/task_stats), ``batch()``, where
the schema version is kept, and how several rows are written in one call.

A trace's quality = its explicit feedback when given, else max(0, base - penalty), base being 1 for a
success and 0 for a failure. When feedback or a signal changes a completed trace's quality, the
difference is added to its rows' quality sums in the same transaction.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .context import template_key
from .estimate import ALL, EMA_ALPHA, QUALITY_DECAY
from .store_sql import COPY_COLUMNS, SCHEMA_VERSION, Dialect

# psycopg's errors for a missing table or column (SQLite's read "no such table/column: ...").
_MISSING = frozenset({"UndefinedTable", "UndefinedColumn"})
_SQLITE_MISSING = ("no such table", "no such column")
# The tables ``schema_problem`` looks at (``key_stats`` is the key pool's file, not this store's).
_CHECKED = ("profiles", "task_stats", "traces", "feedback", "spend")

__all__ = [
    "ALL",
    "DAY_ENTRIES",
    "DAY_S",
    "EMA_ALPHA",
    "QUALITY_DECAY",
    "SCHEMA_VERSION",
    "QualityChange",
    "StoreBase",
    "TraceRow",
    "baseline_rows",
    "dict_rows",
    "is_templated",
    "stat_keys",
    "trace_quality",
]

_INSERT_TRACE = (
    "INSERT INTO traces (trace_id, model_id, task, family, cluster, reason, prompt_hash, started_at,"
    " outcome, completed_at, latency_ms, ttft_ms, input_tokens, output_tokens, error_class, error, base,"
    " quality, feedback) VALUES (" + ", ".join("?" * 19) + ")"
)

_SPEND_INSERT = "INSERT INTO spend (ts, provider, model_id, usd) VALUES (?, ?, ?, ?)"
# A day's roll-up entry for a provider and model takes more (the first, should two exist).
_ADD_TO_DAY = (
    "UPDATE spend SET usd = usd + ? WHERE id ="
    " (SELECT MIN(id) FROM spend WHERE ts = ? AND provider = ? AND model_id = ?)"
)
_RECENT_LATENCIES = (
    "SELECT latency_ms FROM traces WHERE model_id = ? AND outcome = 'success' AND latency_ms IS NOT NULL"
    " ORDER BY completed_at DESC LIMIT ?"
)
DAY_S = 86_400  # a UTC day in Unix time (which has no leap seconds)
# Spend entries that are not a day's roll-up (at midnight UTC, ``compact_spend``): the product is
# a multiple of a day whether the cast truncates (SQLite) or rounds (PostgreSQL).
_LOOSE_SPEND = "ts <> CAST(ts / 86400 AS BIGINT) * 86400"
_NO_LIMIT = 2**62
# Up to a limit of a day's entries between its midnight and an end, oldest first.
DAY_ENTRIES = "SELECT id FROM spend WHERE ts > ? AND ts < ? ORDER BY ts, id LIMIT ?"


@dataclass(slots=True, frozen=True)
class TraceRow:
    trace_id: str
    model_id: str
    task: str
    family: str
    cluster: str | None
    reason: str
    prompt_hash: str | None
    started_at: float


@dataclass(slots=True, frozen=True)
class QualityChange:
    """What an adjustment did to a completed trace: the rows its ``delta`` was added to."""

    trace_id: str
    model_id: str
    keys: tuple[str, ...]
    old: float
    new: float

    @property
    def delta(self) -> float:
        return self.new - self.old


def stat_keys(family: str, cluster: str | None) -> tuple[str, ...]:
    """The task_stats keys one trace counts under, widest first: its family, and family|cluster
    when known. A request with a template signature (``cluster`` = ``coarse/template``) counts
    under ``template|<signature>`` alone: a template is one task, whatever the family rules make of
    each of its questions (splitting it by family halves its data), and its outcomes must not skew
    what a family or cluster says about the requests around it."""
    if not cluster:
        return (family,)
    _coarse, sep, template = cluster.partition("/")
    return (template_key(template),) if sep else (family, f"{family}|{cluster}")


def is_templated(cluster: str | None) -> bool:
    """Whether a request's cluster carries a template signature (``coarse/<signature>``)."""
    return cluster is not None and "/" in cluster


def baseline_rows(family: str, cluster: str | None) -> tuple[tuple[str, str], ...]:
    """The (model ``*``, key) baseline rows one observation also counts under."""
    return tuple((ALL, key) for key in stat_keys(family, cluster))


def trace_quality(base: float | None, penalty: float, feedback: float | None) -> float | None:
    if feedback is not None:
        return feedback
    if base is None:
        return None
    return max(0.0, base - penalty)


class StoreBase:
    """The stores' shared logic. Subclasses set ``backend``, ``sql`` and ``location`` and provide
    the plumbing methods below; rows are read as dicts."""

    backend: str
    sql: Dialect
    location: str

    # --- plumbing (each store's own) -----------------------------------------------------------

    def _tx(self, *, counters: bool = False, defer: bool = False) -> AbstractContextManager[Any]:
        """One write transaction (a savepoint inside ``batch()``), yielding the connection.
        ``counters``: it changes profiles/task_stats; ``defer``: it changes them only through
        ``_counter`` and reads none of them, so a store may hold those changes back to the end of
        a batch."""
        raise NotImplementedError

    def _counter(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> None:
        """Run a counter statement (already in the dialect) once per row, now."""
        self._many(conn, sql, rows)

    def _read(self) -> AbstractContextManager[Any]:
        """A connection to read from (the calling thread's batch one, if any)."""
        raise NotImplementedError

    def _migration(self) -> AbstractContextManager[Any]:
        """The transaction the schema is brought up to date in (one process at a time)."""
        raise NotImplementedError

    def _get_version(self, conn: Any) -> int:
        raise NotImplementedError

    def _set_version(self, conn: Any, old: int, new: int) -> None:
        raise NotImplementedError

    def _many(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> int:
        """Run ``sql`` (already in the dialect) once per row; the rows it changed."""
        raise NotImplementedError

    def batch(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _x(self, conn: Any, sql: str, params: Any = ()) -> Any:
        """Execute ``sql`` (written for SQLite) in this store's dialect; the cursor."""
        return conn.execute(self.sql.q(sql), params)

    # --- schema --------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._migration() as conn:
            version = self._get_version(conn)
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"written by a newer car-inference (schema {version} > {SCHEMA_VERSION})",
                    path=self.location,
                )
            # A new database: the latest schema at once. The current schema: the same statements
            # (all IF NOT EXISTS) put back a table dropped by hand, as schema_problem promises.
            if version in (0, SCHEMA_VERSION):
                for statement in self.sql.schema:
                    conn.execute(statement)
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in self.sql.migrations[step]:
                        conn.execute(statement)
            self._set_version(conn, version, SCHEMA_VERSION)

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return self._get_version(conn)

    def schema_problem(self) -> str | None:
        """The first table or column of this schema the database lacks (dropped or altered by
        hand: every write to it then fails), as the database words it; None when all are there."""
        with self._read() as conn:
            for table in _CHECKED:
                columns = COPY_COLUMNS[table][0]
                try:
                    self._x(conn, f"SELECT {columns} FROM {table} LIMIT 0").fetchall()
                except Exception as exc:  # each driver's own error for a missing table or column
                    text = str(exc).strip()
                    # The database away, say: not this check's to report.
                    if type(exc).__name__ not in _MISSING and not text.startswith(_SQLITE_MISSING):
                        raise
                    return f"{table}: {text.splitlines()[0]}"
        return None

    def store_id(self) -> str:
        """This database's id, random, made on first use: ``car state migrate`` records the ids
        of the files whose counters it added, so that a file's counters are added once."""
        with self._tx() as conn:
            self._x(
                conn,
                "INSERT INTO store_identity (one, store_id, created_at) VALUES (1, ?, ?)"
                " ON CONFLICT (one) DO NOTHING",
                (uuid.uuid4().hex, time.time()),
            )
            return str(self._x(conn, "SELECT store_id FROM store_identity").fetchone()["store_id"])

    # --- traces --------------------------------------------------------------------------------

    def start_trace(self, row: TraceRow, *, retry_window_s: float | None = None) -> str | None:
        """Insert a pending trace. With ``retry_window_s``, return the latest earlier trace of the
        same prompt started within that window (a quick retry), found in the same transaction."""
        with self._tx() as conn:
            previous = self._quick_retry_of(conn, row, retry_window_s)
            self._x(
                conn,
                "INSERT INTO traces (trace_id, model_id, task, family, cluster, reason, prompt_hash,"
                " started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (row.trace_id, row.model_id, row.task, row.family, row.cluster, row.reason,
                 row.prompt_hash, row.started_at),
            )  # fmt: skip
        return previous()

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
    ) -> tuple[TraceRow, float] | None:
        """Complete a pending trace and count it. Returns the trace and its quality, or None when
        the trace is unknown or was already completed (a trace is counted once)."""
        now = time.time() if now is None else now
        base = 1.0 if success else 0.0
        with self._tx(counters=True) as conn:
            row = self._x(conn, "SELECT * FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
            if row is None or row["outcome"] != "pending":
                return None
            quality = trace_quality(base, row["penalty"], row["feedback"])
            self._x(
                conn,
                "UPDATE traces SET outcome = ?, completed_at = ?, latency_ms = ?, ttft_ms = ?,"
                " input_tokens = ?, output_tokens = ?, error_class = ?, error = ?, base = ?, quality = ?"
                " WHERE trace_id = ?",
                ("success" if success else "failure", now, latency_ms, ttft_ms, input_tokens, output_tokens,
                 error_class, error, base, quality, trace_id),
            )  # fmt: skip
            trace = _trace_row(row)
            q = float(quality if quality is not None else base)
            self._count(
                conn, trace, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
                output_tokens=output_tokens, quality=q, now=now,
            )  # fmt: skip
            return trace, q

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
        retry_window_s: float | None = None,
        score: float | None = None,
    ) -> tuple[str | None, float]:
        """A whole attempt in one transaction: ``start_trace`` and ``finish_trace`` together, for
        callers that write a trace once it is over (the engine does). ``success=None`` records an
        abandoned attempt (the caller stopped reading): kept as a trace, counted nowhere. ``score``:
        explicit feedback known already (a reported outcome), the trace's quality from the start.
        Returns (the earlier trace this one quickly retried, as ``start_trace``; quality)."""
        now = time.time() if now is None else now
        base = None if success is None else (1.0 if success else 0.0)
        outcome = "abandoned" if success is None else ("success" if success else "failure")
        quality = base if score is None or base is None else score
        with self._tx(counters=success is not None, defer=True) as conn:
            previous = self._quick_retry_of(conn, row, retry_window_s)
            self._x(
                conn,
                _INSERT_TRACE,
                (row.trace_id, row.model_id, row.task, row.family, row.cluster, row.reason, row.prompt_hash,
                 row.started_at, outcome, now, latency_ms, ttft_ms, input_tokens, output_tokens, error_class,
                 error, base, quality, score if base is not None else None),
            )  # fmt: skip
            if success is None or quality is None:
                quality = 0.0
            else:
                if score is not None:
                    self._x(
                        conn,
                        "INSERT INTO feedback (trace_id, kind, value, created_at)"
                        " VALUES (?, 'explicit', ?, ?)",
                        (row.trace_id, score, now),
                    )
                self._count(
                    conn, row, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
                    output_tokens=output_tokens, quality=quality, now=now,
                )  # fmt: skip
        return previous(), quality

    def _count(
        self,
        conn: Any,
        trace: TraceRow,
        *,
        success: bool,
        latency_ms: float | None,
        input_tokens: int,
        output_tokens: int,
        quality: float,
        now: float,
    ) -> None:
        """Count one finished attempt in ``profiles`` and ``task_stats`` (inside the caller's
        transaction): the model's rows and the baseline rows, by SQL arithmetic."""
        params: dict[str, Any] = {
            "model_id": trace.model_id,
            "ok": int(success),
            "fail": int(not success),
            "latency": float(latency_ms or 0.0),
            "in_tok": int(input_tokens),
            "out_tok": int(output_tokens),
            "q": float(quality),
            "now": now,
            "alpha": EMA_ALPHA,
            "decay": QUALITY_DECAY,
        }
        self._counter(conn, self.sql.profile_upsert, [params])
        rows = [{**params, "key": key} for key in stat_keys(trace.family, trace.cluster)]
        rows += [
            {**params, "model_id": m, "key": key} for m, key in baseline_rows(trace.family, trace.cluster)
        ]
        self._counter(conn, self.sql.task_upsert, rows)

    def adjust_quality(
        self, trace_id: str, kind: str, value: float, *, explicit: bool, now: float | None = None
    ) -> QualityChange | None:
        """Record feedback (``explicit``: ``value`` is the score) or an implicit signal (``value`` is
        its penalty) for a trace. Returns the change to a completed trace's quality, if any."""
        now = time.time() if now is None else now
        with self._tx(counters=True) as conn:
            row = self._x(conn, "SELECT * FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
            if row is None:
                return None
            self._x(
                conn,
                "INSERT INTO feedback (trace_id, kind, value, created_at) VALUES (?, ?, ?, ?)",
                (trace_id, kind, value, now),
            )
            penalty, feedback = row["penalty"], row["feedback"]
            if explicit:
                feedback = value
            else:
                penalty += value
            old = row["quality"]
            new = trace_quality(row["base"], penalty, feedback)
            self._x(
                conn,
                "UPDATE traces SET penalty = ?, feedback = ?, quality = ? WHERE trace_id = ?",
                (penalty, feedback, new, trace_id),
            )
            if old is None or new is None or new == old:
                return None
            delta = new - old
            conn.execute(
                self.sql.adjust_profile, {"d": delta, "a": EMA_ALPHA, "now": now, "m": row["model_id"]}
            )
            keys = stat_keys(row["family"], row["cluster"])
            rows = [(row["model_id"], key) for key in keys]
            rows += list(baseline_rows(row["family"], row["cluster"]))
            self._many(
                conn,
                self.sql.adjust_task,
                [{"d": delta, "a": EMA_ALPHA, "now": now, "m": m, "k": k} for m, k in rows],
            )
            return QualityChange(trace_id, row["model_id"], keys, float(old), float(new))

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row: dict[str, Any] | None = self._x(
                conn, "SELECT * FROM traces WHERE trace_id = ?", (trace_id,)
            ).fetchone()
        return row

    def feedback_for(self, trace_id: str) -> list[dict[str, Any]]:
        with self._read() as conn:
            return list(
                self._x(
                    conn,
                    "SELECT kind, value, created_at FROM feedback WHERE trace_id = ? ORDER BY id",
                    (trace_id,),
                )
            )

    def prune_traces(self, older_than: float, *, limit: int | None = None) -> int:
        """Delete traces (and their feedback) started before ``older_than``, the oldest ``limit``
        of them (None: all) in one transaction; counters stay. Returns how many traces went."""
        chosen = "SELECT trace_id FROM traces WHERE started_at < ?"
        params: tuple[float, ...] | tuple[float, int] = (older_than,)
        if limit is not None:
            chosen += " ORDER BY started_at LIMIT ?"
            params = (older_than, limit)
        with self._tx() as conn:
            self._x(conn, f"DELETE FROM feedback WHERE trace_id IN ({chosen})", params)
            return int(self._x(conn, f"DELETE FROM traces WHERE trace_id IN ({chosen})", params).rowcount)

    def forget_templates(self, older_than: float, *, limit: int | None = None) -> list[str]:
        """Delete the ``task_stats`` rows of up to ``limit`` (None: all) templates none of whose
        rows was updated since ``older_than``, the longest dormant first, in one transaction that
        holds off the counters' writers; returns their keys. A template's rows are counted under
        no other key, so nothing else changes; one that comes back starts from its family and
        cluster again."""
        dormant = (
            "SELECT key FROM task_stats WHERE key LIKE 'template|%' GROUP BY key"
            " HAVING MAX(updated_at) < ? ORDER BY MAX(updated_at), key"
        )
        params: tuple[float, ...] | tuple[float, int] = (older_than,)
        if limit is not None:
            dormant += " LIMIT ?"
            params = (older_than, limit)
        with self._tx(counters=True) as conn:
            keys = [r["key"] for r in self._x(conn, dormant, params).fetchall()]
            if keys:  # the same templates: no counter is written meanwhile
                self._x(conn, f"DELETE FROM task_stats WHERE key IN ({dormant})", params)
        return keys

    def forget_model(self, model_id: str) -> int:
        """Delete ``model_id``'s profile and its ``task_stats`` rows under every key, in one
        transaction that holds off the counters' writers; how many rows went. The baselines keep
        its past outcomes (a settled context stays settled) and its traces stay."""
        with self._tx(counters=True) as conn:
            gone = self._x(conn, "DELETE FROM task_stats WHERE model_id = ?", (model_id,)).rowcount
            gone += self._x(conn, "DELETE FROM profiles WHERE model_id = ?", (model_id,)).rowcount
        return int(gone)

    # --- profiles ------------------------------------------------------------------------------

    def profiles(self) -> list[dict[str, Any]]:
        with self._read() as conn:
            return list(conn.execute("SELECT * FROM profiles ORDER BY model_id"))

    def task_stats(self, since: float | None = None) -> list[dict[str, Any]]:
        """Every ``task_stats`` row (by model and key), or those updated at ``since`` or later by
        the writer's clock, in no order (a reload's read: fetched at once, unsorted)."""
        with self._read() as conn:
            if since is None:
                return conn.execute("SELECT * FROM task_stats ORDER BY model_id, key").fetchall()
            rows: list[dict[str, Any]] = self._x(
                conn, "SELECT * FROM task_stats WHERE updated_at >= ?", (since,)
            ).fetchall()
            return rows

    def recent_latencies(self, limit_per_model: int = 256) -> dict[str, list[float]]:
        """The latest successful latencies per model, oldest first: for each model with a profile
        (every model with a finished trace has one), its newest along the (model, completion)
        index. A reload (several a second in a busy fleet) so reads the windows, not every trace:
        a window function over the table took 1 s per reload with 1,000,000 traces."""
        out: dict[str, list[float]] = {}
        with self._read() as conn:
            for p in self._x(conn, "SELECT model_id FROM profiles ORDER BY model_id").fetchall():
                rows = self._x(conn, _RECENT_LATENCIES, (p["model_id"], limit_per_model)).fetchall()
                if rows:
                    out[p["model_id"]] = [float(r["latency_ms"]) for r in reversed(rows)]
        return out

    def replace_profiles(
        self, profiles: Iterable[dict[str, Any]], task_rows: Iterable[dict[str, Any]]
    ) -> None:
        """Write imported profiles over the stored ones (whole rows: an import is a restore)."""
        with self._tx(counters=True) as conn:
            self._many(conn, self.sql.profile_replace, list(profiles))
            self._many(conn, self.sql.task_replace, list(task_rows))

    # --- spend ---------------------------------------------------------------------------------

    def add_spend(self, provider: str, model_id: str, usd: float, ts: float | None = None) -> None:
        with self._tx() as conn:
            self._x(conn, _SPEND_INSERT, (time.time() if ts is None else ts, provider, model_id, float(usd)))

    def spend_by_provider(self, since: float, until: float | None = None) -> dict[str, float]:
        """Total USD per provider for entries with ``since <= ts < until``."""
        query = "SELECT provider, SUM(usd) AS usd FROM spend WHERE ts >= ?"
        args: list[float] = [since]
        if until is not None:
            query += " AND ts < ?"
            args.append(until)
        with self._read() as conn:
            rows = self._x(conn, query + " GROUP BY provider", args).fetchall()
        return {r["provider"]: float(r["usd"] or 0.0) for r in rows}

    def compact_spend(self, before: float, *, limit: int | None = None) -> int:
        """Roll up to ``limit`` (None: all) of the spend entries of the oldest UTC day with entries
        before ``before`` into that day's totals, in one transaction: one entry per provider and
        model at the day's midnight, so that every day's and month's sums (all the limits read)
        stay what they were. Returns how many entries went; 0 when nothing is left to roll up."""
        with self._tx() as conn:
            row = self._x(conn, f"SELECT MIN(ts) AS t FROM spend WHERE ts < ? AND {_LOOSE_SPEND}", (before,))
            first = row.fetchone()["t"]
            if first is None:
                return 0
            day0 = float(int(first // DAY_S) * DAY_S)
            day1 = min(day0 + DAY_S, before)
            gone = self._take_spend(conn, day0, day1, _NO_LIMIT if limit is None else limit)
            totals: dict[tuple[str, str], float] = {}
            for r in gone:
                key = (r["provider"], r["model_id"])
                totals[key] = totals.get(key, 0.0) + float(r["usd"])
            for (provider, model_id), usd in totals.items():
                args = (usd, day0, provider, model_id)
                if not self._x(conn, _ADD_TO_DAY, args).rowcount:
                    self._x(conn, _SPEND_INSERT, (day0, provider, model_id, usd))
            return len(gone)

    def _take_spend(self, conn: Any, day0: float, day1: float, limit: int) -> list[dict[str, Any]]:
        """Delete and return (provider, model, usd) the oldest ``limit`` entries strictly between
        ``day0`` and ``day1``. Here a read and a delete of the same rows, in a transaction no other
        writer enters (SQLite's); PostgreSQL's store deletes and returns them in one statement."""
        args = (day0, day1, limit)
        chosen = f"FROM spend WHERE id IN ({DAY_ENTRIES})"
        taken = self._x(conn, f"SELECT provider, model_id, usd {chosen}", args)
        rows: list[dict[str, Any]] = taken.fetchall()
        self._x(conn, f"DELETE {chosen}", args)
        return rows

    # --- helpers -------------------------------------------------------------------------------

    def _quick_retry_of(self, conn: Any, row: TraceRow, window_s: float | None) -> Callable[[], str | None]:
        """The latest earlier trace of the same prompt started within ``window_s`` (not a failure),
        asked now and read once the write is over (``_later``)."""
        if window_s is None or not row.prompt_hash:
            return lambda: None
        found = self._later(
            self._x(
                conn,
                "SELECT trace_id FROM traces WHERE prompt_hash = ? AND started_at >= ?"
                " AND outcome != 'failure' ORDER BY started_at DESC LIMIT 1",
                (row.prompt_hash, row.started_at - window_s),
            )
        )
        return lambda: str(hit["trace_id"]) if (hit := found()) else None

    def _later(self, cursor: Any) -> Callable[[], Any]:
        """A query's first row, read now; a store that sends a write's statements together reads
        it once they have all come back instead (one wait for the database, not two)."""
        row = cursor.fetchone()
        return lambda: row


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


def dict_rows(cursor: Any, row: tuple[Any, ...]) -> dict[str, Any]:
    """sqlite3 row factory: rows as dicts, like psycopg's ``dict_row``."""
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}
