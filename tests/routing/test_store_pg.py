"""PgOutcomeStore against the real PostgreSQL on 127.0.0.1:5432: what differs from SQLite (schema
versions in a table, batches on a pooled connection, replicas writing at once). The behaviours both
stores share run on both in test_store.py."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from car_inference.errors import ConfigError
from car_inference.routing.store import SCHEMA_VERSION, OutcomeStore, TraceRow
from car_inference.routing.store_api import open_store, state_health
from car_inference.routing.store_pg import WRITE_LOCK, PgOutcomeStore
from car_inference.routing.store_sql import schema_text
from fakes.services import postgres_schema_url

MODELS = ("p/a", "p/b", "p/c")
ROUNDS = 40
BATCH = 5


@pytest.fixture
def url() -> str:
    return postgres_schema_url()


@pytest.fixture
def store(url: str) -> Iterator[PgOutcomeStore]:
    with PgOutcomeStore(url) as s:
        yield s


def _row(trace_id: str, model: str = "p/m", family: str = "code", started_at: float = 1.0) -> TraceRow:
    return TraceRow(trace_id, model, "generate", family, "latin-short", "test", None, started_at)


def _sql(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def _columns(schema: str) -> dict[str, list[str]]:
    """Table -> column names, from a CREATE TABLE script."""
    tables: dict[str, list[str]] = {}
    for name, body in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\n\);", schema, re.S):
        tables[name] = [
            line.split()[0] for line in body.strip().splitlines() if not line.strip().startswith("PRIMARY")
        ]
    return tables


def test_the_tables_are_the_sqlite_stores(store: PgOutcomeStore, url: str) -> None:
    """Same tables and columns as SQLite: `car state migrate` copies rows as they are."""
    pg, lite = _columns(schema_text("postgresql")), _columns(schema_text("sqlite"))
    assert pg == lite and len(pg) == 7
    assert store.schema_version == SCHEMA_VERSION == 5
    with _sql(url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_newer_schema_is_refused(url: str) -> None:
    PgOutcomeStore(url).close()
    with _sql(url) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer"):
        PgOutcomeStore(url)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_database_is_migrated_in_place(url: str, version: int) -> None:
    with PgOutcomeStore(url) as store:
        store.record_trace(_row("t1"), success=True, latency_ms=10.0, output_tokens=7)
    with _sql(url) as conn:  # 4: no store ids; 3: no joined_at; 2: residual sums; 1: no answer lengths
        conn.execute("DROP TABLE store_identity")
        conn.execute("DROP TABLE merged_stores")
        if version <= 3:
            conn.execute("ALTER TABLE task_stats DROP COLUMN joined_at")
        if version <= 2:
            conn.execute("ALTER TABLE profiles ADD COLUMN resid_sum DOUBLE PRECISION NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE task_stats ADD COLUMN resid_sum DOUBLE PRECISION NOT NULL DEFAULT 0")
        if version == 1:
            conn.execute("ALTER TABLE task_stats DROP COLUMN total_output_tokens")
        conn.execute("UPDATE schema_version SET version = %s", (version,))
    with PgOutcomeStore(url) as store:
        assert store.schema_version == SCHEMA_VERSION
        rows = {r["key"]: r for r in store.task_stats() if r["model_id"] == "p/m"}
        assert rows["code"]["calls"] == 1 and "resid_sum" not in rows["code"]
        assert rows["code"]["joined_at"] == 0
        assert rows["code"]["total_output_tokens"] == (0 if version == 1 else 7)
        store.record_trace(_row("t2"), success=True, latency_ms=10.0, output_tokens=5)
        rows = {r["key"]: r for r in store.task_stats() if r["model_id"] == "p/m"}
        assert rows["code"]["calls"] == 2 and rows["code"]["total_output_tokens"] == (
            5 if version == 1 else 12
        )


def test_replicas_starting_together_migrate_once(url: str) -> None:
    stores: list[PgOutcomeStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PgOutcomeStore(url))
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.close()
    assert errors == [] and len(stores) == 4
    with _sql(url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (1,)


def _approx_rows(got: list[Any], want: list[Any]) -> bool:
    """Row by row, floats within rounding (the two databases sum in their own order)."""
    assert len(got) == len(want) and len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        assert g == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in w.items()}
    return True


def test_same_results_as_sqlite(store: PgOutcomeStore, tmp_path: Path) -> None:
    """The same calls leave the same rows in both stores (timestamps aside)."""
    with OutcomeStore(tmp_path / "state.db") as lite:
        for s in (store, lite):
            s.start_trace(_row("a", "p/a", started_at=1.0))
            s.finish_trace("a", success=True, latency_ms=100, input_tokens=4, output_tokens=9, now=5.0)
            s.record_trace(_row("b", "p/b", "math", 2.0), success=False, latency_ms=50, now=6.0)
            s.record_trace(_row("c", "p/a", "math", 3.0), success=True, score=0.6, output_tokens=3, now=7.0)
            s.adjust_quality("a", "quick_retry", 0.5, explicit=False, now=8.0)
            s.add_spend("acme", "p/a", 0.25, ts=9.0)
        assert _approx_rows(store.profiles(), lite.profiles())
        assert _approx_rows(store.task_stats(), lite.task_stats())
        assert _approx_rows([store.trace("a")], [lite.trace("a")])
        assert store.feedback_for("c") == lite.feedback_for("c")
        assert store.recent_latencies() == lite.recent_latencies()
        assert store.spend_by_provider(0.0) == lite.spend_by_provider(0.0)


def test_a_batchs_counters_merged_leave_the_rows_one_by_one_would(
    store: PgOutcomeStore, tmp_path: Path
) -> None:
    """A batch applies its counter changes as one statement per table, each row changed once
    (``merge_counters``); the rows must be those SQLite's one-upsert-per-change leaves: sums,
    EMAs and decayed sums over rows new in the batch, rows already there, and a row at 0 calls."""
    rng = random.Random(7)
    zero = {"model_id": "p/c", "total_calls": 0, "success_count": 0, "fail_count": 0, "total_latency_ms": 0.0,
            "total_input_tokens": 0, "total_output_tokens": 0, "quality_sum": 0.0, "ema_quality": 0.9,
            "updated_at": 1.0}  # fmt: skip
    with OutcomeStore(tmp_path / "state.db") as lite:
        for s in (store, lite):
            s.replace_profiles([zero], [])
        for batch in range(3):
            outcomes = [
                (f"m{batch}-{i}", rng.choice(MODELS), rng.choice(("code", "math")), rng.random() < 0.8,
                 rng.choice((None, rng.random())), rng.uniform(10, 900), rng.randrange(1, 300))
                for i in range(40)
            ]  # fmt: skip
            for s in (store, lite):
                with s.batch():
                    for k, (trace_id, model, family, ok, score, latency, out) in enumerate(outcomes):
                        s.record_trace(
                            _row(trace_id, model, family), success=ok, latency_ms=latency, input_tokens=7,
                            output_tokens=out, score=score if ok else None, now=10.0 * batch + k,
                        )  # fmt: skip
        assert len(store.task_stats()) > 10
        assert _approx_rows(store.profiles(), lite.profiles())
        assert _approx_rows(store.task_stats(), lite.task_stats())


def test_replace_profiles_restores_whole_rows(store: PgOutcomeStore) -> None:
    store.record_trace(_row("t1"), success=True, latency_ms=10.0)
    profiles, stats = store.profiles(), store.task_stats()
    store.record_trace(_row("t2"), success=False, latency_ms=10.0)
    store.replace_profiles(profiles, stats)
    assert store.profiles() == profiles and store.task_stats() == stats


def test_batch_commits_once_and_is_invisible_until_then(store: PgOutcomeStore, url: str) -> None:
    with _sql(url) as other:
        with store.batch():
            store.add_spend("p", "m", 1.0, 1.0)
            with store.batch():  # nested: joins the outer transaction
                store.add_spend("p", "m", 2.0, 1.0)
            with pytest.raises(psycopg.IntegrityError), store.batch():
                store.start_trace(_row("t1"))
                store.start_trace(_row("t1"))  # this write alone is undone (its savepoint)
            assert store.spend_by_provider(0.0) == {"p": 3.0}  # this thread reads the batch's writes
            assert other.execute("SELECT COUNT(*) FROM spend").fetchone() == (0,)
            seen: list[dict[str, float]] = []
            reader = threading.Thread(target=lambda: seen.append(store.spend_by_provider(0.0)))
            reader.start()
            reader.join(10)
            assert seen == [{}]  # another thread's read does not wait for the batch, nor see it
        assert other.execute("SELECT SUM(usd) FROM spend").fetchone() == (3.0,)
        assert store.trace("t1") is not None
        with pytest.raises(RuntimeError), store.batch():
            store.add_spend("p", "m", 4.0, 1.0)
            raise RuntimeError("the batch itself fails")
        assert store.spend_by_provider(0.0) == {"p": 3.0}
        store.add_spend("p", "m", 1.0, 1.0)  # plain transactions work again after a batch
        assert store.spend_by_provider(0.0) == {"p": 4.0}


def test_a_failed_write_in_a_pipelined_batch_is_undone_alone(store: PgOutcomeStore) -> None:
    """A batch sends its writes pipelined: a write whose statement fails in the database (seen only
    at its sync) or that raises in Python after its statements went out is rolled back alone; the
    writes before and after it commit with the batch, counters included."""
    with store.batch():
        store.record_trace(_row("ok-1", "p/a"), success=True, latency_ms=2.0)
        with pytest.raises(psycopg.IntegrityError):
            store.record_trace(_row("ok-1", "p/a"), success=True, latency_ms=2.0)  # its id is taken
        # Pipelined, float("slow") in _count raises before the INSERT's own error comes back:
        with pytest.raises((ValueError, psycopg.DataError)):
            store.record_trace(_row("bad-2", "p/a"), success=True, latency_ms="slow")
        store.record_trace(_row("ok-3", "p/a"), success=False, latency_ms=4.0)
        store.add_spend("p", "p/a", 0.5, 1.0)
    assert store.trace("ok-1") is not None and store.trace("ok-3") is not None
    assert store.trace("bad-2") is None
    (profile,) = [p for p in store.profiles() if p["model_id"] == "p/a"]
    assert (profile["total_calls"], profile["success_count"], profile["fail_count"]) == (2, 1, 1)
    assert store.spend_by_provider(0.0) == {"p": 0.5}


def test_a_failed_write_after_feedback_and_a_prune_loses_neither(store: PgOutcomeStore, url: str) -> None:
    """A refused write in a batch after feedback (which takes the write lock and changes counters)
    and in a batch after a prune is undone alone: nothing before it is lost or counted twice, the
    lock is held to the batch's end and then let go."""
    store.record_trace(_row("old", "p/b", started_at=1.0), success=True, latency_ms=1.0, now=1.0)
    with _sql(url) as other:
        with store.batch():
            store.record_trace(_row("a", "p/a", started_at=100.0), success=True, latency_ms=2.0, now=10.0)
            store.adjust_quality("a", "explicit", 0.5, explicit=True, now=11.0)
            store.record_trace(_row("b", "p/a", started_at=100.0), success=False, latency_ms=3.0, now=12.0)
            with pytest.raises(psycopg.IntegrityError):
                store.record_trace(
                    _row("a", "p/a", started_at=100.0), success=True, latency_ms=2.0
                )  # its id is taken
            assert not _write_lock_free(other), "the feedback's lock is held to the batch's end"
            store.record_trace(_row("c", "p/a", started_at=100.0), success=True, latency_ms=4.0, now=13.0)
        assert _write_lock_free(other)
        with store.batch():
            store.record_trace(_row("d", "p/a", started_at=100.0), success=True, latency_ms=1.0, now=20.0)
            store.prune_traces(older_than=5.0)  # (its count is not known inside a pipelined batch)
            with pytest.raises(psycopg.IntegrityError):
                store.record_trace(_row("d", "p/a", started_at=100.0), success=True, latency_ms=1.0)
    assert store.trace("old") is None and all(store.trace(t) is not None for t in "abcd")
    assert [f["value"] for f in store.feedback_for("a")] == [0.5]
    (profile,) = [p for p in store.profiles() if p["model_id"] == "p/a"]
    assert (profile["total_calls"], profile["success_count"], profile["fail_count"]) == (4, 3, 1)
    assert profile["quality_sum"] == pytest.approx(0.5 + 0 + 1 + 1)


