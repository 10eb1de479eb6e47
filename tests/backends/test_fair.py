"""Fair turns between clients on a shared local model: the executor of a library's one thread and
the model lock, with plain functions standing in for model work."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from typing import TypeVar

import pytest

from car_inference.backends.base import run_blocking
from car_inference.backends.fair import CLIENT, FairExecutor, FairLock, FairTurns, step_by_step

T = TypeVar("T")


def as_client(client: str | None, fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` run in a context where the request is ``client``'s."""
    context = contextvars.copy_context()
    context.run(CLIENT.set, client)
    return lambda: context.run(fn)


def submit_as(pool: FairExecutor, client: str, fn: Callable[[], object]) -> Future[object]:
    return as_client(client, lambda: pool.submit(fn))()


def test_turns_go_round_the_waiting_clients_by_time_charged() -> None:
    turns: FairTurns[str] = FairTurns()
    for item in ("a1", "a2", "a3"):
        turns.add("a", item)
    assert turns.pop() == ("a", "a1")
    turns.charge("a", 1.0)
    turns.add("b", "b1")
    turns.add("b", "b2")
    # b arrived level with a's turn in progress and a has had 1 s since: b goes first.
    assert turns.pop() == ("b", "b1")
    turns.charge("b", 0.4)
    assert turns.pop() == ("b", "b2")
    turns.charge("b", 0.4)
    assert turns.pop() == ("a", "a2")  # b at 0.8 would go again, but it has nothing waiting
    turns.charge("a", 1.0)
    assert turns.pop() == ("a", "a3") and turns.pop() is None and len(turns) == 0


def test_idle_time_is_not_banked() -> None:
    """A client idle while another used the model for 100 s starts level with the turn in
    progress, not 100 s ahead of it: the busy client is not then locked out for 100 s."""
    turns: FairTurns[str] = FairTurns()
    for i in range(100):
        turns.add("busy", f"busy{i}")
        assert turns.pop() == ("busy", f"busy{i}")
        turns.charge("busy", 1.0)
    turns.add("busy", "next")
    turns.add("late", "l1")
    turns.add("late", "l2")
    assert turns.pop() == ("busy", "next")  # late starts level with busy: a tie, the earlier waiter
    turns.charge("busy", 1.0)
    assert turns.pop() == ("late", "l1")
    turns.charge("late", 1.0)
    turns.add("busy", "after")
    assert [turns.pop(), turns.pop()] == [("late", "l2"), ("busy", "after")]  # they alternate


def test_after_an_idle_model_past_use_is_not_held_against_anyone() -> None:
    """b used the model for 10 s; later, with the model idle, a and b come at once: they
    alternate (before, a newcomer a had the model until its own 10 s had caught up with b's)."""
    turns: FairTurns[str] = FairTurns()
    turns.add("b", "b-early")
    assert turns.pop() == ("b", "b-early")
    turns.charge("b", 10.0)
    for item in ("a1", "a2"):
        turns.add("a", item)
    turns.add("b", "b1")
    assert turns.pop() == ("a", "a1")
    turns.charge("a", 1.0)
    assert [turns.pop(), turns.pop()] == [("b", "b1"), ("a", "a2")]


def test_a_waiter_can_be_taken_back_and_idle_clients_are_forgotten() -> None:
    turns: FairTurns[object] = FairTurns()
    mine = object()
    turns.add("a", mine)
    assert turns.remove("a", mine) and not turns.remove("a", mine) and turns.pop() is None
    for i in range(1000):
        turns.add(f"c{i}", i)
        turns.pop()
        turns.charge(f"c{i}", 0.0)
    assert len(turns._time) < 100


def test_work_that_resumes_goes_before_its_clients_later_work() -> None:
    """A paused piece of work continues before what its client queued after it, and says whether
    another client waits (what a long generation asks between its steps)."""
    turns: FairTurns[str] = FairTurns()
    assert not turns.others_wait("a")
    turns.add("a", "a-next")
    assert not turns.others_wait("a") and turns.others_wait("b") and turns.others_wait(None)
    turns.add("a", "a-rest", first=True)
    turns.add("b", "b0")
    assert turns.others_wait("a")
    assert [turns.pop(), turns.pop(), turns.pop()] == [("a", "a-rest"), ("a", "a-next"), ("b", "b0")]


def test_the_executor_resumes_paused_work_first_and_says_who_waits() -> None:
    pool = FairExecutor("test-resume")
    started, release, order, seen = threading.Event(), threading.Event(), [], []

    def first() -> None:
        started.set()
        release.wait(5)
        seen.append(pool.others_waiting())  # a's own later work does not count; b's does
        order.append("a0")
        pool.resume(order.append, "a0-rest")

    try:
        submit_as(pool, "a", as_client("a", first))  # as iterate_in_thread runs it: in a's context
        assert started.wait(5)
        submit_as(pool, "a", lambda: order.append("a1"))
        as_client("a", lambda: seen.append(pool.others_waiting()))()
        submit_as(pool, "b", lambda: order.append("b0"))
        release.set()
        submit_as(pool, "b", lambda: None).result(5)
        submit_as(pool, "a", lambda: None).result(5)
    finally:
        pool.shutdown()
    assert seen == [False, True]
    assert order == ["a0", "b0", "a0-rest", "a1"]


