"""How this package opens and writes its SQLite files (``state.db``'s outcome store, the key
statistics): autocommit connections in WAL mode with a busy timeout, shared across threads under
the caller's lock, and writes in ``BEGIN IMMEDIATE`` transactions (the write lock up front, so two
writers never deadlock upgrading a read lock)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["connect", "immediate"]

log = logging.getLogger(__name__)


def connect(path: str | Path, *, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to ``path`` in WAL mode (``synchronous = NORMAL``: durable at checkpoints,
    never corrupt), waiting up to ``busy_timeout_s`` for another writer's lock."""
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    _enter_wal(conn, path, busy_timeout_s)
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _enter_wal(conn: sqlite3.Connection, path: str | Path, busy_timeout_s: float) -> None:
    """Switch a new database to WAL, waiting up to ``busy_timeout_s`` like any other write.

    The switch needs the exclusive lock while this connection holds a read lock, so when another
    connection holds the write lock SQLite answers "database is locked" at once instead of calling
    the busy handler (it could deadlock): two processes opening a new ``state.db`` together hit
    this. So the switch is tried again until the timeout."""
    deadline = time.monotonic() + busy_timeout_s
    delay = 0.001
    while True:
        try:
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        else:
            if mode not in ("wal", "memory"):  # SQLite kept the old mode (a file system without WAL)
                log.warning("%s stays in journal mode %r: it could not be switched to WAL", path, mode)
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any exception (which propagates)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
