"""Shared by the local backends' tests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from car_inference.backends.cache import CachedModel


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