def test_the_executor_runs_one_clients_backlog_after_anothers_next_turn() -> None:
    """Client a queues four pieces of work behind one in progress; b's one piece runs next, not
    fifth. Each client's own work keeps its order. One thread runs everything."""
    pool = FairExecutor("test-fair")
    started = threading.Event()
    release = threading.Event()
    order: list[str] = []
    threads: set[str] = set()

    def work(name: str, wait: bool = False) -> Callable[[], object]:
        def run() -> str:
            threads.add(threading.current_thread().name)
            if wait:
                started.set()
                release.wait(5)
            order.append(name)
            return name

        return run

    try:
        futures = [submit_as(pool, "a", work("a0", wait=True))]
        assert started.wait(5)
        futures += [submit_as(pool, "a", work(f"a{i}")) for i in range(1, 5)]
        futures += [submit_as(pool, "b", work("b0"))]
        release.set()
        results = [f.result(5) for f in futures]
    finally:
        pool.shutdown()
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]
    assert results == ["a0", "a1", "a2", "a3", "a4", "b0"] and len(threads) == 1


def test_the_executor_shares_by_time_not_by_count() -> None:
    """After a's 0.2 s piece, b's five quick ones all go before a's next."""
    pool = FairExecutor("test-fair")
    order: list[str] = []
    gate = threading.Event()

    def work(name: str, seconds: float = 0.0) -> Callable[[], None]:
        def run() -> None:
            gate.wait(5)
            time.sleep(seconds)
            order.append(name)

        return run

    try:
        futures = [submit_as(pool, "a", work("a0", 0.2))]
        futures += [submit_as(pool, "a", work("a1", 0.01))]
        futures += [submit_as(pool, "b", work(f"b{i}")) for i in range(5)]
        gate.set()
        for f in futures:
            f.result(5)
    finally:
        pool.shutdown()
    assert order == ["a0", "b0", "b1", "b2", "b3", "b4", "a1"]


def test_the_executor_passes_errors_skips_cancelled_work_and_refuses_after_shutdown() -> None:
    pool = FairExecutor("test-fair")
    gate = threading.Event()
    ran: list[str] = []
    first = pool.submit(gate.wait, 5)
    dropped = pool.submit(ran.append, "dropped")
    failing = pool.submit(lambda: 1 / 0)
    kept = pool.submit(ran.append, "kept")
    assert dropped.cancel()
    gate.set()
    assert first.result(5) is True
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    kept.result(5)
    assert ran == ["kept"]
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(ran.append, "late")


def test_shutdown_can_cancel_what_waits() -> None:
    pool = FairExecutor("test-fair")
    started, gate = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(5)

    running = pool.submit(hold)
    waiting = pool.submit(lambda: "never")
    assert started.wait(5)
    threading.Timer(0.1, gate.set).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result() is True
    with pytest.raises(CancelledError):
        waiting.result(0)


def test_the_lock_hands_over_in_fair_turns() -> None:
    """Threads of client a wait for the lock, then one of b: b gets it after the holder."""
    lock = FairLock()
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def hold(name: str, first: bool = False) -> None:
        with lock:
            if first:
                holding.set()
                release.wait(5)
            order.append(name)

    def waiters(client: str, names: list[str]) -> list[threading.Thread]:
        made = [threading.Thread(target=as_client(client, functools.partial(hold, n))) for n in names]
        for thread in made:
            thread.start()
            while len(lock._turns) < sum(t.is_alive() for t in made):  # queued, in this order
                time.sleep(0.001)
        return made

    holder = threading.Thread(target=as_client("a", lambda: hold("a0", first=True)))
    holder.start()
    assert holding.wait(5)
    threads = waiters("a", ["a1", "a2", "a3"]) + waiters("b", ["b0"])
    release.set()
    for thread in [holder, *threads]:
        thread.join(5)
    assert order == ["a0", "b0", "a1", "a2", "a3"] and not lock.locked()


def test_the_lock_without_blocking_and_with_a_timeout() -> None:
    lock = FairLock()
    assert lock.acquire(blocking=False) and lock.locked()
    assert not lock.acquire(blocking=False)
    start = time.monotonic()
    assert not lock.acquire(timeout=0.05) and time.monotonic() - start >= 0.05
    assert len(lock._turns) == 0  # the waiter that gave up is gone
    threading.Timer(0.05, lock.release).start()
    assert lock.acquire(timeout=5)
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_run_blocking_carries_the_client_to_the_model_thread() -> None:
    token = CLIENT.set("key:abc")
    try:
        assert await run_blocking(CLIENT.get) == "key:abc"
        seen: Future[str | None] = Future()
        await asyncio.get_running_loop().run_in_executor(None, lambda: seen.set_result(CLIENT.get()))
    finally:
        CLIENT.reset(token)
    assert seen.result() is None  # a plain executor call does not carry it: run_blocking does


def test_step_by_step_holds_the_lock_only_while_each_item_is_made() -> None:
    lock = FairLock()
    held: list[bool] = []

    def made() -> Iterator[int]:
        for i in range(3):
            held.append(lock.locked())
            yield i

    seen = []
    for item in step_by_step(made(), lock):
        seen.append((item, lock.locked()))
    assert seen == [(0, False), (1, False), (2, False)] and held == [True, True, True]
    assert not lock.locked()
