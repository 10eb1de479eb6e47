"""What the tracker, spend control and engine need from an outcome store, whichever holds the state.

Two implementations: ``OutcomeStore`` (SQLite, ``store.py``), the embedded default for one machine,
and ``PgOutcomeStore`` (PostgreSQL, ``store_pg.py``), which several replicas share. ``open_store``
picks one from the ``[state] url`` setting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel

from ..config import POSTGRES_SCHEMES
from ..errors import ConfigError
from ..redaction import redact_url
from .store import QualityChange, TraceRow
from .store_base import DAY_S

__all__ = [
    "PRUNE_CHUNK",
    "StateHealth",
    "StateStore",
    "compact_old_spend",
    "forget_dormant_templates",
    "is_postgres_url",
    "open_store",
    "prune_old_traces",
    "redact_url",
    "state_health",
    "went_unanswered",
]

log = logging.getLogger("car_inference.state")

# Rows deleted per transaction by ``prune_old_traces`` and ``compact_old_spend``: each commit
# lets the other writers in.
PRUNE_CHUNK = 5_000
# Templates whose rows ``forget_dormant_templates`` deletes per transaction.
TEMPLATE_CHUNK = 500


class StateStore(Protocol):
    """The public interface both stores implement (see ``OutcomeStore`` for each method's contract)."""

    backend: str  # "sqlite" or "postgresql": where the learned state lives
    # Whether a writer thread should let go of the GIL between its records (Bookkeeper.flush):
    # SQLite's C code already does while it works; psycopg's pipelined batches are mostly Python.
    writer_pause: bool

    @property
    def schema_version(self) -> int: ...
    def schema_problem(self) -> str | None: ...

    def close(self) -> None: ...

    def batch(self) -> AbstractContextManager[None]: ...

    def start_trace(self, row: TraceRow, *, retry_window_s: float | None = None) -> str | None: ...

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
    ) -> tuple[TraceRow, float] | None: ...

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
    ) -> tuple[str | None, float]: ...

    def adjust_quality(
        self, trace_id: str, kind: str, value: float, *, explicit: bool, now: float | None = None
    ) -> QualityChange | None: ...

    def trace(self, trace_id: str) -> dict[str, Any] | None: ...

    def feedback_for(self, trace_id: str) -> list[dict[str, Any]]: ...

    def prune_traces(self, older_than: float, *, limit: int | None = None) -> int: ...

    def compact_spend(self, before: float, *, limit: int | None = None) -> int: ...

    def forget_templates(self, older_than: float, *, limit: int | None = None) -> list[str]: ...

    def forget_model(self, model_id: str) -> int: ...

    def profiles(self) -> list[dict[str, Any]]: ...

    def task_stats(self, since: float | None = None) -> list[dict[str, Any]]: ...

    def recent_latencies(self, limit_per_model: int = 256) -> dict[str, list[float]]: ...

    def replace_profiles(
        self, profiles: Iterable[dict[str, Any]], task_rows: Iterable[dict[str, Any]]
    ) -> None: ...

    def add_spend(self, provider: str, model_id: str, usd: float, ts: float | None = None) -> None: ...

    def spend_by_provider(self, since: float, until: float | None = None) -> dict[str, float]: ...


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def open_store(
    url: str | None, sqlite_path: Path, *, buffer_records: int = 10_000, answer_timeout_s: float = 30.0
) -> StateStore:
    """The store ``[state] url`` names: PostgreSQL for a ``postgresql://`` URL (keeping up to
    ``buffer_records`` writes in memory while it is unreachable, and counting it unreachable
    when a connection waits ``answer_timeout_s`` for it), else the SQLite file at
    ``sqlite_path``."""
    if url is None:
        from .store import OutcomeStore

        return OutcomeStore(sqlite_path)
    if not is_postgres_url(url):
        raise ConfigError(
            f"unsupported state url {redact_url(url)!r}: expected postgresql://user@host:port/database",
            field="state.url",
        )
    from .store_pg import PgOutcomeStore

    return PgOutcomeStore(url, buffer_limit=buffer_records, answer_timeout_s=answer_timeout_s)


class StateHealth(BaseModel):
    """Where the learned state lives and whether it answers (the health report's ``state``)."""

    backend: str
    location: str  # the SQLite file, or the PostgreSQL URL with its password masked
    schema_version: int | None = None
    round_trip_ms: float | None = None  # one read through the store, as bookkeeping sees it
    error: str | None = None
    buffered: int = 0  # records waiting in memory for an unreachable database (PostgreSQL)
    dropped: int = 0  # records lost since the store opened: the database was away and the buffer full
    pending: int = 0  # answers' records the engine has not written yet (its writer's queue)
    lag_s: float = 0.0  # how long the oldest of those has waited: the store keeps up when this is small


# How long the health report waits for the state database's answer: a database that stops
# answering without closing the connection (a hung server, a partition) held /v1/health for the
# whole 36 s it was frozen, each later report queued behind the first.
HEALTH_READ_S = 5.0
_health_reads: dict[int, tuple[threading.Thread, float]] = {}  # per store: a read still out
_health_lock = threading.Lock()


def _read_schema(store: StateStore) -> tuple[int, float, str | None]:
    """The schema version, how long reading it took (ms), and the first thing missing from the
    schema (``StoreBase.schema_problem``)."""
    start = time.perf_counter()
    version = store.schema_version
    elapsed = (time.perf_counter() - start) * 1000
    try:
        problem = store.schema_problem()
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    return version, elapsed, problem


