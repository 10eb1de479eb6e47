"""Records written after the answer: in order, grouped into one batch, flushed on demand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from car_inference.engine.bookkeeping import WRITER_BATCH, Bookkeeper
from car_inference.routing.store import OutcomeStore


async def test_writes_wait_for_the_next_turn_and_keep_their_order() -> None:
    keeper = Bookkeeper()
    done: list[int] = []
    for i in range(3):
        keeper.submit(done.append, i)
    assert done == [], "nothing runs while the caller still holds the loop"
    await asyncio.sleep(0)
    assert done == [0, 1, 2]


async def test_flush_runs_what_is_queued_now() -> None:
    keeper = Bookkeeper()
    done: list[str] = []
    keeper.submit(done.append, "a")
    keeper.flush()
    assert done == ["a"]
    await asyncio.sleep(0)
    assert done == ["a"], "flushed work does not run twice"


def test_without_a_loop_writes_happen_at_once() -> None:
    keeper = Bookkeeper()
    done: list[int] = []
    keeper.submit(done.append, 1)
    assert done == [1]


async def test_a_failing_record_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    keeper = Bookkeeper()
    done: list[str] = []

    def broken() -> None:
        raise RuntimeError("disk full")

    keeper.submit(broken)
    keeper.submit(done.append, "after")
    with caplog.at_level(logging.ERROR, logger="car_inference.engine"):
        keeper.flush()
    assert done == ["after"] and "recording an outcome failed" in caplog.text


def test_a_batch_whose_commit_fails_keeps_its_records_to_try_again(caplog: pytest.LogCaptureFixture) -> None:
    """A state.db that could not be written (a disk I/O error at the commit) lost the batch's
    records for good: the traces were gone, their feedback a 404, and health said nothing was
    dropped. They wait at the front of the queue now, in order, and are written once it works."""
    written: list[int] = []
    commits = iter([False, False, True])  # the first two commits fail, the third works

    @contextlib.contextmanager
    def batch() -> Iterator[None]:
        mark = len(written)
        yield
        if not next(commits):
            del written[mark:]  # rolled back
            raise sqlite3.OperationalError("disk I/O error")

    keeper = Bookkeeper(batch)
    for i in range(3):
        keeper.submit(written.append, i)  # no loop: each is written (and fails) at once
    with caplog.at_level(logging.WARNING, logger="car_inference.engine"):
        keeper.flush()
    assert written == [0, 1, 2]
    failed = [r for r in caplog.records if "writing a batch of outcome records failed" in r.getMessage()]
    assert len(failed) == 1, "said once for the whole failure"
    assert "outcome records are written again" in caplog.text


async def test_the_writer_groups_the_records_of_its_delay_into_one_batch() -> None:
    batches: list[str] = []
    done: list[int] = []

    @contextlib.contextmanager
    def batch() -> Iterator[None]:
        batches.append("open")
        yield
        batches.append(f"commit {len(done)}")

    keeper = Bookkeeper(batch, delay_s=0.2)
    keeper.start_writer()
    keeper.submit(done.append, 1)
    await asyncio.sleep(0.02)
    keeper.submit(done.append, 2)
    assert done == [], "the first record waits for others to share its commit"
    for _ in range(100):
        if done == [1, 2]:
            break
        await asyncio.sleep(0.02)
    assert done == [1, 2] and batches == ["open", "commit 2"]
    keeper.close()


def test_a_failing_write_is_undone_alone_in_a_store_batch(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "state.db")
    keeper = Bookkeeper(store.batch)

    def half_written() -> None:
        with store._tx() as conn:
            conn.execute("INSERT INTO spend (ts, provider, model_id, usd) VALUES (1.0, 'p', 'm', 5.0)")
            raise RuntimeError("after a write")

    keeper._pending.extend(
        [
            (0.0, store.add_spend, ("p", "m", 1.0, 1.0), {}),
            (0.0, half_written, (), {}),
            (0.0, store.add_spend, ("p", "m", 2.0, 1.0), {}),
        ]
    )
    keeper.flush()
    assert store.spend_by_provider(0.0) == {"p": pytest.approx(3.0)}  # the failed write's 5 was undone
    store.close()


async def test_a_drain_writes_a_chunk_per_loop_turn() -> None:
    done: list[int] = []
    keeper = Bookkeeper(chunk=2)
    for i in range(5):
        keeper.submit(done.append, i)
    await asyncio.sleep(0)
    assert done == [0, 1], "the loop gets a turn between chunks"
    await asyncio.sleep(0)
    assert done == [0, 1, 2, 3]
    await asyncio.sleep(0)
    assert done == [0, 1, 2, 3, 4]
    keeper.submit(done.append, 5)
    keeper.flush()  # an explicit flush writes everything at once
    assert done[-1] == 5


async def test_a_writer_thread_writes_off_the_loop(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "state.db")
    keeper = Bookkeeper(store.batch, delay_s=0.01)
    keeper.start_writer()
    threads: list[str] = []

    def record(usd: float) -> None:
        threads.append(threading.current_thread().name)
        store.add_spend("p", "m", usd, 1.0)

    keeper.submit(record, 1.0)
    keeper.submit(record, 2.0)
    for _ in range(200):  # written by the thread while this loop keeps running
        if len(threads) == 2:
            break
        await asyncio.sleep(0.01)
    assert threads == ["car-inference-records"] * 2
    assert store.spend_by_provider(0.0) == {"p": 3.0}
    keeper.submit(record, 4.0)
    keeper.close()  # stops the thread and writes what is left
    assert store.spend_by_provider(0.0) == {"p": 7.0}
    store.close()


async def test_thread_on_loop_starts_the_writer_for_a_record_made_on_a_loop() -> None:
    """The engine's keeper: a synchronous caller's record is written at once, as before; the first
    made on an event loop starts the writer thread, which writes it and the rest off the loop."""
    keeper = Bookkeeper(thread_on_loop=True)
    threads: list[str] = []

    def record() -> None:
        threads.append(threading.current_thread().name)

    await asyncio.to_thread(keeper.submit, record)  # no loop in that thread: at once, there
    assert len(threads) == 1 and threads[0] != "car-inference-records"
    keeper.submit(record)
    keeper.submit(record)
    for _ in range(200):
        if len(threads) == 3:
            break
        await asyncio.sleep(0.01)
    assert threads[1:] == ["car-inference-records"] * 2
    keeper.close()
    keeper.submit(record)  # after close no thread starts again; the loop writes it
    await asyncio.sleep(0)
    assert threads[3:] == [threading.current_thread().name]


async def test_a_write_locked_state_db_does_not_stall_a_library_callers_loop(tmp_path: Path) -> None:
    """Another program holding state.db's write lock kept the caller's event loop waiting while an
    answer's record waited for it (2.9 s of a 4 s lock; up to the 10 s busy timeout); now the
    writer thread waits, the loop runs on, and the record is written once the lock is let go."""
    import sqlite3

    from car_inference.engine import InferenceEngine
    from car_inference.requests import GenerateParams, GenerateRequest

    engine = InferenceEngine(home=tmp_path)
    request = GenerateRequest(prompt="Hi", params=GenerateParams(max_tokens=2, temperature=0))
    other = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None, check_same_thread=False)
    try:
        await engine.generate(request)  # loads the model
        engine.flush()
        other.execute("BEGIN IMMEDIATE")  # held until the checks below
        result = await engine.generate(request)
        started = time.monotonic()
        for _ in range(5):  # the turns on which the record used to be written on the loop
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 2.0, "the loop waited for the lock"
        assert engine.bookkeeper.pending > 0  # its record waits for the lock, off the loop
        other.execute("COMMIT")
        engine.flush()
        assert engine.store.trace(result.trace_id) is not None
    finally:
        other.close()
        engine.close()


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_writer_that_falls_behind_says_so_and_writes_the_backlog_in_batches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store slower than the answers: ``pending`` and ``lag_s`` show the queue, the writer warns
    once the oldest record is ``warn_after_s`` old, writes the backlog ``WRITER_BATCH`` records per
    commit (each lets go of the store's lock), and says when it has caught up."""
    commits: list[int] = []
    current: list[int] = []

    @contextlib.contextmanager
    def batch() -> Iterator[None]:
        current.clear()
        yield
        commits.append(len(current))

    stuck = threading.Event()

    def hang() -> None:  # the store hangs on the first record
        stuck.wait(10)
        current.append(-1)

    keeper = Bookkeeper(batch, warn_after_s=0.2)
    keeper.start_writer()
    assert (keeper.pending, keeper.lag_s) == (0, 0.0)
    keeper.submit(hang)
    _wait_for(lambda: keeper.pending == 0)
    total = 2 * WRITER_BATCH + 10
    for i in range(total):
        keeper.submit(current.append, i)
    assert keeper.pending == total
    with caplog.at_level(logging.WARNING, logger="car_inference.engine"):
        time.sleep(0.25)
        assert keeper.lag_s >= 0.2
        stuck.set()
        _wait_for(lambda: keeper.pending == 0 and "caught up" in caplog.text)
        keeper.close()
    assert commits == [1, WRITER_BATCH, WRITER_BATCH, 10]
    behind = [r.getMessage() for r in caplog.records if "behind the answers" in r.getMessage()]
    assert len(behind) == 1 and f"({total} waiting)" in behind[0]
    assert keeper.lag_s == 0.0


