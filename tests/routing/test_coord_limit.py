"""The fleet's concurrency bound in a real Redis: two FleetLimiters are two replicas' guards."""

from __future__ import annotations

import asyncio
import time

from car_inference.config import CoordinationSettings
from car_inference.routing.coord import Fleet
from car_inference.routing.coord_limit import FleetLimiter
from fakes.redis_service import closed_port, redis_prefix, redis_url


async def test_slots_are_shared_given_back_and_lapse_with_a_dead_replica() -> None:
    settings = CoordinationSettings(redis_url=redis_url(), key_prefix=redis_prefix(), lease_s=0.6)
    fa, fb = Fleet(settings), Fleet(settings)
    la, lb = FleetLimiter(fa, 2), FleetLimiter(fb, 2)
    try:
        assert await la.acquire() is True
        assert await lb.acquire() is True
        assert await la.acquire() is False and await lb.acquire() is False  # two in flight: full
        assert lb.fleet_in_flight == 2
        lb.release(True)
        await asyncio.sleep(0.05)  # the release runs in a task of its own
        assert await la.acquire() is True  # A now holds both
        assert la.held == 2
        await asyncio.sleep(0.5)  # the heartbeat keeps a live replica's slots past its lease
        assert await lb.acquire() is False
        assert la._beat is not None
        la._beat.cancel()  # A dies (kill -9): no heartbeat, no release
        started = time.monotonic()
        while await lb.acquire() is not True:
            assert time.monotonic() - started < settings.lease_s + 0.5, "A's slots never lapsed"
            await asyncio.sleep(0.05)
    finally:
        await la.aclose()
        await lb.aclose()
        fa.close()
        fb.close()


async def test_a_lost_give_back_is_set_right_by_the_heartbeat() -> None:
    """A release whose DECR a Redis blip lost left the counter one high, and the heartbeat only
    renewed it: the fleet answered server_busy for good. The count held here is written."""
    settings = CoordinationSettings(redis_url=redis_url(), key_prefix=redis_prefix(), lease_s=0.6)
    fa, fb = Fleet(settings), Fleet(settings)
    la, lb = FleetLimiter(fa, 2), FleetLimiter(fb, 2)
    try:
        assert await la.acquire() is True and await la.acquire() is True
        assert await lb.acquire() is False
        la.held -= 1  # what a release leaves when its DECR never reached Redis
        started = time.monotonic()
        while await lb.acquire() is not True:
            assert time.monotonic() - started < settings.lease_s, "the lost slot stayed taken"
            await asyncio.sleep(0.05)
        assert la.held == 1 and await la.acquire() is False  # A's one and B's one: full
    finally:
        await la.aclose()
        await lb.aclose()
        fa.close()
        fb.close()


async def test_without_redis_nothing_is_counted() -> None:
    settings = CoordinationSettings(
        redis_url=f"redis://127.0.0.1:{closed_port()}/0", key_prefix=redis_prefix(), timeout_ms=200
    )
    fleet = Fleet(settings)
    limiter = FleetLimiter(fleet, 1)
    try:
        assert [await limiter.acquire() for _ in range(3)] == [None, None, None]  # the local bound only
        limiter.release(None)
        assert limiter.held == 0
    finally:
        await limiter.aclose()
        fleet.close()