def _bounded(store: StateStore, timeout_s: float) -> tuple[int, float, str | None]:
    """``_read_schema`` in a thread of its own, given up on after ``timeout_s`` (TimeoutError; the
    thread finishes when the database answers, and no second one starts meanwhile)."""
    with _health_lock:
        out = _health_reads.get(id(store))
        if out is not None and out[0].is_alive():
            raise TimeoutError(f"no answer to the read sent {time.monotonic() - out[1]:.0f} s ago")
    result: list[Any] = []

    def read() -> None:
        try:
            result.append(_read_schema(store))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=read, name="car-state-health", daemon=True)
    with _health_lock:
        _health_reads[id(store)] = (thread, time.monotonic())
    thread.start()
    thread.join(timeout_s)
    if not result:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    with _health_lock:
        _health_reads.pop(id(store), None)
    if isinstance(result[0], BaseException):
        raise result[0]
    answer: tuple[int, float, str | None] = result[0]
    return answer


def state_health(
    store: StateStore,
    location: str,
    *,
    pending: int = 0,
    lag_s: float = 0.0,
    timeout_s: float = HEALTH_READ_S,
) -> StateHealth:
    """Read the schema version through ``store`` and time it, and check its tables (given up on
    after ``timeout_s``); what waits in memory, what was lost; ``pending`` / ``lag_s``: the
    engine's records not yet written and the oldest one's wait."""
    try:
        version, elapsed, problem = _bounded(store, timeout_s)
    except Exception as exc:  # whatever the driver raises, the report says it rather than failing
        return StateHealth(
            backend=store.backend,
            location=redact_url(location),
            error=f"{type(exc).__name__}: {exc}",
            buffered=int(getattr(store, "buffered", 0)),
            dropped=int(getattr(store, "dropped", 0)),
            pending=pending,
            lag_s=round(lag_s, 3),
        )
    error = None
    if problem is not None:  # a table or column dropped by hand: every write to it fails
        error = (
            f"the database lacks part of schema {version} ({problem}): records that need it are "
            "lost until it is repaired (a restart re-creates missing tables)"
        )
    return StateHealth(
        backend=store.backend,
        location=redact_url(location),
        schema_version=version,
        round_trip_ms=elapsed,
        error=error,
        buffered=int(getattr(store, "buffered", 0)),
        dropped=int(getattr(store, "dropped", 0)),
        pending=pending,
        lag_s=round(lag_s, 3),
    )


def went_unanswered(health: StateHealth) -> bool:
    """Whether ``health``'s read got no answer in time (a hung database, as ``state_health``
    says it), not a refusal: reads of the database would wait as long."""
    return (health.error or "").startswith(f"{TimeoutError.__name__}: ")


def prune_old_traces(
    store: StateStore, older_than_days: float, *, stop: threading.Event | None = None
) -> int:
    """Delete the traces (and their feedback) started more than ``older_than_days`` ago (0: none),
    ``PRUNE_CHUNK`` per transaction, until none is left or ``stop`` is set. The learned counters
    and the spend ledger stay. Returns how many went."""
    if older_than_days <= 0:
        return 0
    cutoff = time.time() - older_than_days * 86_400
    total = _in_chunks(lambda: store.prune_traces(cutoff, limit=PRUNE_CHUNK), stop, whole=PRUNE_CHUNK)
    if total:
        log.info("deleted %d traces older than %g days", total, older_than_days)
    return total


def compact_old_spend(
    store: StateStore, *, stop: threading.Event | None = None, now: float | None = None
) -> int:
    """Roll the spend entries of every UTC day before today (``now``'s) into one entry per day,
    provider and model (``StateStore.compact_spend``), ``PRUNE_CHUNK`` entries per transaction,
    until none is left or ``stop`` is set: the ledger then grows by days, not by calls, and the
    day's and month's totals the limits read stay what they were. Returns how many entries went."""
    today = int((time.time() if now is None else now) // DAY_S) * DAY_S
    total = _in_chunks(lambda: store.compact_spend(today, limit=PRUNE_CHUNK), stop, whole=None)
    if total:
        log.info("rolled %d spend entries up into daily totals", total)
    return total


def forget_dormant_templates(
    store: StateStore,
    older_than_days: float,
    *,
    stop: threading.Event | None = None,
    now: float | None = None,
) -> list[str]:
    """Delete the learned rows of every template not seen for ``older_than_days`` (0: none),
    ``TEMPLATE_CHUNK`` templates per transaction, until none is left or ``stop`` is set: an
    application whose prompts start with something that changes (a date, a user's name) makes a new
    template every day, and every full reload of the learned state reads all their rows. Returns
    the templates' keys. ``now``: the time the age is counted from (default: the clock's)."""
    if older_than_days <= 0:
        return []
    cutoff = (time.time() if now is None else now) - older_than_days * 86_400
    keys: list[str] = []

    def step() -> int:
        chunk = store.forget_templates(cutoff, limit=TEMPLATE_CHUNK)
        keys.extend(chunk)
        return len(chunk)

    _in_chunks(step, stop, whole=TEMPLATE_CHUNK)
    if keys:
        log.info("forgot %d templates not seen for %g days", len(keys), older_than_days)
    return keys


def _in_chunks(step: Callable[[], int], stop: threading.Event | None, *, whole: int | None) -> int:
    """Call ``step`` (one transaction; how many rows it took) until it takes none (or fewer than
    ``whole``) or ``stop`` is set; the sum."""
    total = 0
    while True:
        done = step()
        total += done
        if not done or (whole is not None and done < whole) or (stop is not None and stop.is_set()):
            return total
        time.sleep(0.01)  # between chunks: the writer thread and other replicas take their turn