@pytest.mark.parametrize("pause", [True, False])
def test_a_pausing_writer_lets_the_loop_thread_run_between_its_records(pause: bool) -> None:
    """Records that hold the GIL (Python work, as psycopg's pipelined batches are): a writer that
    pauses lets another thread in about every PAUSE_EVERY_S; one that does not, only when the
    interpreter forces a switch (here made 100 ms long, so the difference is plain)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.1)
    keeper = Bookkeeper(pause=pause)
    try:

        def busy() -> None:  # 2 ms of Python, GIL held
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:
                pass

        keeper.start_writer()
        stuck = threading.Event()
        keeper.submit(stuck.wait, 10)  # the writer's batch starts once all 40 records wait
        _wait_for(lambda: keeper.pending == 0)
        for _ in range(40):
            keeper.submit(busy)
        stuck.set()
        gaps, last = [], time.perf_counter()
        while True:  # this thread's turns while the batch runs: the longest wait between them
            time.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if not keeper.pending:
                break
    finally:
        keeper.close()
        sys.setswitchinterval(interval)
    if pause:
        assert max(gaps) < 0.05, max(gaps)
    else:
        assert max(gaps) >= 0.05, "without pauses the writer holds the GIL until a forced switch"


def test_close_does_not_wait_out_the_writers_delay() -> None:
    """The writer slept ``delay_s`` (a server's record_delay_ms, up to 10 s) before close could
    stop it: SIGTERM took that long. Its records are still written."""
    written: list[int] = []
    keeper = Bookkeeper(contextlib.nullcontext, delay_s=10.0)
    keeper.start_writer()
    keeper.submit(written.append, 1)
    time.sleep(0.1)  # the writer is in its wait
    started = time.monotonic()
    keeper.close()
    assert time.monotonic() - started < 2 and written == [1]
