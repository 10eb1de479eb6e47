"""Spend limits shared through a real Redis: two SpendControls with a Fleet each are two replicas.
Reservations make the check atomic: replicas calling at once never pass a limit that only some of
them fit in; a dead replica's reservations lapse; a fresh Redis learns the store's totals."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from car_inference.config import CoordinationSettings, SpendLimit, SpendSettings
from car_inference.errors import SpendLimitExceeded
from car_inference.routing.coord import Fleet
from car_inference.routing.spend import SpendControl
from car_inference.routing.store import OutcomeStore
from fakes.redis_service import RedisServer, closed_port, redis_prefix, redis_url


def _wait(check: Callable[[], bool], limit: float) -> None:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit:
            pytest.fail(f"not within {limit} s")
        time.sleep(0.01)


@pytest.fixture
def coordination() -> CoordinationSettings:
    return CoordinationSettings(redis_url=redis_url(), key_prefix=redis_prefix(), lease_s=0.6)


@pytest.fixture
def fleets(coordination: CoordinationSettings) -> Iterator[list[Fleet]]:
    made = [Fleet(coordination) for _ in range(3)]
    yield made
    for fleet in made:
        fleet.close()


DAILY = SpendSettings(daily_usd=1.0)


def test_a_reservation_holds_the_estimate_for_the_whole_fleet(fleets: list[Fleet]) -> None:
    a, b = SpendControl(DAILY, fleet=fleets[0]), SpendControl(DAILY, fleet=fleets[1])
    held = a.reserve("openai", 0.6)
    assert held is not None
    with pytest.raises(SpendLimitExceeded) as info:
        b.reserve("anthropic", 0.6)  # A's call is still in flight: its estimate counts
    err = info.value
    assert (err.scope, err.period, err.limit_usd) == ("global", "daily", 1.0)
    assert err.spent_usd == pytest.approx(0.6) and err.estimate_usd == 0.6
    a.record("openai", "openai/x", 0.5, reservation=held)  # it cost less than estimated
    assert b.reserve("anthropic", 0.5) is not None  # 0.5 spent + 0.5 = the limit
    with pytest.raises(SpendLimitExceeded):
        a.reserve("openai", 0.01)
    assert b.status().entry("global", "daily").spent_usd == pytest.approx(0.5)  # type: ignore[union-attr]


def test_a_failed_call_gives_its_reservation_back(fleets: list[Fleet]) -> None:
    a, b = SpendControl(DAILY, fleet=fleets[0]), SpendControl(DAILY, fleet=fleets[1])
    held = a.reserve("openai", 0.9)
    with pytest.raises(SpendLimitExceeded):
        b.reserve("openai", 0.2)
    a.release(held)
    assert b.reserve("openai", 0.2) is not None


def test_concurrent_replicas_never_pass_the_limit_together(fleets: list[Fleet]) -> None:
    """30 calls at once from three replicas, each estimated at $0.10, under a $1.00 daily limit:
    exactly ten pass; each then costs its estimate, and the total is the limit, not more."""
    controls = [SpendControl(DAILY, fleet=f) for f in fleets]
    barrier = threading.Barrier(30)
    passed: list[int] = []

    def call(i: int) -> None:
        spend = controls[i % 3]
        barrier.wait()
        try:
            held = spend.reserve("openai", 0.1)
        except SpendLimitExceeded:
            return
        passed.append(i)
        time.sleep(0.01)
        spend.record("openai", "openai/x", 0.1, reservation=held)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) == 10
    status = controls[2].status().entry("global", "daily")
    assert status is not None and status.spent_usd == pytest.approx(1.0)


def test_provider_limits_are_per_provider_across_the_fleet(fleets: list[Fleet]) -> None:
    settings = SpendSettings(providers={"openai": SpendLimit(monthly_usd=2.0)})
    a, b = SpendControl(settings, fleet=fleets[0]), SpendControl(settings, fleet=fleets[1])
    a.record("openai", "openai/x", 1.9)
    a.record("anthropic", "anthropic/y", 50.0)
    with pytest.raises(SpendLimitExceeded) as info:
        b.reserve("OpenAI", 0.2)
    assert (info.value.scope, info.value.period) == ("OpenAI", "monthly")
    assert b.reserve("anthropic", 100.0) is None  # no limit applies: nothing to hold


def test_check_holds_until_the_next_record_for_the_provider(fleets: list[Fleet]) -> None:
    """Callers that use check/record (speech, images) hold their estimate too."""
    a, b = SpendControl(DAILY, fleet=fleets[0]), SpendControl(DAILY, fleet=fleets[1])
    a.check("openai", 0.7)
    with pytest.raises(SpendLimitExceeded):
        b.check("openai", 0.4)
    a.record("openai", "openai/x", 0.2)  # settles the oldest hold: 0.2 spent, nothing held
    b.check("openai", 0.8)


def test_spend_a_caller_reports_settles_no_hold(fleets: list[Fleet]) -> None:
    """engine.report's money was spent on a call we never held an estimate for: it must not
    settle (and so free) the estimate another call in flight holds."""
    a, b = SpendControl(DAILY, fleet=fleets[0]), SpendControl(DAILY, fleet=fleets[1])
    a.check("openai", 0.7)
    a.record("openai", "openai/x", 0.1, settles=False)  # 0.1 spent, the 0.7 still held
    with pytest.raises(SpendLimitExceeded):
        b.check("openai", 0.3)
    b.check("openai", 0.2)


def test_a_dead_replicas_reservations_lapse_after_the_lease(
    coordination: CoordinationSettings, fleets: list[Fleet]
) -> None:
    dying = Fleet(coordination)
    doomed = SpendControl(DAILY, fleet=dying)
    assert doomed.reserve("openai", 0.9) is not None
    dying._stop.set()  # kill -9: no heartbeat, no clean-up
    for thread in dying._threads:
        thread.join()
    b = SpendControl(DAILY, fleet=fleets[1])
    with pytest.raises(SpendLimitExceeded):
        b.reserve("openai", 0.2)
    started = time.monotonic()
    _wait(lambda: not b.would_exceed("openai", 0.2) and _passes(b, 0.2), limit=2.0)
    assert time.monotonic() - started <= coordination.lease_s + 0.5


def _passes(spend: SpendControl, usd: float) -> bool:
    try:
        held = spend.reserve("openai", usd)
    except SpendLimitExceeded:
        return False
    spend.release(held)
    return True


def test_a_fresh_redis_learns_the_stores_totals(fleets: list[Fleet], tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "state.db")
    try:
        SpendControl(DAILY, store).record("openai", "openai/x", 0.8)  # before the fleet existed
        spend = SpendControl(DAILY, store, fleet=fleets[0])
        with pytest.raises(SpendLimitExceeded) as info:
            spend.reserve("openai", 0.3)
        assert info.value.spent_usd == pytest.approx(0.8)
        other = SpendControl(DAILY, fleet=fleets[1])  # no store of its own: Redis has the total
        with pytest.raises(SpendLimitExceeded):
            other.reserve("anthropic", 0.3)
    finally:
        store.close()


def test_unreachable_redis_falls_back_to_the_local_check(caplog: pytest.LogCaptureFixture) -> None:
    coordination = CoordinationSettings(
        redis_url=f"redis://127.0.0.1:{closed_port()}/0", key_prefix=redis_prefix(), timeout_ms=200
    )
    with caplog.at_level(logging.WARNING, logger="car_inference.routing.coord"):
        fleet = Fleet(coordination)
        try:
            spend = SpendControl(DAILY, fleet=fleet)
            held = spend.reserve("openai", 0.6)  # checked and held here, not in Redis
            assert held is not None and held.local
            spend.record("openai", "openai/x", 0.6, reservation=held)
            with pytest.raises(SpendLimitExceeded):
                spend.check("openai", 0.5)
        finally:
            fleet.close()
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


def test_spend_sharing_resumes_when_redis_returns() -> None:
    server = RedisServer()
    server.start()
    coordination = CoordinationSettings(redis_url=server.url, timeout_ms=200)
    fa, fb = Fleet(coordination), Fleet(coordination)
    a, b = SpendControl(DAILY, fleet=fa), SpendControl(DAILY, fleet=fb)
    try:
        a.record("openai", "openai/x", 0.3)
        server.stop()
        _wait(lambda: not fa.reachable and not fb.reachable, limit=2.0)
        held = a.reserve("openai", 0.5)  # local check: requests keep passing
        assert held is not None and held.local
        a.record("openai", "openai/x", 0.5, reservation=held)
        server.start()  # an empty Redis (no persistence): A seeds it from what it counted
        _wait(lambda: fa.reachable and fb.reachable, limit=3.0)
        assert a.reserve("openai", 0.1) is not None  # 0.8 seeded + 0.1 held
        with pytest.raises(SpendLimitExceeded) as info:
            b.reserve("openai", 0.2)
        assert info.value.spent_usd == pytest.approx(0.9)
    finally:
        fa.close()
        fb.close()
        server.stop()
