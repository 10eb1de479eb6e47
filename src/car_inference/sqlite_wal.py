"""How this package opens and writes its SQLite files (``state.db``'s outcome store, the key
statistics): autocommit connections in WAL mode with a busy timeout, shared across threads under
the caller's lock, and writes in ``BEGIN IMMEDIATE`` transactions (the write lock up front, so two
writers never deadlock upgrading a read lock)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["connect", "immediate"]


def connect(path: str | Path, *, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to ``path`` in WAL mode (``synchronous = NORMAL``: durable at checkpoints,
    never corrupt), waiting up to ``busy_timeout_s`` for another writer's lock."""
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


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
