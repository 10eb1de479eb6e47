from __future__ import annotations

import threading

import pytest

from car_inference.config import BreakerSettings
from car_inference.errors import InvalidInput, ProviderError, ProviderRejectedInput, UnsupportedMode
from car_inference.routing.breaker import CircuitBreakerRegistry, CircuitState, failure_weight

from .helpers import FakeClock


def make(clock: FakeClock, threshold: int = 3, cooldown: float = 30.0) -> CircuitBreakerRegistry:
    return CircuitBreakerRegistry(BreakerSettings(failure_threshold=threshold, cooldown_s=cooldown), clock)


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(2):
        cb.record_failure("m")
    assert cb.state("m") is CircuitState.CLOSED and cb.allow("m")
    cb.record_failure("m")
    assert cb.state("m") is CircuitState.OPEN
    assert not cb.allow("m") and not cb.would_allow("m")
    assert cb.blocked() == {"m": CircuitState.OPEN}


def test_success_resets_the_count(clock: FakeClock) -> None:
    cb = make(clock)
    cb.record_failure("m")
    cb.record_failure("m")
    cb.record_success("m")
    cb.record_failure("m")
    cb.record_failure("m")
    assert cb.state("m") is CircuitState.CLOSED


def test_client_error_counts_double(clock: FakeClock) -> None:
    cb = make(clock, threshold=3)
    bad_key = ProviderError("bad key", provider="p", model="m", status=401)
    throttled = ProviderError("slow down", provider="p", model="m", status=429)
    assert failure_weight(bad_key) == 2
    assert failure_weight(ProviderError("no such model", provider="p", model="m", status=404)) == 2
    assert failure_weight(throttled) == 0  # a rate limit: the key rests, the model is not broken
    assert failure_weight(TimeoutError()) == 1
    cb.record_failure("m", weight=failure_weight(bad_key))
    assert cb.state("m") is CircuitState.CLOSED
    cb.record_failure("m", weight=failure_weight(throttled))
    assert cb.state("m") is CircuitState.CLOSED  # a 429 counts nothing
    cb.record_failure("m", weight=failure_weight(TimeoutError()))
    assert cb.state("m") is CircuitState.OPEN  # 2 + 1 = threshold


@pytest.mark.parametrize(
    "error",
    [
        InvalidInput("undecodable audio"),
        UnsupportedMode("video-input", "openai", "Chat Completions takes no video"),
        ProviderError("invalid tool schema", provider="p", model="m", status=400),
        ProviderRejectedInput("invalid tool schema", provider="p", model="m", status=400),
        ProviderError("too large", provider="p", model="m", status=413),
        ProviderError("unprocessable", provider="p", model="m", status=422),
    ],
)
def test_errors_the_request_caused_never_count(clock: FakeClock, error: Exception) -> None:
    cb = make(clock, threshold=1)
    assert failure_weight(error) == 0
    for _ in range(5):
        cb.record_failure("m", weight=failure_weight(error))
    assert cb.state("m") is CircuitState.CLOSED
    assert cb.snapshot().get("m", {}).get("consecutive_failures", 0) == 0


def test_a_request_error_on_the_probe_hands_the_probe_on(clock: FakeClock) -> None:
    cb = make(clock, threshold=1, cooldown=10)
    cb.record_failure("m")
    clock.advance(10.1)
    assert cb.allow("m")  # the probe, whose request turns out to be invalid
    assert not cb.allow("m")
    cb.record_failure("m", weight=0)
    assert cb.state("m") is CircuitState.HALF_OPEN
    assert cb.allow("m"), "the next request probes at once"


def test_half_open_allows_exactly_one_probe_then_recovers(clock: FakeClock) -> None:
    cb = make(clock, cooldown=30)
    for _ in range(3):
        cb.record_failure("m")
    clock.advance(29.9)
    assert not cb.allow("m")
    clock.advance(0.2)
    assert cb.state("m") is CircuitState.HALF_OPEN
    assert cb.would_allow("m")  # looking does not claim
    assert cb.allow("m")  # the probe
    assert not cb.allow("m") and not cb.would_allow("m")  # a second caller waits for it
    assert "m" in cb.blocked()
    cb.record_success("m")
    assert cb.state("m") is CircuitState.CLOSED
    assert cb.allow("m") and cb.allow("m")
    assert cb.blocked() == {}


def test_failed_probe_reopens_and_restarts_cooldown(clock: FakeClock) -> None:
    cb = make(clock, cooldown=10)
    for _ in range(3):
        cb.record_failure("m")
    clock.advance(10)
    assert cb.allow("m")
    cb.record_failure("m")
    assert cb.state("m") is CircuitState.OPEN
    clock.advance(9)
    assert not cb.allow("m")
    clock.advance(1)
    assert cb.allow("m")


def test_abandoned_probe_is_given_up(clock: FakeClock) -> None:
    cb = make(clock, cooldown=5)
    for _ in range(3):
        cb.record_failure("m")
    clock.advance(5)
    assert cb.allow("m")
    clock.advance(4)
    assert not cb.allow("m")
    clock.advance(2)  # the prober never reported back
    assert cb.allow("m")


def test_breakers_are_per_model_and_snapshot(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure("a")
    cb.record_success("b")
    snap = cb.snapshot()
    assert snap["a"]["state"] == "open" and snap["a"]["consecutive_failures"] == 3
    assert snap["a"]["opened_at"] == clock.now and snap["a"]["retry_in_s"] == 30.0
    assert snap["b"]["state"] == "closed" and snap["b"]["total_successes"] == 1
    assert cb.allow("b") and cb.allow("never-seen")
    cb.reset("a")
    assert cb.state("a") is CircuitState.CLOSED


def test_only_one_thread_gets_the_probe(clock: FakeClock) -> None:
    cb = make(clock, cooldown=1)
    for _ in range(3):
        cb.record_failure("m")
    clock.advance(1)
    granted: list[bool] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        granted.append(cb.allow("m"))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(True) == 1
