"""OutcomeStore: the router's memory on disk, one SQLite file (``$CAR_HOME/state.db``).

Safe for several processes at once (server workers, a CLI beside a server): WAL journal, a busy
timeout, and every update is one ``BEGIN IMMEDIATE`` transaction whose counters change by SQL
arithmetic (``calls = calls + 1``), never by writing back a value read earlier, so concurrent writers
never lose an update. ``synchronous=NORMAL`` under WAL means a power cut may drop the last few
transactions but never corrupts the file; a process crash loses nothing committed.

Tables (schema version in ``PRAGMA user_version``):

- ``profiles``: per model totals (calls, successes, failures, latency, tokens, quality EMA);
- ``task_stats``: per (model, key) where key is a task family (``code``) or a family and prompt
  cluster (``code|latin-short``): calls, outcomes, latency, and quality sums, both plain and
  exponentially decayed (``decayed_sum``/``decayed_n``, factor ``QUALITY_DECAY`` per observation),
  and the decayed sum of residuals (quality minus the other models' baseline when it was observed,
  ``residual``). Rows with model ``*`` hold each key's baseline: all models' observations together;
- ``traces``: one row per attempt: model, task, family, prompt hash, start time, outcome, and the
  pieces its quality is computed from (base 1/0, implicit-signal penalty, explicit feedback);
- ``feedback``: explicit scores and implicit signals, as they arrived;
- ``spend``: (timestamp, provider, model, usd) entries.

A trace's quality = its explicit feedback when given, else max(0, base - penalty), base being 1 for a
success and 0 for a failure. When feedback or a signal changes a completed trace's quality, the
difference is added to its rows' quality sums in the same transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .estimate import ALL, residual
from .store_sql import MIGRATIONS, PROFILE_UPSERT, SCHEMA, TASK_UPSERT

__all__ = [
    "ALL",
    "EMA_ALPHA",
    "QUALITY_DECAY",
    "SCHEMA_VERSION",
    "OutcomeStore",
    "QualityChange",
    "TraceRow",
    "baseline_rows",
    "stat_keys",
]

SCHEMA_VERSION = 2
EMA_ALPHA = 0.1
# Per-observation decay of the quality sums the router reads: an effective memory of about
# 1 / (1 - 0.999) = 1,000 observations per (model, family), so a model that changes is noticed.
QUALITY_DECAY = 0.999


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
    return (f"template|{template}",) if sep else (family, f"{family}|{cluster}")


def baseline_rows(family: str, cluster: str | None) -> tuple[tuple[str, str], ...]:
    """The (model ``*``, key) baseline rows one observation also counts under."""
    return tuple((ALL, key) for key in stat_keys(family, cluster))


def trace_quality(base: float | None, penalty: float, feedback: float | None) -> float | None:
    if feedback is not None:
        return feedback
    if base is None:
        return None
    return max(0.0, base - penalty)


class OutcomeStore:
    """SQLite-backed outcome storage. Open one per process; it is thread-safe."""

    backend = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._batch_depth = 0
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._migrate()

    # --- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock up front: no upgrade deadlocks), COMMIT or ROLLBACK."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; inside ``batch()`` a savepoint of the batch's transaction,
        undone alone on error."""
        with self._lock:
            if not self._batch_depth:
                with self._transaction() as conn:
                    yield conn
                return
            self._conn.execute("SAVEPOINT write")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK TO write")
                self._conn.execute("RELEASE write")
                raise
            self._conn.execute("RELEASE write")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside into one transaction and one commit (the commit is most of
        a small write's cost). Each write stays atomic on its own (a savepoint); the batch commits
        what succeeded. Nested batches join the outer one."""
        with self._lock:
            if self._batch_depth:
                self._batch_depth += 1
                try:
                    yield
                finally:
                    self._batch_depth -= 1
                return
            with self._transaction():
                self._batch_depth = 1
                try:
                    yield
                finally:
                    self._batch_depth = 0

    def _migrate(self) -> None:
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"written by a newer car-inference (schema {version} > {SCHEMA_VERSION})",
                    path=str(self.path),
                )
            if version == 0:  # a new file: the latest schema at once
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    conn.execute(MIGRATIONS[step])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> OutcomeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- traces --------------------------------------------------------------------------------

    def start_trace(self, row: TraceRow, *, retry_window_s: float | None = None) -> str | None:
        """Insert a pending trace. With ``retry_window_s``, return the latest earlier trace of the
        same prompt started within that window (a quick retry), found in the same transaction."""
        with self._tx() as conn:
            previous = _quick_retry_of(conn, row, retry_window_s)
            conn.execute(
                "INSERT INTO traces (trace_id, model_id, task, family, cluster, reason, prompt_hash,"
                " started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        """Complete a pending trace and count it. Returns the trace, its quality and its residual
        (``residual`` of its keys' rows, read in the same transaction), or None when the trace is
        unknown or was already completed (a trace is counted once)."""
        now = time.time() if now is None else now
        base = 1.0 if success else 0.0
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
            if row is None or row["outcome"] != "pending":
                return None
            quality = trace_quality(base, row["penalty"], row["feedback"])
            conn.execute(
                "UPDATE traces SET outcome = ?, completed_at = ?, latency_ms = ?, ttft_ms = ?,"
                " input_tokens = ?, output_tokens = ?, error_class = ?, error = ?, base = ?, quality = ?"
                " WHERE trace_id = ?",
                ("success" if success else "failure", now, latency_ms, ttft_ms, input_tokens, output_tokens,
                 error_class, error, base, quality, trace_id),
            )  # fmt: skip
            trace = _trace_row(row)
            resid = self._count(
                conn, trace, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
                output_tokens=output_tokens, quality=quality if quality is not None else base, now=now,
                prior_strength=prior_strength,
            )  # fmt: skip
            return trace, float(quality if quality is not None else base), resid

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
        """A whole attempt in one transaction: ``start_trace`` and ``finish_trace`` together, for
        callers that write a trace once it is over (the engine does). ``success=None`` records an
        abandoned attempt (the caller stopped reading): kept as a trace, counted nowhere. ``score``:
        explicit feedback known already (a reported outcome), the trace's quality from the start.
        Returns (the earlier trace this one quickly retried, as ``start_trace``; quality;
        residual)."""
        now = time.time() if now is None else now
        base = None if success is None else (1.0 if success else 0.0)
        outcome = "abandoned" if success is None else ("success" if success else "failure")
        with self._tx() as conn:
            previous = _quick_retry_of(conn, row, retry_window_s)
            conn.execute(
                "INSERT INTO traces (trace_id, model_id, task, family, cluster, reason, prompt_hash,"
                " started_at, outcome, completed_at, latency_ms, ttft_ms, input_tokens, output_tokens,"
                " error_class, error, base, quality) VALUES (" + ", ".join("?" * 18) + ")",
                (row.trace_id, row.model_id, row.task, row.family, row.cluster, row.reason, row.prompt_hash,
                 row.started_at, outcome, now, latency_ms, ttft_ms, input_tokens, output_tokens, error_class,
                 error, base, base if score is None or base is None else score),
            )  # fmt: skip
            if success is None or base is None:
                return previous, 0.0, 0.0
            quality = base
            if score is not None:
                quality = score
                conn.execute("UPDATE traces SET feedback = ? WHERE trace_id = ?", (score, row.trace_id))
                conn.execute(
                    "INSERT INTO feedback (trace_id, kind, value, created_at) VALUES (?, 'explicit', ?, ?)",
                    (row.trace_id, score, now),
                )
            resid = self._count(
                conn, row, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
                output_tokens=output_tokens, quality=quality, now=now, prior_strength=prior_strength,
            )  # fmt: skip
            return previous, quality, resid

    @staticmethod
    def _count(
        conn: sqlite3.Connection,
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
        transaction); returns its residual, from the rows as they were before it."""
        keys = stat_keys(trace.family, trace.cluster)
        levels = []
        for key in keys:
            sums = {ALL: (0.0, 0.0), trace.model_id: (0.0, 0.0)}
            for model_id, total, n in conn.execute(
                "SELECT model_id, decayed_sum, decayed_n FROM task_stats"
                " WHERE key = ? AND model_id IN (?, ?)",
                (key, ALL, trace.model_id),
            ):
                sums[model_id] = (total, n)
            levels.append((*sums[ALL], *sums[trace.model_id]))
        resid = residual(quality, prior_strength, levels)
        params: dict[str, Any] = {
            "model_id": trace.model_id,
            "ok": int(success),
            "fail": int(not success),
            "latency": float(latency_ms or 0.0),
            "in_tok": int(input_tokens),
            "out_tok": int(output_tokens),
            "q": quality,
            "r": resid,
            "now": now,
            "alpha": EMA_ALPHA,
            "decay": QUALITY_DECAY,
        }
        conn.execute(PROFILE_UPSERT, params)
        rows = [{**params, "key": key} for key in keys]
        rows += [
            {**params, "model_id": m, "key": key, "r": 0.0}
            for m, key in baseline_rows(trace.family, trace.cluster)
        ]
        conn.executemany(TASK_UPSERT, rows)
        return resid

    def adjust_quality(
        self, trace_id: str, kind: str, value: float, *, explicit: bool, now: float | None = None
    ) -> QualityChange | None:
        """Record feedback (``explicit``: ``value`` is the score) or an implicit signal (``value`` is
        its penalty) for a trace. Returns the change to a completed trace's quality, if any."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
            if row is None:
                return None
            conn.execute(
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
            conn.execute(
                "UPDATE traces SET penalty = ?, feedback = ?, quality = ? WHERE trace_id = ?",
                (penalty, feedback, new, trace_id),
            )
            if old is None or new is None or new == old:
                return None
            delta = new - old
            conn.execute(
                "UPDATE profiles SET quality_sum = quality_sum + :d, resid_sum = resid_sum + :d,"
                " ema_quality = MIN(1.0, MAX(0.0, ema_quality + :a * :d)), updated_at = :now"
                " WHERE model_id = :m",
                {"d": delta, "a": EMA_ALPHA, "now": now, "m": row["model_id"]},
            )
            keys = stat_keys(row["family"], row["cluster"])
            rows = [(row["model_id"], key, delta) for key in keys]
            rows += [(model_id, key, 0.0) for model_id, key in baseline_rows(row["family"], row["cluster"])]
            for model_id, key, resid_delta in rows:
                conn.execute(
                    "UPDATE task_stats SET quality_sum = quality_sum + :d, decayed_sum = decayed_sum + :d,"
                    " resid_sum = resid_sum + :rd, ema_quality = MIN(1.0, MAX(0.0, ema_quality + :a * :d)),"
                    " updated_at = :now WHERE model_id = :m AND key = :k",
                    {"d": delta, "rd": resid_delta, "a": EMA_ALPHA, "now": now, "m": model_id, "k": key},
                )
            return QualityChange(trace_id, row["model_id"], keys, float(old), float(new))

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
        return dict(row) if row else None

    def feedback_for(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, value, created_at FROM feedback WHERE trace_id = ? ORDER BY id", (trace_id,)
            ).fetchall()
        return [dict(r) for r in rows]

    def prune_traces(self, older_than: float) -> int:
        """Delete traces (and their feedback) started before ``older_than``; counters stay."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM feedback WHERE trace_id IN (SELECT trace_id FROM traces WHERE started_at < ?)",
                (older_than,),
            )
            return conn.execute("DELETE FROM traces WHERE started_at < ?", (older_than,)).rowcount

    # --- profiles ------------------------------------------------------------------------------

    def profiles(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute("SELECT * FROM profiles ORDER BY model_id")]

    def task_stats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute("SELECT * FROM task_stats ORDER BY model_id, key")]

    def recent_latencies(self, limit_per_model: int = 256) -> dict[str, list[float]]:
        """The latest successful latencies per model, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT model_id, latency_ms FROM ("
                " SELECT model_id, latency_ms, completed_at, ROW_NUMBER() OVER"
                " (PARTITION BY model_id ORDER BY completed_at DESC) AS rn"
                " FROM traces WHERE outcome = 'success' AND latency_ms IS NOT NULL)"
                " WHERE rn <= ? ORDER BY model_id, completed_at",
                (limit_per_model,),
            ).fetchall()
        out: dict[str, list[float]] = {}
        for model_id, latency in rows:
            out.setdefault(model_id, []).append(float(latency))
        return out

    def replace_profiles(
        self, profiles: Iterable[dict[str, Any]], task_rows: Iterable[dict[str, Any]]
    ) -> None:
        """Write imported profiles over the stored ones (whole rows: an import is a restore)."""
        with self._tx() as conn:
            for p in profiles:
                conn.execute(
                    "INSERT OR REPLACE INTO profiles (model_id, total_calls, success_count, fail_count,"
                    " total_latency_ms, total_input_tokens, total_output_tokens, quality_sum, resid_sum,"
                    " ema_quality, updated_at) VALUES (:model_id, :total_calls, :success_count, :fail_count,"
                    " :total_latency_ms, :total_input_tokens, :total_output_tokens, :quality_sum,"
                    " :resid_sum, :ema_quality, :updated_at)",
                    p,
                )
            for t in task_rows:
                conn.execute(
                    "INSERT OR REPLACE INTO task_stats (model_id, key, calls, success_count, fail_count,"
                    " total_latency_ms, quality_sum, decayed_sum, decayed_n, resid_sum, ema_quality,"
                    " updated_at, total_output_tokens) VALUES (:model_id, :key, :calls, :success_count,"
                    " :fail_count, :total_latency_ms, :quality_sum, :decayed_sum, :decayed_n, :resid_sum,"
                    " :ema_quality, :updated_at, :total_output_tokens)",
                    t,
                )

    # --- spend ---------------------------------------------------------------------------------

    def add_spend(self, provider: str, model_id: str, usd: float, ts: float | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO spend (ts, provider, model_id, usd) VALUES (?, ?, ?, ?)",
                (time.time() if ts is None else ts, provider, model_id, float(usd)),
            )

    def spend_by_provider(self, since: float, until: float | None = None) -> dict[str, float]:
        """Total USD per provider for entries with ``since <= ts < until``."""
        query = "SELECT provider, SUM(usd) FROM spend WHERE ts >= ?"
        args: list[float] = [since]
        if until is not None:
            query += " AND ts < ?"
            args.append(until)
        with self._lock:
            rows = self._conn.execute(query + " GROUP BY provider", args).fetchall()
        return {provider: float(total or 0.0) for provider, total in rows}


def _trace_row(row: sqlite3.Row) -> TraceRow:
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


def _quick_retry_of(conn: sqlite3.Connection, row: TraceRow, window_s: float | None) -> str | None:
    """The latest earlier trace of the same prompt started within ``window_s`` (not a failure)."""
    if window_s is None or not row.prompt_hash:
        return None
    hit = conn.execute(
        "SELECT trace_id FROM traces WHERE prompt_hash = ? AND started_at >= ?"
        " AND outcome != 'failure' ORDER BY started_at DESC LIMIT 1",
        (row.prompt_hash, row.started_at - window_s),
    ).fetchone()
    return hit[0] if hit else None
