"""OutcomeStore: the router's memory on disk, one SQLite file (``$CAR_HOME/state.db``).

Safe for several processes at once (server workers, a CLI beside a server): WAL journal, a busy
timeout, and every update is one ``BEGIN IMMEDIATE`` transaction whose counters change by SQL
arithmetic (``calls = calls + 1``), never by writing back a value read earlier, so concurrent writers
never lose an update. ``synchronous=NORMAL`` under WAL means a power cut may drop the last few
transactions but never corrupts the file; a process crash loses nothing committed.

What the store does is ``store_base.StoreBase`` (shared with the PostgreSQL store); this module is
how it reaches SQLite. Tables (``store_sql``; schema version in ``PRAGMA user_version``):

- ``profiles``: per model totals (calls, successes, failures, latency, tokens, quality EMA);
- ``task_stats``: per (model, key) where key is a task family (``code``) or a family and prompt
  cluster (``code|latin-short``): calls, outcomes, latency, and quality sums, both plain and
  exponentially decayed (``decayed_sum``/``decayed_n``, factor ``QUALITY_DECAY`` per observation).
  Rows with model ``*`` hold each key's baseline: all models' observations together;
- ``traces``: one row per attempt: model, task, family, prompt hash, start time, outcome, and the
  pieces its quality is computed from (base 1/0, implicit-signal penalty, explicit feedback);
- ``feedback``: explicit scores and implicit signals, as they arrived;
- ``spend``: (timestamp, provider, model, usd) entries.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import sqlite_wal
from ..errors import ConfigError, StateUnavailable
from .store_base import (
    ALL,
    EMA_ALPHA,
    QUALITY_DECAY,
    SCHEMA_VERSION,
    QualityChange,
    StoreBase,
    TraceRow,
    baseline_rows,
    dict_rows,
    is_templated,
    stat_keys,
    trace_quality,
)
from .store_sql import dialect

__all__ = [
    "ALL",
    "EMA_ALPHA",
    "QUALITY_DECAY",
    "SCHEMA_VERSION",
    "OutcomeStore",
    "QualityChange",
    "TraceRow",
    "baseline_rows",
    "is_templated",
    "stat_keys",
    "trace_quality",
]


class OutcomeStore(StoreBase):
    """SQLite-backed outcome storage. Open one per process; it is thread-safe."""

    backend = "sqlite"
    sql = dialect("sqlite")
    writer_pause = False  # its C code lets go of the GIL while it works (see StateStore)

    @property
    def thread_lock(self) -> threading.RLock:
        """The lock every use of the one connection holds (a writer's whole batch included): a
        component that reads the store under a lock of its own takes this one first."""
        return self._lock

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._batch_depth = 0
        self.busy_timeout_s = busy_timeout_ms / 1000
        conn: sqlite3.Connection | None = None
        try:
            self._conn = conn = sqlite_wal.connect(self.path, busy_timeout_s=busy_timeout_ms / 1000)
            conn.row_factory = dict_rows
            self._migrate()
        except (sqlite3.DatabaseError, StateUnavailable) as exc:  # not a database, damaged, or locked
            if conn is not None:
                conn.close()
            cause = exc.__cause__ if isinstance(exc, StateUnavailable) else exc  # locked past the timeout
            reason = _unopenable(cause, self.path) if isinstance(cause, sqlite3.DatabaseError) else str(exc)
            raise ConfigError(reason, path=self.location) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction. A database another process keeps write-locked past
        the busy timeout is ``StateUnavailable`` (nothing written, retry later): ``report`` and
        ``feedback`` raised sqlite3's own "database is locked" at their caller."""
        try:
            with sqlite_wal.immediate(self._conn) as conn:
                yield conn
        except sqlite3.OperationalError as exc:
            why = str(exc)
            if "locked" in why or "busy" in why:
                raise StateUnavailable(
                    f"the learned-state database {self.location} is locked by another process ({exc}):"
                    " nothing was written; try again when it ends",
                    retry_after=self.busy_timeout_s,
                ) from exc
            if "full" in why or "readonly" in why:  # the file is fine: the disk or its permissions
                raise StateUnavailable(
                    f"the learned-state database {self.location} cannot be written ({exc}): nothing was"
                    " written; free space or give write permission, then try again"
                ) from exc
            raise

    @contextmanager
    def _tx(self, *, counters: bool = False, defer: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; inside ``batch()`` a savepoint of the batch's transaction,
        undone alone on error. (``BEGIN IMMEDIATE`` serializes every writer, counters or not.)"""
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
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    _migration = _tx

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

    def _get_version(self, conn: Any) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()["user_version"])

    def _set_version(self, conn: Any, old: int, new: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(new)}")

    def _many(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> int:
        return int(conn.executemany(sql, rows).rowcount) if rows else 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> OutcomeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unopenable(exc: sqlite3.DatabaseError, path: Path) -> str:
    """Why the state file cannot be opened, and what to do: the file is left as it is."""
    reason = str(exc) or type(exc).__name__
    if "locked" in reason or "busy" in reason:
        return f"the learned-state database is locked by another process ({reason}); try again when it ends"
    if ("readonly" in reason or "unable to open" in reason) and not os.access(path.parent, os.W_OK):
        # Not damage: the folder (CAR_HOME) cannot be written, and "move it aside or restore it
        # from a backup" pointed at the wrong fix, one that could lose the learned state.
        return f"{path.parent} is not writable ({reason}): the learned state needs to write there"
    if "readonly" in reason:
        return f"{path} is not writable ({reason}): the learned state needs to write it; it was left as it is"
    if "full" in reason:
        return f"the disk of {path} is full ({reason}): free space and try again; the file was left as it is"
    return (
        f"the learned-state database cannot be read ({reason}); it was left as it is: move it aside"
        " to start with empty state, or restore it from a backup"
    )
