from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from car_inference.backends.base import iterate_in_thread, label_distribution, ranked_result
from car_inference.requests import RerankRequest


async def test_items_flow_from_the_thread_and_errors_re_raise() -> None:
    def numbers(_: threading.Event) -> Iterator[int]:
        yield from range(5)

    assert [n async for n in iterate_in_thread(numbers)] == [0, 1, 2, 3, 4]

    def broken(_: threading.Event) -> Iterator[int]:
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        async for _ in iterate_in_thread(broken):
            pass


async def test_a_consumer_that_stops_reading_stops_the_producer() -> None:
    produced: list[int] = []
    finished = threading.Event()

    def endless(cancelled: threading.Event) -> Iterator[int]:
        try:
            i = 0
            while not cancelled.is_set():
                produced.append(i)
                yield i
                i += 1
                time.sleep(0.001)
        finally:
            finished.set()

    agen = iterate_in_thread(endless)
    async for n in agen:
        if n == 3:
            break
    await agen.aclose()
    await asyncio.get_running_loop().run_in_executor(None, finished.wait, 5)
    assert finished.is_set()
    count = len(produced)
    await asyncio.sleep(0.05)
    assert len(produced) == count, "nothing is produced after the consumer left"


def test_label_distribution_sums_to_one_sorted() -> None:
    c = label_distribution(["a", "b", "c"], [0.0, 2.0, 1.0], "m", "x")
    assert [r.label for r in c.results] == ["b", "c", "a"]
    assert abs(sum(r.score for r in c.results) - 1) < 1e-9


def test_ranked_result_breaks_ties_by_input_order_and_cuts_top_n() -> None:
    req = RerankRequest(query="q", documents=["a", "b", "c", "d"], top_n=3)
    r = ranked_result(req, [0.5, 0.9, 0.5, 0.1], "m", "x")
    assert [d.index for d in r.ranked] == [1, 0, 2]