@pytest.mark.parametrize("lead", [0, 1, 2])
def test_refused_writes_do_not_break_the_connection(url: str, lead: int) -> None:
    """Refused writes in a batch leave the batch, later batches and plain writes working. psycopg
    counted a statement whose PREPARE went out in the aborted part of a pipeline as prepared, and
    every later use of it on that connection failed ("prepared statement ... does not exist"); the
    writes before the refused ones shift which of the repeated statements crosses psycopg's
    threshold there."""
    with PgOutcomeStore(url) as store:
        with store.batch():
            for i in range(lead):
                store.record_trace(_row(f"lead-{i}", "p/a", started_at=100.0), success=True, latency_ms=1.0)
            store.record_trace(_row("taken", "p/a", started_at=100.0), success=True, latency_ms=1.0)
            for _ in range(5):
                with pytest.raises(psycopg.IntegrityError):
                    store.record_trace(_row("taken", "p/a"), success=True, latency_ms=1.0)
            store.record_trace(_row("after", "p/a", started_at=100.0), success=True, latency_ms=1.0)
        for batch in range(2):
            with store.batch():
                for i in range(4):
                    store.record_trace(
                        _row(f"b{batch}-{i}", "p/a", started_at=100.0), success=True, latency_ms=1.0
                    )
                store.add_spend("p", "p/a", 0.5, 1.0)
        store.record_trace(_row("plain", "p/a", started_at=100.0), success=True, latency_ms=1.0)
        (profile,) = [p for p in store.profiles() if p["model_id"] == "p/a"]
        assert profile["total_calls"] == lead + 2 + 8 + 1 and store.spend_by_provider(0.0) == {"p": 1.0}


