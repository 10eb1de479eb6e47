"""Circuit breakers shared through a real Redis: two registries are two replicas."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from car_inference.config import BreakerSettings, CarConfig, CoordinationSettings, load_config
from car_inference.errors import ConfigError
from car_inference.routing.breaker import CircuitBreakerRegistry, CircuitState
from car_inference.routing.breaker_redis import RedisBreakerRegistry, circuit_breakers
from fakes.redis_service import RedisServer, closed_port, redis_prefix, redis_url

COOLDOWN = 0.4
FRESH = 0.3  # a refresh (50 ms) or two, with room for a busy machine; the 100 ms bound is tested once


def _wait(check: Callable[[], object], limit: float) -> float:
    """Seconds until ``check()`` holds; fails past ``limit``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit:
            pytest.fail(f"not within {limit} s")
        time.sleep(0.002)
    return time.monotonic() - started


@pytest.fixture
def fleet() -> Iterator[tuple[RedisBreakerRegistry, RedisBreakerRegistry]]:
    """Two replicas' registries on one Redis, under a key prefix of this test's own."""
    coordination = CoordinationSettings(redis_url=redis_url(), key_prefix=redis_prefix())
    settings = BreakerSettings(failure_threshold=3, cooldown_s=COOLDOWN)
    a, b = RedisBreakerRegistry(settings, coordination), RedisBreakerRegistry(settings, coordination)
    yield a, b
    a.close()
    b.close()


def test_failures_on_one_replica_stop_the_other_within_100ms(
    fleet: tuple[RedisBreakerRegistry, RedisBreakerRegistry],
) -> None:
    a, b = fleet
    a.record_failure("p/m")
    b.record_failure("p/m")  # consecutive failures count across the fleet
    time.sleep(0.15)
    assert b.blocked() == {} and b.allow("p/m")
    assert b.snapshot()["p/m"]["consecutive_failures"] == 2
    a.record_failure("p/m")
    assert a.blocked() == {"p/m": CircuitState.OPEN} and not a.allow("p/m")  # at once on A
    took = _wait(lambda: b.blocked() == {"p/m": CircuitState.OPEN}, limit=0.1)
    assert not b.allow("p/m") and not b.would_allow("p/m")
    assert b.state("p/m") is CircuitState.OPEN
    row = b.snapshot()["p/m"]
    assert row["state"] == "open" and row["times_opened"] == 1 and 0 < row["retry_in_s"] <= COOLDOWN
    print(f"B refused {took * 1000:.1f} ms after A opened the breaker")


