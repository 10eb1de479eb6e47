from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from car_inference.errors import ConfigError, StateUnavailable
from car_inference.routing.store import SCHEMA_VERSION, OutcomeStore, TraceRow
from car_inference.routing.store_api import StateStore, open_store
from fakes.services import postgres_schema_url

WORKERS = 2
ROUNDS = 250


# Where a store lives: (the [state] url, the SQLite path used when it is None).
Location = tuple[str | None, str]


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """The behaviours both stores share run on each (PostgreSQL: a schema of this test's own)."""
    db = str(tmp_path / "state.db")
    return (postgres_schema_url(), db) if request.param == "postgresql" else (None, db)


def _open(location: Location) -> StateStore:
    return open_store(location[0], Path(location[1]))


def _row(
    trace_id: str,
    model: str = "p/m",
    family: str = "code",
    prompt_hash: str | None = None,
    started_at: float = 1.0,
) -> TraceRow:
    return TraceRow(trace_id, model, "generate", family, "latin-short", "test", prompt_hash, started_at)


def test_schema_is_versioned_and_wal(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with OutcomeStore(db) as store:
        assert store.schema_version == SCHEMA_VERSION
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"profiles", "task_stats", "traces", "feedback", "spend"} <= tables


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    OutcomeStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="newer"):
        OutcomeStore(db)


def test_a_table_dropped_by_hand_is_back_after_a_restart(tmp_path: Path) -> None:
    """The health report says "a restart re-creates missing tables": it did not (the current
    schema ran nothing), and every feedback failed until the table was made by hand."""
    db = tmp_path / "state.db"
    OutcomeStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE feedback")
    conn.commit()
    conn.close()
    with OutcomeStore(db) as store:
        assert store.schema_problem() is None


def _downgrade(db: Path, version: int) -> None:
    """Make a current file look as an older version wrote it: schema 4 had no store ids, schema 3
    no joined_at either, schema 2 the residual sums too, schema 1 no answer lengths per context
    either."""
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE store_identity")
    conn.execute("DROP TABLE merged_stores")
    if version <= 3:
        conn.execute("ALTER TABLE task_stats DROP COLUMN joined_at")
    if version <= 2:
        conn.execute("ALTER TABLE profiles ADD COLUMN resid_sum REAL NOT NULL DEFAULT 0")
        conn.execute("ALTER TABLE task_stats ADD COLUMN resid_sum REAL NOT NULL DEFAULT 0")
    if version == 1:
        conn.execute("ALTER TABLE task_stats DROP COLUMN total_output_tokens")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_database_is_migrated_in_place(tmp_path: Path, version: int) -> None:
    """Schema 1 had no answer lengths per context (the column is added), schema 2 kept residual
    sums nothing reads (dropped), schema 3 no joined_at (added: 0, every model joined at the
    start), schema 4 no store ids (the tables are added); the rows stay."""
    db = tmp_path / "state.db"
    with OutcomeStore(db) as store:
        store.record_trace(_row("t1"), success=True, latency_ms=10.0, output_tokens=7)
    _downgrade(db, version)
    with OutcomeStore(db) as store:
        assert store.schema_version == SCHEMA_VERSION == 5
        rows = {r["key"]: r for r in store.task_stats() if r["model_id"] == "p/m"}
        assert rows["code"]["calls"] == 1 and "resid_sum" not in rows["code"]
        assert rows["code"]["joined_at"] == 0
        assert rows["code"]["total_output_tokens"] == (0 if version == 1 else 7)
        assert "resid_sum" not in store.profiles()[0]
        assert len(store.store_id()) == 32 and store.store_id() == store.store_id()
        store.record_trace(_row("t2"), success=True, latency_ms=10.0, output_tokens=5)
        rows = {r["key"]: r for r in store.task_stats() if r["model_id"] == "p/m"}
        assert rows["code"]["calls"] == 2 and rows["code"]["total_output_tokens"] == (
            5 if version == 1 else 12
        )