def _write_lock_free(other: psycopg.Connection) -> bool:
    """Whether another session could take the fleet's write lock now (autocommit: let go at once)."""
    row = other.execute("SELECT pg_try_advisory_xact_lock(%s)", (WRITE_LOCK,)).fetchone()
    return bool(row and row[0])


def test_a_batch_holds_the_write_lock_for_its_counters_only(store: PgOutcomeStore, url: str) -> None:
    """Outcomes and spend go in first, their counter changes are held back: other replicas' batches
    take the lock meanwhile. A write that reads counted state (feedback) takes the lock and applies
    what was held back first, so it finds the rows it adjusts."""
    with _sql(url) as other:
        with store.batch():
            store.record_trace(_row("d-1", "p/a"), success=True, latency_ms=2.0)
            store.add_spend("p", "p/a", 0.1, 1.0)
            assert _write_lock_free(other), "nothing counted yet: the lock is not taken"
            change = store.adjust_quality("d-1", "explicit", 0.25, explicit=True)
            assert change is not None and (change.old, change.new) == (1.0, 0.25)
            assert not _write_lock_free(other), "counting (and adjusting) takes it until the commit"
        assert _write_lock_free(other)
        with store.batch():
            store.record_trace(_row("d-2", "p/a"), success=False, latency_ms=2.0)
        assert _write_lock_free(other)
    (profile,) = [p for p in store.profiles() if p["model_id"] == "p/a"]
    assert (profile["total_calls"], profile["success_count"], profile["fail_count"]) == (2, 1, 1)
    assert profile["quality_sum"] == pytest.approx(0.25)  # 1.0 counted, then adjusted to 0.25; 0.0
    code = {r["key"]: r for r in store.task_stats() if r["model_id"] == "p/a"}["code"]
    assert (code["calls"], code["quality_sum"]) == (2, pytest.approx(0.25))


