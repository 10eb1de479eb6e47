"""Shared by the local backends' tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from car_inference.backends.cache import CachedModel
from car_inference.backends.fair import CLIENT


async def cancel_once_started(task: asyncio.Future[Any], entry: CachedModel | None, within_s: float) -> None:
    """Cancel ``task`` (as when its client goes away) once it holds ``entry``'s lock, and check
    that the model is free again within ``within_s``: the work stopped, not only the waiting."""
    assert entry is not None
    while not entry.lock.locked():  # the work has started
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(entry.lock.acquire, timeout=within_s), "the model stayed busy"
    entry.lock.release()


async def finish_order(
    entry_of: Callable[[], CachedModel | None],
    long: Callable[[], Awaitable[object]],
    short: Callable[[], Awaitable[object]],
) -> list[str]:
    """Client "a" sends ``long``; once it holds the model (``entry_of()``'s lock), client "b" sends
    ``short`` (``backends.fair.CLIENT`` says whose each is). The clients in the order their
    requests finished: ["b", "a"] when the model took turns between them."""
    finished: list[str] = []

    async def run_as(client: str, work: Callable[[], Awaitable[object]]) -> None:
        CLIENT.set(client)  # in this task's own context
        await work()
        finished.append(client)

    first = asyncio.create_task(run_as("a", long))
    while (entry := entry_of()) is None or not entry.lock.locked():
        assert not first.done(), "the long request ended before it was seen holding the model"
        await asyncio.sleep(0.002)
    await asyncio.create_task(run_as("b", short))
    await first
    return finished
