"""Records written after the answer: in order, on the loop's next turn, flushed on demand."""

from __future__ import annotations

import asyncio
import logging

import pytest

from car_inference.engine.bookkeeping import Bookkeeper


async def test_writes_wait_for_the_next_turn_and_keep_their_order() -> None:
    keeper, done = Bookkeeper(), []
    for i in range(3):
        keeper.submit(done.append, i)
    assert done == [], "nothing runs while the caller still holds the loop"
    await asyncio.sleep(0)
    assert done == [0, 1, 2]


async def test_flush_runs_what_is_queued_now() -> None:
    keeper, done = Bookkeeper(), []
    keeper.submit(done.append, "a")
    keeper.flush()
    assert done == ["a"]
    await asyncio.sleep(0)
    assert done == ["a"], "flushed work does not run twice"


def test_without_a_loop_writes_happen_at_once() -> None:
    keeper, done = Bookkeeper(), []
    keeper.submit(done.append, 1)
    assert done == [1]


async def test_a_failing_record_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    keeper, done = Bookkeeper(), []

    def broken() -> None:
        raise RuntimeError("disk full")

    keeper.submit(broken)
    keeper.submit(done.append, "after")
    with caplog.at_level(logging.ERROR, logger="car_inference.engine"):
        keeper.flush()
    assert done == ["after"] and "recording an outcome failed" in caplog.text