def test_finish_counts_once_and_feeds_profiles_and_task_stats(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        store.start_trace(_row("t1"))
        done = store.finish_trace("t1", success=True, latency_ms=120, input_tokens=10, output_tokens=5)
        assert done is not None and done[1] == 1.0
        assert store.finish_trace("t1", success=False) is None  # already counted
        assert store.finish_trace("nope", success=True) is None
        (profile,) = store.profiles()
        assert (profile["total_calls"], profile["success_count"], profile["total_latency_ms"]) == (1, 1, 120)
        keys = {(r["model_id"], r["key"]): r for r in store.task_stats()}
        assert keys[("p/m", "code")]["calls"] == 1
        assert keys[("p/m", "code|latin-short")]["calls"] == 1


def test_feedback_replaces_and_signals_lower_quality(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        store.start_trace(_row("t1"))
        store.adjust_quality("t1", "quick_retry", 0.5, explicit=False)  # before completion: remembered
        _, quality = store.finish_trace("t1", success=True) or (None, None)
        assert quality == 0.5
        change = store.adjust_quality("t1", "explicit", 0.9, explicit=True)
        assert change is not None and change.old == 0.5 and change.new == 0.9
        assert store.adjust_quality("t1", "empty_response", 1.0, explicit=False) is None  # explicit wins
        (profile,) = store.profiles()
        assert profile["quality_sum"] == pytest.approx(0.9)
        assert [f["kind"] for f in store.feedback_for("t1")] == ["quick_retry", "explicit", "empty_response"]


def test_prune_takes_the_oldest_traces_a_chunk_at_a_time(location: Location) -> None:
    """``limit``: the oldest traces first, their feedback with them; counters stay."""
    with contextlib.closing(_open(location)) as store:
        for i, started in enumerate((50.0, 10.0, 30.0, 20.0, 500.0)):
            store.record_trace(_row(f"t{i}", started_at=started), success=True, score=0.5)
        assert store.prune_traces(older_than=100.0, limit=2) == 2
        assert [store.trace(f"t{i}") is not None for i in range(5)] == [True, False, True, False, True]
        assert store.feedback_for("t1") == [] and len(store.feedback_for("t0")) == 1
        assert store.prune_traces(older_than=100.0, limit=2) == 2
        assert store.prune_traces(older_than=100.0, limit=2) == 0
        assert store.trace("t4") is not None
        (profile,) = store.profiles()
        assert profile["total_calls"] == 5


def test_forget_templates_deletes_dormant_templates_whole_oldest_first(location: Location) -> None:
    """A template goes when none of its rows (any model's, the baseline's) was updated since the
    cutoff; the rows under the family rules' keys are never touched."""
    with contextlib.closing(_open(location)) as store:
        for i, (model, cluster, now) in enumerate(
            [
                ("p/a", "coarse/pold", 100.0), ("p/b", "coarse/pold", 110.0),  # dormant
                ("p/a", "coarse/pmid", 120.0),  # dormant, newer
                ("p/a", "coarse/plive", 50.0), ("p/b", "coarse/plive", 300.0),  # one row recent
                ("p/a", "latin-short", 10.0),  # the family rules' keys
            ]
        ):  # fmt: skip
            row = TraceRow(f"t{i}", model, "generate", "code", cluster, "test", None, 1.0)
            store.record_trace(row, success=True, now=now)
        keys = {r["key"] for r in store.task_stats()}
        assert store.forget_templates(200.0, limit=1) == ["template|pold"]
        assert store.forget_templates(200.0) == ["template|pmid"]
        assert store.forget_templates(200.0) == []
        assert {r["key"] for r in store.task_stats()} == keys - {"template|pold", "template|pmid"}
        live = [r for r in store.task_stats() if r["key"] == "template|plive"]
        assert {r["model_id"] for r in live} == {"p/a", "p/b", "*"}
        assert store.forget_templates(400.0) == ["template|plive"]
        assert {r["key"] for r in store.task_stats()} == {"code", "code|latin-short"}
        (profile_a, _profile_b) = store.profiles()
        assert profile_a["total_calls"] == 4, "a model's totals stay"


def test_a_row_records_how_far_into_its_contexts_life_its_model_joined(location: Location) -> None:
    """``joined_at``: the key's baseline calls before the row's first outcome, set once, in a
    batch as alone (the baseline rows of an outcome are counted after its model's rows)."""
    with contextlib.closing(_open(location)) as store:
        for i in range(3):
            store.record_trace(_row(f"a{i}", "p/a"), success=True)
        with store.batch():
            store.record_trace(_row("b0", "p/b"), success=True)
            store.record_trace(_row("a3", "p/a"), success=True)
            store.record_trace(_row("c0", "p/c"), success=True)
        store.record_trace(_row("d0", "p/d", family="math"), success=True)
        joined = {
            (r["model_id"], r["key"]): r["joined_at"] for r in store.task_stats() if r["model_id"] != "*"
        }
        assert joined == {
            ("p/a", "code"): 0, ("p/a", "code|latin-short"): 0, ("p/b", "code"): 3,
            ("p/b", "code|latin-short"): 3, ("p/c", "code"): 5, ("p/c", "code|latin-short"): 5,
            ("p/d", "math"): 0, ("p/d", "math|latin-short"): 0,
        }  # fmt: skip


def test_forget_model_deletes_its_profile_and_rows_and_nothing_else(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        store.record_trace(_row("a", "p/a"), success=True)
        store.record_trace(_row("b", "p/b", family="math"), success=True)
        store.record_trace(_row("a2", "p/a", family="math"), success=True)
        assert store.forget_model("p/a") == 5  # its profile and its rows under four keys
        assert [p["model_id"] for p in store.profiles()] == ["p/b"]
        rows = {(r["model_id"], r["key"]): r["calls"] for r in store.task_stats()}
        assert not any(m == "p/a" for m, _ in rows)
        assert rows[("*", "code")] == 1 and rows[("*", "math")] == 2, "the baselines keep its outcomes"
        assert store.trace("a") is not None, "and its traces stay"
        assert store.forget_model("p/a") == 0


def test_recent_latencies_are_each_models_newest_successes_oldest_first(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        for i, (model, ok, done) in enumerate(
            [
                ("p/a", True, 5.0),
                ("p/a", True, 3.0),
                ("p/a", False, 9.0),
                ("p/a", True, 7.0),
                ("p/b", True, 1.0),
            ]
        ):
            store.record_trace(_row(f"t{i}", model), success=ok, latency_ms=10.0 * (i + 1), now=done)
        store.start_trace(_row("pending", "p/c"))  # nothing finished: no window
        assert store.recent_latencies(limit_per_model=2) == {"p/a": [10.0, 40.0], "p/b": [50.0]}
        assert store.recent_latencies()["p/a"] == [20.0, 10.0, 40.0]


def test_task_stats_since_a_time_are_the_rows_written_from_then_on(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        store.record_trace(_row("a", "p/a"), success=True, now=100.0)
        store.record_trace(_row("b", "p/b", family="math"), success=True, now=200.0)
        assert len(store.task_stats()) == len(store.task_stats(since=0.0)) > 0
        recent = store.task_stats(since=150.0)
        assert recent and {r["model_id"] for r in recent} == {"p/b", "*"}
        assert all(r["updated_at"] == 200.0 for r in recent) and store.task_stats(since=201.0) == []


def test_quick_retry_lookup_and_prune(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        assert store.start_trace(_row("a", prompt_hash="h", started_at=100.0), retry_window_s=120) is None
        assert store.start_trace(_row("b", prompt_hash="h", started_at=150.0), retry_window_s=120) == "a"
        assert store.start_trace(_row("c", prompt_hash="h", started_at=400.0), retry_window_s=120) is None
        assert store.prune_traces(older_than=300.0) == 2
        assert store.trace("a") is None and store.trace("c") is not None
        with store.batch():  # in a batch (PostgreSQL: pipelined, the row read after the write's sync)
            first = store.record_trace(
                _row("d", prompt_hash="h", started_at=450.0), success=True, retry_window_s=120
            )
            again = store.record_trace(
                _row("e", prompt_hash="h", started_at=460.0), success=False, retry_window_s=120
            )
            alone = store.record_trace(
                _row("f", prompt_hash="k", started_at=460.0), success=True, retry_window_s=120
            )
        assert (first, again, alone) == (("c", 1.0), ("d", 0.0), (None, 1.0))


def _hammer(location: Location, worker: int, rounds: int) -> None:
    store = _open(location)
    for i in range(rounds):
        trace_id = f"w{worker}-{i}"
        store.start_trace(_row(trace_id, family="code" if i % 2 else "math"))
        store.finish_trace(trace_id, success=i % 3 != 0, latency_ms=10.0, input_tokens=3, output_tokens=2)
        if i % 5 == 0:
            store.adjust_quality(trace_id, "explicit", 0.25, explicit=True)
        store.add_spend("openai", "p/m", 0.01)
    store.close()


def _context() -> multiprocessing.context.ForkContext | multiprocessing.context.SpawnContext:
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def test_two_processes_never_lose_updates(location: Location) -> None:
    _open(location).close()
    ctx = _context()
    procs = [ctx.Process(target=_hammer, args=(location, w, ROUNDS)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with contextlib.closing(_open(location)) as store:
        (profile,) = store.profiles()
        total = WORKERS * ROUNDS
        successes = WORKERS * sum(1 for i in range(ROUNDS) if i % 3 != 0)
        assert profile["total_calls"] == total
        assert profile["success_count"] == successes
        assert profile["fail_count"] == total - successes
        assert profile["total_input_tokens"] == 3 * total
        assert profile["total_latency_ms"] == pytest.approx(10.0 * total)
        # Quality: every trace is 1 or 0, except every fifth, which explicit feedback set to 0.25.
        expected_quality = WORKERS * sum(
            0.25 if i % 5 == 0 else (1.0 if i % 3 != 0 else 0.0) for i in range(ROUNDS)
        )
        assert profile["quality_sum"] == pytest.approx(expected_quality)
        stats = {r["key"]: r["calls"] for r in store.task_stats()}
        assert stats["code"] + stats["math"] == total
        assert store.spend_by_provider(0.0)["openai"] == pytest.approx(0.01 * total)


def _write_forever(db: str) -> None:
    store = OutcomeStore(db)
    i = 0
    while True:
        store.start_trace(_row(f"k{i}"))
        store.finish_trace(f"k{i}", success=True, latency_ms=1.0)
        i += 1


def test_a_killed_writer_leaves_a_consistent_database(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    OutcomeStore(db).close()
    proc = _context().Process(target=_write_forever, args=(db,))
    proc.start()
    time.sleep(1.0)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    completed = conn.execute("SELECT COUNT(*) FROM traces WHERE outcome = 'success'").fetchone()[0]
    calls = conn.execute("SELECT total_calls FROM profiles").fetchone()[0]
    assert completed > 0 and calls == completed  # every counted call is one completed trace, and back


def test_rolled_back_transaction_changes_nothing(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        store.start_trace(_row("t1"))
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            store.start_trace(_row("t1"))  # duplicate id: the whole transaction rolls back
        store.finish_trace("t1", success=True)
        assert store.profiles()[0]["total_calls"] == 1


def test_spend_by_provider_window(location: Location) -> None:
    with contextlib.closing(_open(location)) as store:
        store.add_spend("openai", "openai/a", 1.0, ts=100.0)
        store.add_spend("openai", "openai/a", 2.0, ts=200.0)
        store.add_spend("anthropic", "anthropic/b", 4.0, ts=200.0)
        assert store.spend_by_provider(150.0) == {"openai": 2.0, "anthropic": 4.0}
        assert store.spend_by_provider(0.0, 150.0) == {"openai": 1.0}


DAY = 86_400.0
D0 = 20_000 * DAY  # a midnight UTC (2024-10-04)


def _spend_rows(store: StateStore) -> list[tuple[float, str, str]]:
    return sorted((r["ts"], r["provider"], r["model_id"]) for r in _all_spend(store))


def _all_spend(store: StateStore) -> list[dict[str, Any]]:
    with store._read() as conn:  # type: ignore[attr-defined]  # both stores read rows as dicts
        return list(conn.execute("SELECT ts, provider, model_id, usd FROM spend"))


def test_compact_spend_rolls_past_days_up_and_keeps_every_total(location: Location) -> None:
    """A chunk at a time, oldest day first: one entry per day, provider and model at the day's
    midnight; every day's and month's totals as before; entries from ``before`` on untouched."""
    entries = [
        (D0 + 5.0, "openai", "openai/a", 0.25), (D0 + 7.0, "openai", "openai/a", 0.5),
        (D0 + 9.0, "openai", "openai/b", 1.0), (D0 + 11.0, "anthropic", "anthropic/c", 2.0),
        (D0 + DAY - 1.0, "openai", "openai/a", 4.0),  # the day's last second
        (D0 + DAY + 3.0, "openai", "openai/a", 8.0), (D0 + DAY + 4.0, "openai", "openai/a", 16.0),
        (D0 + 2 * DAY + 1.0, "openai", "openai/a", 32.0),  # "today": stays as it is
    ]  # fmt: skip
    with contextlib.closing(_open(location)) as store:
        for ts, provider, model, usd in entries:
            store.add_spend(provider, model, usd, ts=ts)
        windows = [(D0, D0 + DAY), (D0 + DAY, D0 + 2 * DAY), (D0, D0 + 31 * DAY), (0.0, None)]
        before = [store.spend_by_provider(a, b) for a, b in windows]
        today = D0 + 2 * DAY
        assert store.compact_spend(today, limit=3) == 3  # the first day's three oldest
        assert store.compact_spend(today, limit=3) == 2  # the rest of that day
        assert store.compact_spend(today, limit=3) == 2  # the second day
        assert store.compact_spend(today, limit=3) == 0  # nothing left: roll-ups are not taken again
        assert [store.spend_by_provider(a, b) for a, b in windows] == before
        assert _spend_rows(store) == [
            (D0, "anthropic", "anthropic/c"), (D0, "openai", "openai/a"), (D0, "openai", "openai/b"),
            (D0 + DAY, "openai", "openai/a"), (D0 + 2 * DAY + 1.0, "openai", "openai/a"),
        ]  # fmt: skip
        # a late entry for a rolled-up day (a replayed buffer) joins that day's roll-up
        store.add_spend("openai", "openai/a", 64.0, ts=D0 + 100.0)
        assert store.compact_spend(today) == 1 and store.compact_spend(today) == 0
        assert len(_all_spend(store)) == 5
        assert store.spend_by_provider(D0, D0 + DAY)["openai"] == pytest.approx(69.75)


def test_batch_commits_once_and_is_invisible_until_then(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with OutcomeStore(db) as store:
        other = sqlite3.connect(db)
        with store.batch():
            store.add_spend("p", "m", 1.0, 1.0)
            with store.batch():  # nested: joins the outer transaction
                store.add_spend("p", "m", 2.0, 1.0)
            assert other.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == 0
        assert other.execute("SELECT SUM(usd) FROM spend").fetchone()[0] == 3.0
        with pytest.raises(RuntimeError), store.batch():
            store.add_spend("p", "m", 4.0, 1.0)
            raise RuntimeError("the batch itself fails")
        assert store.spend_by_provider(0.0) == {"p": 3.0}
        store.add_spend("p", "m", 1.0, 1.0)  # plain transactions work again after a batch
        assert store.spend_by_provider(0.0) == {"p": 4.0}
        other.close()


@pytest.mark.parametrize("content", [b"hello", b"\x00\xff" * 4096])
def test_a_file_that_is_not_a_database_is_named_and_left_as_it_is(tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(content)
    with pytest.raises(ConfigError, match=r"state\.db: the learned-state database cannot be read") as info:
        OutcomeStore(db)
    assert "move it aside" in str(info.value) and db.read_bytes() == content


def test_a_database_locked_past_the_timeout_says_so(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    OutcomeStore(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ConfigError, match="locked by another process"):
            OutcomeStore(db, busy_timeout_ms=200)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    OutcomeStore(db).close()  # free again: it opens


def test_a_write_locked_out_past_the_timeout_is_state_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    """``report`` and ``feedback`` raised sqlite3's own "database is locked" at their caller."""
    db = tmp_path / "state.db"
    store = OutcomeStore(db, busy_timeout_ms=200)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another program's write transaction
    row = TraceRow("t1", "p/a", "generate", "code", None, "test", None, 1.0)
    try:
        with pytest.raises(StateUnavailable, match=f"{db} is locked by another process") as info:
            store.record_trace(row, success=True, latency_ms=10.0)
        assert info.value.retry_after == 0.2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.trace("t1") is None, "nothing was written"
    store.record_trace(row, success=True, latency_ms=10.0)  # free again: written
    assert store.trace("t1") is not None
    store.close()


def test_a_home_that_cannot_be_written_is_said_so_not_called_damage(tmp_path: Path) -> None:
    """A read-only CAR_HOME was reported as a database that "cannot be read ... move it aside or
    restore it from a backup": advice that could lose the learned state. Read-only through a bind
    mount in a mount namespace of its own (root ignores file modes), where `unshare` may do so."""
    import shutil
    import subprocess
    import sys

    OutcomeStore(tmp_path / "state.db").close()
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    code = (
        "from car_inference.routing.store import OutcomeStore\n"
        f"OutcomeStore({str(tmp_path / 'state.db')!r})\n"
    )
    script = (
        f"mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path}"
        f' && exec {sys.executable} -c "$CODE"'
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "CODE": code},
    )
    if "mount" in done.stderr and "ConfigError" not in done.stderr:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()[:200]}")
    assert f"{tmp_path} is not writable" in done.stderr and "backup" not in done.stderr, done.stderr