def test_one_probe_across_the_fleet_then_success_closes_for_both(
    fleet: tuple[RedisBreakerRegistry, RedisBreakerRegistry],
) -> None:
    a, b = fleet
    for _ in range(3):
        a.record_failure("p/m")
    _wait(lambda: b.state("p/m") is CircuitState.OPEN, limit=FRESH)
    _wait(lambda: a.state("p/m") is CircuitState.HALF_OPEN and b.state("p/m") is CircuitState.HALF_OPEN, 1.0)
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def claim(name: str, registry: RedisBreakerRegistry) -> None:
        barrier.wait()
        results.append((name, registry.allow("p/m")))

    threads = [threading.Thread(target=claim, args=(n, r)) for n, r in [("a", a), ("b", b)] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [name for name, ok in results if ok]
    assert len(winners) == 1, results
    prober, other = (a, b) if winners[0] == "a" else (b, a)
    _wait(lambda: other.blocked() == {"p/m": CircuitState.HALF_OPEN}, limit=FRESH)  # the probe is out
    assert not other.allow("p/m")
    prober.record_success("p/m")
    assert prober.blocked() == {} and prober.allow("p/m")
    _wait(lambda: other.blocked() == {} and other.state("p/m") is CircuitState.CLOSED, limit=FRESH)
    assert other.allow("p/m")
    for r in (a, b):  # a replica that never called the model has no row: closed as well
        assert r.snapshot().get("p/m", {}).get("consecutive_failures", 0) == 0


def test_a_failed_probe_reopens_for_the_fleet_and_a_released_probe_goes_to_the_next(
    fleet: tuple[RedisBreakerRegistry, RedisBreakerRegistry],
) -> None:
    a, b = fleet
    for _ in range(3):
        b.record_failure("p/m")
    _wait(lambda: a.state("p/m") is CircuitState.HALF_OPEN, limit=1.0)
    assert a.allow("p/m")
    a.record_failure("p/m", weight=0)  # the request's own fault: the probe is handed on
    _wait(lambda: b.would_allow("p/m"), limit=FRESH)
    assert b.allow("p/m")
    b.record_failure("p/m")  # the probe failed: open again, for both
    assert b.state("p/m") is CircuitState.OPEN
    _wait(lambda: a.state("p/m") is CircuitState.OPEN, limit=FRESH)
    assert a.snapshot()["p/m"]["times_opened"] == 2


def test_a_probe_that_never_reports_is_given_up(
    fleet: tuple[RedisBreakerRegistry, RedisBreakerRegistry],
) -> None:
    a, b = fleet
    for _ in range(3):
        a.record_failure("p/m")
    _wait(lambda: a.state("p/m") is CircuitState.HALF_OPEN, limit=1.0)
    assert a.allow("p/m")  # A's caller dies with the probe: nothing is ever recorded
    _wait(lambda: not b.would_allow("p/m"), limit=FRESH)
    # The claim expires after max(cooldown, 1 s); then any replica, A included, probes again.
    took = _wait(lambda: a.allow("p/m"), limit=1.5)
    assert took > 0.5
    assert not b.allow("p/m")


def test_reset_closes_for_the_fleet(fleet: tuple[RedisBreakerRegistry, RedisBreakerRegistry]) -> None:
    a, b = fleet
    for _ in range(3):
        a.record_failure("p/m")
    _wait(lambda: "p/m" in b.blocked(), limit=FRESH)
    a.reset("p/m")
    assert a.blocked() == {}
    _wait(lambda: b.blocked() == {} and b.allow("p/m"), limit=FRESH)


def test_a_healthy_model_costs_no_redis_call(
    fleet: tuple[RedisBreakerRegistry, RedisBreakerRegistry],
) -> None:
    a, _ = fleet
    calls: list[str] = []
    real = a._redis.execute_command

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(str(args[0]))
        return real(*args, **kw)

    a._redis.execute_command = counted  # type: ignore[method-assign]
    # The refresh thread's reads use evalsha too: count only what the request path sends.
    a.close()
    for _ in range(100):
        assert a.blocked() == {} and a.allow("p/ok")
        a.record_success("p/ok")
    assert calls == []
    a.record_failure("p/bad")  # a transition does go to Redis: the count above could have caught one
    assert calls and all(c == "EVALSHA" for c in calls)


def test_unreachable_redis_degrades_to_local_breakers_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordination = CoordinationSettings(
        redis_url=f"redis://127.0.0.1:{closed_port()}/0", key_prefix=redis_prefix(), timeout_ms=200
    )
    with caplog.at_level(logging.WARNING, logger="car_inference.routing.breaker"):
        cb = circuit_breakers(BreakerSettings(failure_threshold=3, cooldown_s=30), coordination)
        try:
            for _ in range(3):
                cb.record_failure("p/m")
            assert cb.blocked() == {"p/m": CircuitState.OPEN} and not cb.allow("p/m")  # local, still works
            assert cb.allow("p/other")
            cb.record_success("p/other")
            health = cb.coordination()
        finally:
            cb.close()
    assert health.backend == "redis" and health.reachable is False and health.error
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "this replica's own" in warnings[0].getMessage()


def test_coordination_resumes_when_redis_returns(caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer()
    server.start()
    settings = BreakerSettings(failure_threshold=2, cooldown_s=30)
    coordination = CoordinationSettings(redis_url=server.url, timeout_ms=200)
    a, b = RedisBreakerRegistry(settings, coordination), RedisBreakerRegistry(settings, coordination)
    try:
        assert a.coordination().reachable and a.coordination().latency_ms is not None
        server.stop()
        with caplog.at_level(logging.WARNING, logger="car_inference.routing.breaker"):
            for _ in range(2):
                a.record_failure("p/m")  # the first call finds Redis gone; local from then on
            assert not a.allow("p/m")  # this replica's own breaker still works
            _wait(lambda: a.coordination().reachable is False and b.coordination().reachable is False, 2.0)
            assert a.coordination().latency_ms is None  # no stale round trip while it is away
            assert b.allow("p/m")  # B never saw those failures: no coordination while Redis is away
            server.start()
            _wait(lambda: a.coordination().reachable and b.coordination().reachable, limit=3.0)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        for _ in range(2):
            b.record_failure("p/n")
        _wait(lambda: a.blocked().get("p/n") is CircuitState.OPEN, limit=FRESH)
    finally:
        a.close()
        b.close()
        server.stop()


def test_settings_pick_the_registry(tmp_path: Path) -> None:
    assert type(circuit_breakers(BreakerSettings(), CoordinationSettings())) is CircuitBreakerRegistry
    assert CircuitBreakerRegistry().coordination().backend == "local"
    env = {"CAR_COORDINATION__REDIS_URL": redis_url(), "CAR_COORDINATION__KEY_PREFIX": redis_prefix()}
    config = load_config(tmp_path, env=env)
    cb = circuit_breakers(config.breaker, config.coordination)
    try:
        assert isinstance(cb, RedisBreakerRegistry) and cb.coordination().reachable
    finally:
        cb.close()
    with pytest.raises(ConfigError, match="redis://"):
        load_config(tmp_path, env={"CAR_COORDINATION__REDIS_URL": "http://cache:6379"})
    url = "redis://:s3cret@cache:6379/0"
    assert "s3cret" not in str(CarConfig(coordination=CoordinationSettings(redis_url=url)).redacted())