def test_counters_a_column_refuses_lose_only_their_write(
    store: PgOutcomeStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The counter changes held back are applied together; one the database refuses (a total
    beyond BIGINT) is applied again write by write: only that write's counters are lost, and the
    log says so. Its trace and the other writes stand."""
    full = 2**63 - 10
    store.replace_profiles(
        [{"model_id": "p/big", "total_calls": 1, "success_count": 1, "fail_count": 0, "total_latency_ms": 1.0,
          "total_input_tokens": 0, "total_output_tokens": full, "quality_sum": 1.0, "ema_quality": 1.0,
          "updated_at": 1.0}],
        [],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="car_inference.state"), store.batch():
        store.record_trace(_row("c-1", "p/a"), success=True, latency_ms=1.0, output_tokens=5)
        store.record_trace(_row("c-2", "p/big"), success=True, latency_ms=1.0, output_tokens=100)
        store.record_trace(_row("c-3", "p/a"), success=True, latency_ms=1.0, output_tokens=5)
    profiles = {p["model_id"]: p for p in store.profiles()}
    assert (profiles["p/a"]["total_calls"], profiles["p/a"]["total_output_tokens"]) == (2, 10)
    assert (profiles["p/big"]["total_calls"], profiles["p/big"]["total_output_tokens"]) == (1, full)
    assert all(store.trace(t) is not None for t in ("c-1", "c-2", "c-3"))
    assert "counters were refused" in caplog.text and "out of range" in caplog.text


def _replica(url: str, worker: int) -> None:
    """A replica's bookkeeping: batches of outcomes over several models, in an order of its own
    (opposite orders are how two transactions holding row locks would deadlock)."""
    models = MODELS if worker % 2 == 0 else MODELS[::-1]
    with PgOutcomeStore(url) as store:
        for i in range(ROUNDS):
            with store.batch():
                for j in range(BATCH):
                    model = models[(i + j) % len(models)]
                    trace_id = f"w{worker}-{i}-{j}"
                    store.record_trace(
                        _row(trace_id, model, "code" if j % 2 else "math"), success=j != 0, latency_ms=2.0
                    )
                    if j == 1:
                        store.adjust_quality(trace_id, "explicit", 0.5, explicit=True)
                    store.add_spend("acme", model, 0.001)


def _context() -> multiprocessing.context.ForkContext | multiprocessing.context.SpawnContext:
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def test_replicas_batching_at_once_lose_no_update(url: str) -> None:
    PgOutcomeStore(url).close()
    workers = 3
    procs = [_context().Process(target=_replica, args=(url, w)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    total = workers * ROUNDS * BATCH
    with PgOutcomeStore(url) as store:
        profiles = store.profiles()
        assert sum(p["total_calls"] for p in profiles) == total
        assert sum(p["fail_count"] for p in profiles) == workers * ROUNDS  # j == 0 of each batch
        # success 1, failure 0, the j == 1 trace rated 0.5 afterwards
        expected = workers * ROUNDS * (BATCH - 1 - 0.5)
        assert sum(p["quality_sum"] for p in profiles) == pytest.approx(expected)
        baseline = {r["key"]: r for r in store.task_stats() if r["model_id"] == "*"}
        assert baseline["code"]["calls"] + baseline["math"]["calls"] == total
        assert baseline["code"]["quality_sum"] + baseline["math"]["quality_sum"] == pytest.approx(expected)
        assert store.spend_by_provider(0.0)["acme"] == pytest.approx(0.001 * total)


def _write_forever(url: str) -> None:
    store = PgOutcomeStore(url)
    i = 0
    while True:
        with store.batch():
            for _ in range(3):
                store.record_trace(_row(f"k{i}"), success=True, latency_ms=1.0)
                i += 1


def test_a_killed_replica_loses_nothing_it_committed(url: str) -> None:
    PgOutcomeStore(url).close()
    proc = _context().Process(target=_write_forever, args=(url,))
    proc.start()
    time.sleep(1.5)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with _sql(url) as conn:
        completed = conn.execute("SELECT COUNT(*) FROM traces WHERE outcome = 'success'").fetchone()
        calls = conn.execute("SELECT total_calls FROM profiles").fetchone()
    assert completed is not None and calls is not None
    assert completed[0] > 0 and calls[0] == completed[0]  # every counted call is one committed trace
    assert completed[0] % 3 == 0  # whole batches only


def test_unreachable_database_names_the_url_without_its_password() -> None:
    with pytest.raises(ConfigError, match=r"not reachable") as info:
        PgOutcomeStore("postgresql://car:s3cret@127.0.0.1:1/car", connect_timeout_s=1)
    assert "s3cret" not in str(info.value) and "car:***@127.0.0.1:1" in str(info.value)


def test_open_store_picks_the_backend(url: str, tmp_path: Path) -> None:
    with contextlib.closing(open_store(url, tmp_path / "state.db")) as pg:
        assert pg.backend == "postgresql"
    assert not (tmp_path / "state.db").exists()  # a PostgreSQL store leaves no SQLite file
    with contextlib.closing(open_store(None, tmp_path / "state.db")) as lite:
        assert lite.backend == "sqlite" and (tmp_path / "state.db").is_file()
    with pytest.raises(ConfigError, match="unsupported state url 'mysql://x@h/db'"):
        open_store("mysql://x@h/db", tmp_path / "state.db")


def test_state_health_times_a_read_and_reports_a_failure(store: PgOutcomeStore, url: str) -> None:
    health = state_health(store, url.replace("postgres@", "postgres:pw@"))
    assert health.backend == "postgresql" and ":***@" in health.location
    assert health.schema_version == SCHEMA_VERSION
    assert health.round_trip_ms is not None and health.round_trip_ms > 0 and health.error is None
    with _sql(url) as conn:
        conn.execute(f"DROP SCHEMA {url.rsplit('search_path%3D', 1)[1]} CASCADE")
    health = state_health(store, url)
    assert health.round_trip_ms is None and health.error is not None and "schema_version" in health.error


def test_state_health_names_a_table_or_column_dropped_by_hand(store: PgOutcomeStore, url: str) -> None:
    """Every write to a dropped table failed while the health report said the state was fine."""
    assert store.schema_problem() is None
    with _sql(url) as conn:
        conn.execute("DROP TABLE feedback")
    assert "feedback" in (store.schema_problem() or "")
    with PgOutcomeStore(url) as restarted:  # as the message says, a restart puts the table back
        assert restarted.schema_problem() is None  # it did not: every feedback was a 503 for good
    assert store.schema_problem() is None
    with _sql(url) as conn:
        conn.execute("DROP TABLE feedback")
    with _sql(url) as conn:
        conn.execute("ALTER TABLE traces DROP COLUMN quality")
    health = state_health(store, url)  # the first problem, in the order of the tables
    assert health.schema_version == SCHEMA_VERSION and health.error is not None
    assert "traces" in health.error and "quality" in health.error


def test_the_servers_writer_thread_batches_into_postgres(store: PgOutcomeStore) -> None:
    """`car serve`'s path: records queued on the loop, written by the bookkeeper's own thread in
    batches (a pooled connection of that thread), while this thread keeps reading."""
    from car_inference.engine.bookkeeping import Bookkeeper

    keeper = Bookkeeper(store.batch, delay_s=0.01)
    keeper.start_writer()
    for i in range(40):
        keeper.submit(store.record_trace, _row(f"w{i}", MODELS[i % 3]), success=True, latency_ms=1.0)
        keeper.submit(store.add_spend, "acme", MODELS[i % 3], 0.5)
        store.profiles()  # reads on this thread do not wait for the writer's batch
    keeper.close()
    assert sum(p["total_calls"] for p in store.profiles()) == 40
    assert store.spend_by_provider(0.0) == {"acme": 20.0}


def test_replicas_rolling_up_the_same_day_count_each_entry_once(store: PgOutcomeStore, url: str) -> None:
    """Two replicas compacting one day at once (small chunks, each its own store): every entry is
    taken by one of them, so the day's total stays (a read-then-delete would count some twice)."""
    day0, usd = 20_000 * 86_400.0, 0.125
    with _sql(url) as conn:
        conn.execute(
            "INSERT INTO spend (ts, provider, model_id, usd)"
            " SELECT %s + i * 0.01, 'openai', 'openai/a', %s FROM generate_series(1, 4000) AS i",
            (day0, usd),
        )
    stores = [store, PgOutcomeStore(url)]
    start = threading.Barrier(2)
    taken = [0, 0]

    def left() -> int:
        with _sql(url) as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM spend WHERE ts > %s", (day0,)).fetchall()
            return int(count[0])

    def compact(i: int) -> None:
        start.wait()
        while left():  # 0 from a chunk the other took meanwhile: more may be left
            taken[i] += stores[i].compact_spend(day0 + 86_400, limit=50)

    threads = [threading.Thread(target=compact, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stores[1].close()
    assert sum(taken) == 4000 and min(taken) > 0, taken  # both did part of the work
    assert store.spend_by_provider(day0, day0 + 86_400) == {"openai": pytest.approx(4000 * usd)}
    with _sql(url) as conn:
        rows = conn.execute("SELECT ts FROM spend").fetchall()
    assert {r[0] for r in rows} == {day0}, "only the day's roll-up (or two, when both inserted it)"
