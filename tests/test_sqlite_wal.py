"""The package's SQLite conventions (sqlite_wal.py), on real files."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from car_inference.sqlite_wal import connect, immediate


def test_connections_are_wal_with_the_busy_timeout(tmp_path: Path) -> None:
    conn = connect(tmp_path / "a.db", busy_timeout_s=2.5)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.isolation_level is None, "autocommit: transactions are ours to open"


def test_a_transaction_commits_or_rolls_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    conn = connect(path, busy_timeout_s=1)
    conn.execute("CREATE TABLE t (x INTEGER)")
    with immediate(conn) as c:
        c.execute("INSERT INTO t VALUES (1)")
        c.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(ZeroDivisionError), immediate(conn) as c:
        c.execute("INSERT INTO t VALUES (3)")
        raise ZeroDivisionError
    other = connect(path, busy_timeout_s=1)  # what another process would read
    assert [r[0] for r in other.execute("SELECT x FROM t ORDER BY x")] == [1, 2]
    assert not conn.in_transaction


def test_a_second_writer_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    first, second = connect(path, busy_timeout_s=5), connect(path, busy_timeout_s=5)
    first.execute("CREATE TABLE t (x INTEGER)")
    order: list[str] = []
    holding = threading.Event()

    def write_later() -> None:
        holding.wait()
        with immediate(second) as c:  # blocks on the write lock, then goes through
            c.execute("INSERT INTO t VALUES (2)")
            order.append("second")

    thread = threading.Thread(target=write_later)
    thread.start()
    with immediate(first) as c:
        c.execute("INSERT INTO t VALUES (1)")
        holding.set()
        thread.join(0.3)
        assert thread.is_alive(), "the second writer waits while the first holds the lock"
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
    assert [r[0] for r in first.execute("SELECT x FROM t ORDER BY x")] == [1, 2]


def test_without_waiting_a_locked_database_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    first, second = connect(path, busy_timeout_s=5), connect(path, busy_timeout_s=0)
    first.execute("CREATE TABLE t (x INTEGER)")
    with immediate(first), pytest.raises(sqlite3.OperationalError, match="locked"), immediate(second):
        pass


def test_a_new_database_waits_for_a_writer_before_switching_to_wal(tmp_path: Path) -> None:
    """Two processes opening a new state.db together: the switch to WAL met the other's write lock
    and failed at once ("database is locked"), without waiting for the busy timeout."""
    path = tmp_path / "a.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # rollback journal
    other.execute("CREATE TABLE t (x INTEGER)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        conn = connect(path, busy_timeout_s=5)
    finally:
        release.join()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_the_switch_to_wal_gives_up_at_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE t (x INTEGER)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        connect(path, busy_timeout_s=0.2)
    other.execute("ROLLBACK")
