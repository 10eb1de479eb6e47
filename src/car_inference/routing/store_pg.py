"""PgOutcomeStore: the outcome store in PostgreSQL, shared by several ``car serve`` replicas.

The same tables, methods and results as the SQLite ``OutcomeStore``: both are
``store_base.StoreBase`` over ``store_sql``'s statements; this module is how it reaches
PostgreSQL. Chosen by ``[state] url = "postgresql://..."`` (``store_api.open_store``).

How replicas share it without losing updates:

- every counter changes by SQL arithmetic in an upsert (``calls = t.calls + 1``), never by writing
  back a value read earlier, and one outcome is one transaction (or one savepoint of a ``batch()``);
- transactions that change counters (finishing or recording a trace, feedback, an import) take
  one transaction-scoped advisory lock, ``WRITE_LOCK``: writers of counters take turns, as
  SQLite's ``BEGIN IMMEDIATE`` makes them. Without it two replicas' batches, each touching several
  models' rows in its own order, could deadlock; with it "a trace is counted once" holds across
  replicas too. Readers never wait for it, and traces and spend are written without it. A batch
  holds it only for its counters: its recorded outcomes' counter changes are held back and
  applied together at its end (one round trip under the lock), so replicas' writers overlap in
  everything else; a write that reads counted state (finishing a trace, feedback) takes the lock
  where it comes and applies what was held back first;
- the schema is versioned in a ``schema_version`` table with the SQLite store's numbers and
  migrations applied in order, under a second advisory lock so that replicas starting together
  migrate once.

Connections come from a ``psycopg_pool`` pool; a ``batch()`` holds one for the calling thread,
and the store's other calls on that thread run in it (as savepoints), so they see its writes. A
batch runs in pipeline mode: each write's statements go out together and wait for the database
once (twice when it reads a row), not once per statement, which is what a database on another
machine charges for (``benchmarks/state_store.py --rtt-ms``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

from ..errors import ConfigError, StateUnavailable
from ..redaction import redact_url
from .store_base import DAY_ENTRIES
from .store_buffer import BufferedWrites, unreachable
from .store_pg_sql import (
    COPY_COLUMNS,
    COUNTER_TABLES,
    add_counters,
    insert_missing,
    merge_counters,
    present_rows,
)
from .store_pg_watch import Watchdog
from .store_sql import dialect

try:
    import psycopg
    from psycopg.rows import DictRow, dict_row
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - the extra is part of the test install
    raise ImportError(
        "a postgresql:// state url needs psycopg: pip install 'car-inference[postgres]'"
    ) from exc

__all__ = ["MIGRATE_LOCK", "WRITE_LOCK", "PgOutcomeStore"]

log = logging.getLogger("car_inference.state")

# Advisory lock keys (per database): "car-stat" and "car-migr" as 64-bit integers.
WRITE_LOCK = int.from_bytes(b"car-stat", "big") >> 1
MIGRATE_LOCK = int.from_bytes(b"car-migr", "big") >> 1

Conn = psycopg.Connection[DictRow]

# libpq settings of every pooled connection: a database that stops answering without closing the
# connection (a network partition) is noticed in seconds, not after the kernel's ~15 minutes of
# retransmissions: keepalive probes after 10 s idle, and unacknowledged data for 15 s, end it.
LIBPQ_TIMEOUTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
    "tcp_user_timeout": 15_000,
}


def _stop_preparing(conn: Conn) -> None:
    """After a failure in a pipelined batch: this connection prepares no statement any more.
    psycopg (3.3.9) counts a statement as prepared when its PREPARE went out in the part of the
    pipeline the failure aborted, and every later use of it on the connection then fails
    ("prepared statement _pg3_0 does not exist"): one refused write broke the rest of its batch and
    every later batch on that connection. Without preparing, no statement is looked up by name;
    the pool replaces each connection within the hour (``max_lifetime``), preparing again."""
    conn.prepare_threshold = None


class PgOutcomeStore(BufferedWrites):
    """PostgreSQL-backed outcome storage. Open one per process; it is thread-safe. While the
    database is unreachable, writes wait in memory (``store_buffer``; ``buffer_limit`` records)."""

    backend = "postgresql"
    sql = dialect("postgresql")
    writer_pause = True  # a pipelined batch waits little and runs psycopg's Python (see StateStore)

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 4,
        connect_timeout_s: float = 5.0,
        buffer_limit: int = 10_000,
        retry_s: float = 1.0,
        answer_timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self.location = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self._watch = Watchdog(answer_timeout_s, self.location)  # a database that hangs (store_pg_watch)
        self.max_connections = max_connections
        self._local = threading.local()
        self._init_buffer(buffer_limit, retry_s)
        _probe(url, connect_timeout_s)  # a clear error now beats a pool that retries in the background
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:  # each of its reconnect attempts warned (32 an outage):
            pool_log.setLevel(logging.ERROR)  # the store's own warning says it once
        self._pool = self._new_pool()
        self._pool.open(wait=True, timeout=connect_timeout_s)
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            self._watch.close()
            raise

    def server(self) -> str:
        """Where the connections go as libpq resolved the URL (``user@host:port/database``): a
        bare ``postgresql://`` reaches the local socket's server and the user's database."""
        with self._connection() as conn:
            info = conn.info
            return f"{info.user}@{info.host}:{info.port}/{info.dbname}"

    # --- plumbing ------------------------------------------------------------------------------

    def _new_pool(self) -> ConnectionPool[Conn]:
        return ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.max_connections,
            kwargs={"row_factory": dict_row, "autocommit": True, **LIBPQ_TIMEOUTS},
            check=self._check,  # a connection the server dropped is replaced
            open=False,
            timeout=self.connect_timeout_s,  # waiting for a connection: bounded like connecting
            name="car-state",
        )

    def _check(self, conn: Conn) -> None:
        with self._watch.watch(conn):  # the check's round trip waits like any other
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _connection(self) -> Iterator[Conn]:
        """A pooled connection, cut if the database holds it past ``answer_timeout_s``."""
        with self._pool.connection() as conn, self._watch.watch(conn):
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Conn]:
        """The calling thread's batch connection, or one from the pool (none while the database
        is away: the read fails at once)."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        self._check_readable()
        try:
            with self._connection() as conn:
                yield conn
        except StateUnavailable:
            raise
        except Exception as exc:
            if not unreachable(exc):
                raise
            self._went_down(exc)
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            message = f"the PostgreSQL state store {self.location} is unreachable ({reason})"
            raise StateUnavailable(message, retry_after=self.retry_s) from exc

    @contextmanager
    def _tx(self, *, counters: bool = False, defer: bool = False) -> Iterator[Conn]:
        """One write transaction; inside ``batch()`` a savepoint of the batch's transaction, undone
        alone on error. ``counters``: it changes profiles/task_stats, so it takes ``WRITE_LOCK``;
        in a batch, a ``defer`` write's counter statements wait for the batch's end instead
        (``_apply_deferred``), and any other such write takes the lock first (at the top level:
        a lock taken in a savepoint that rolls back would be let go with the row locks kept)."""
        batch: Conn | None = getattr(self._local, "conn", None)
        if batch is None:
            with self._connection() as conn, conn.transaction():
                if counters:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                yield conn
            return
        pipe: psycopg.Pipeline | None = getattr(self._local, "pipe", None)
        if pipe is None:  # a batch without pipeline mode, or a replay: it took the lock up front
            with batch.transaction():
                yield batch
            return
        held = counters and defer and not self._local.locked
        if counters and not held and not self._local.locked:
            self._apply_deferred(batch, pipe, lock=True)
        group: list[tuple[str, list[dict[str, Any]]]] = []
        self._local.group = group if held else None
        try:
            with self._savepoint(batch, pipe):
                yield batch
        finally:
            self._local.group = None
        if group:  # the write stood: its counter changes go with the batch's
            self._local.deferred.append(group)

    def _counter(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> None:
        group: list[tuple[str, list[dict[str, Any]]]] | None = getattr(self._local, "group", None)
        if group is None:
            super()._counter(conn, sql, rows)
        else:
            group.append((sql, rows))

    def _later(self, cursor: Any) -> Callable[[], Any]:
        if getattr(self._local, "pipe", None) is None or getattr(self._local, "conn", None) is None:
            return super()._later(cursor)
        return cursor.fetchone  # the write's sync brings its row back with the rest

    def _apply_deferred(self, conn: Conn, pipe: psycopg.Pipeline, *, lock: bool = False) -> None:
        """Take ``WRITE_LOCK`` (when there are held-back counter changes, or ``lock``) and apply
        the counter changes held back so far, in their order, in one round trip. Should one be
        refused (a value out of its column's range, say), they are applied again one write at a
        time, each in a savepoint: only that write's counters are lost, and the log says so."""
        groups, self._local.deferred = self._local.deferred, []
        if not self._local.locked and (groups or lock):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            self._local.locked = True
        if not groups:
            return
        conn.execute("SAVEPOINT car_counters")
        try:
            self._run_merged(conn, groups)
            conn.execute("RELEASE SAVEPOINT car_counters")
            pipe.sync()
        except psycopg.Error as exc:
            if unreachable(exc) or conn.broken or conn.closed:
                raise
            with suppress(psycopg.Error):
                pipe.sync()
            _stop_preparing(conn)
            conn.execute("ROLLBACK TO SAVEPOINT car_counters")
            conn.execute("RELEASE SAVEPOINT car_counters")
            pipe.sync()
            for group in groups:
                try:
                    with self._savepoint(conn, pipe):
                        self._run_group(conn, group)
                except psycopg.Error as refused:
                    if unreachable(refused):
                        raise
                    log.warning("an outcome's counters were refused and are not counted: %s", refused)

    def _run_group(self, conn: Conn, group: list[tuple[str, list[dict[str, Any]]]]) -> None:
        for sql, rows in group:
            super()._counter(conn, sql, rows)

    def _run_merged(self, conn: Conn, groups: list[list[tuple[str, list[dict[str, Any]]]]]) -> None:
        """The held-back counter changes as one statement per table (``merge_counters``: each row
        changed once, as their updates in order would have left it), not one per change: a batch
        of 16 answers sent ~110 upserts, each costing the writer thread Python time (the GIL)."""
        rows = ((sql, row) for group in groups for sql, many in group for row in many)
        merged = merge_counters(rows, self.sql.profile_upsert, self.sql.task_upsert)
        if merged is None:
            for group in groups:
                self._run_group(conn, group)
            return
        for sql, params in merged:
            conn.execute(sql, params)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside (on this thread) into one transaction and one commit. Each
        write stays atomic on its own (a savepoint); the batch commits what succeeded. Nested
        batches join the outer one. The write lock is taken for the counters only (``_tx``,
        ``_apply_deferred``), outside any savepoint. A batch whose connection is lost puts the
        writes it had made back in the buffer."""
        if getattr(self._local, "conn", None) is not None or getattr(self._local, "dead", False):
            yield
            return
        journal: list[Any] = []
        body_done = False
        try:
            with ExitStack() as stack:
                conn = self._open_batch(stack)
                if conn is None:  # unreachable: the writes inside go to the buffer
                    self._local.dead = True
                    try:
                        yield
                    finally:
                        self._local.dead = False
                    return
                self._local.conn, self._local.journal = conn, journal
                try:
                    yield
                finally:
                    self._local.conn = self._local.journal = None
                body_done = True
                pipe = getattr(self._local, "pipe", None)
                if pipe is not None and not (conn.broken or conn.closed):
                    self._apply_deferred(conn, pipe)  # the counter changes held back, under the lock
                if conn.broken or conn.closed:  # psycopg ends a dead connection's block silently
                    raise psycopg.OperationalError("the connection was lost before the batch's commit")
        except Exception as exc:
            if not unreachable(exc):
                raise
            self._went_down(exc)
            self._enqueue(journal, front=True)
            if not body_done:
                raise

    def _open_batch(self, stack: ExitStack) -> Conn | None:
        """A batch's connection and transaction in pipeline mode (``_savepoint``; the write lock
        comes later, ``_apply_deferred``), or without it and the lock taken where libpq lacks
        pipeline mode; None when unreachable."""
        if not self._available():
            return None
        try:
            conn = stack.enter_context(self._connection())
            stack.enter_context(conn.transaction())
            self._local.deferred, self._local.locked = [], False
            if psycopg.Pipeline.is_supported():  # libpq >= 14 (psycopg-binary bundles one)
                self._local.pipe = stack.enter_context(conn.pipeline())
                self._local.cmd = conn.cursor()
                stack.callback(setattr, self._local, "pipe", None)
                stack.callback(setattr, self._local, "cmd", None)
            else:  # each write waits for its statements anyway: the lock up front, as a replay
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                self._local.locked = True
        except Exception as exc:
            if not unreachable(exc):
                raise
            self._went_down(exc)
            return None
        return conn

    @contextmanager
    def _savepoint(self, conn: Conn, pipe: psycopg.Pipeline) -> Iterator[None]:
        """One write of a batch: its SAVEPOINT, statements and RELEASE go out together and come
        back in one round trip (a statement whose rows are read costs one more), where psycopg's
        ``transaction()`` in pipeline mode syncs on entering and leaving. A write that fails, in
        the database or in Python, is rolled back to its savepoint alone."""
        cmd = self._local.cmd  # statements without rows share a cursor: less Python per write
        cmd.execute("SAVEPOINT car_write")  # one name: a write's savepoint is gone before the next's
        try:
            yield
            cmd.execute("RELEASE SAVEPOINT car_write")
            pipe.sync()  # a failed statement raises here: the RELEASE behind it did not run
        except BaseException:
            if not (conn.broken or conn.closed):
                with suppress(psycopg.Error):  # the write's own error is the one to raise
                    pipe.sync()
                _stop_preparing(conn)
                cmd.execute("ROLLBACK TO SAVEPOINT car_write")
                cmd.execute("RELEASE SAVEPOINT car_write")
                pipe.sync()
            raise

    def _in_batch(self) -> bool:
        return getattr(self._local, "conn", None) is not None or getattr(self._local, "dead", False)

    def _in_dead_batch(self) -> bool:
        return bool(getattr(self._local, "dead", False))

    def _journal(self, record: Any) -> None:
        journal: list[Any] | None = getattr(self._local, "journal", None)
        if journal is not None:
            journal.append(record)

    def _try_connect(self) -> None:
        psycopg.connect(
            self.url, connect_timeout=max(1, round(min(self.connect_timeout_s, 2))), autocommit=True
        ).close()
        # The database answers again, but the pool may be waiting out its own reconnect backoff
        # (1, 2, 4 ... 128 s): replicas came back 19 s after a 36 s outage and 110 s after a 138 s
        # one, answering 503 meanwhile. A new pool connects now; the old one is closed once the
        # calls that hold its connections are done with them.
        old, self._pool = self._pool, self._new_pool()
        self._pool.open(wait=False)
        closing = threading.Timer(self.connect_timeout_s + 1, old.close, kwargs={"timeout": 1.0})
        closing.daemon = True
        closing.start()

    def _replay(self, records: list[Any], run: Callable[[Any], None]) -> None:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            self._local.conn = conn
            try:
                for record in records:
                    run(record)  # each in a savepoint of its own (``_tx`` in a batch)
            finally:
                self._local.conn = None

    @contextmanager
    def _migration(self) -> Iterator[Conn]:
        """The schema is brought up to date under ``MIGRATE_LOCK``: replicas starting together
        migrate once. Not under the watchdog: waiting for another replica's migration is
        expected, and a schema change may take its time."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            yield conn

    def _get_version(self, conn: Any) -> int:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row["version"]) if row else 0

    def _set_version(self, conn: Any, old: int, new: int) -> None:
        if conn.execute("SELECT 1 FROM schema_version").fetchone() is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (new,))
        else:
            conn.execute("UPDATE schema_version SET version = %s", (new,))

    def _take_spend(self, conn: Any, day0: float, day1: float, limit: int) -> list[dict[str, Any]]:
        """One statement: a replica rolling up the same day meanwhile gets other rows, or none."""
        sql = f"DELETE FROM spend WHERE id IN ({DAY_ENTRIES}) RETURNING provider, model_id, usd"
        rows: list[dict[str, Any]] = self._x(conn, sql, (day0, day1, limit)).fetchall()
        return rows

    def _many(self, conn: Any, sql: str, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        with conn.cursor() as cur:
            cur.executemany(sql, rows)
            return max(int(cur.rowcount), 0)

    def close(self) -> None:
        """Write what is buffered if the database answers now, say what is lost if not, close."""
        if self.buffered and not self.recover(force=True):
            log.error(
                "PostgreSQL state store %s closed while unreachable: %d buffered records are lost",
                self.location, self.buffered,
            )  # fmt: skip
        if self._timer is not None:
            self._timer.cancel()
        self._pool.close()
        self._watch.close()

    def __enter__(self) -> PgOutcomeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_counters(
        self, store_id: str, source: str, chunks: Iterable[tuple[str, list[dict[str, Any]]]]
    ) -> dict[str, tuple[int, int]] | None:
        """Add another store's counter rows (``car state migrate``: ``chunks`` of the tables in
        ``COUNTER_TABLES``) to these, in one transaction, once per ``store_id``: per table, (rows
        inserted, rows added to). None when that store's counters were added before."""
        out = dict.fromkeys(COUNTER_TABLES, (0, 0))
        with self._tx(counters=True) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO merged_stores (store_id, source, merged_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (store_id) DO NOTHING",
                (store_id, source, time.time()),
            )
            if cur.rowcount != 1:
                return None
            for table, rows in chunks:
                key = COPY_COLUMNS[table][1] or ""
                columns = [[r[k.strip()] for r in rows] for k in key.split(",")]
                there = cur.execute(present_rows(table), columns).fetchone()
                cur.executemany(add_counters(table), rows)
                inserted, added = out[table]
                found = int(next(iter(there.values()))) if there else 0
                out[table] = (inserted + len(rows) - found, added + found)
        return out

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


def _probe(url: str, timeout_s: float) -> None:
    """Connect once: an unreachable server or a wrong database is a ``ConfigError`` that says so."""
    try:
        psycopg.connect(url, connect_timeout=max(1, round(timeout_s)), autocommit=True).close()
    except psycopg.Error as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ConfigError(
            f"PostgreSQL state store at {redact_url(url)} is not reachable: {reason}", field="state.url"
        ) from exc
