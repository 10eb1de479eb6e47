"""Per-model circuit breakers: stop sending requests to a model that keeps failing, then probe it.

closed --(``failure_threshold`` consecutive failure weight)--> open --(``cooldown_s``)--> half_open
half_open --(the one probe succeeds)--> closed;  half_open --(the probe fails)--> open (cooldown
restarts). In half-open exactly one caller at a time gets ``allow() == True`` (the probe); the others
are refused until the probe reports back. A probe that never reports (its caller died) is given up
after another ``cooldown_s``, so a model is never locked out for good.

A failure's weight is 1, or 2 for a client error of the provider's own (401/403/404: a broken key
or model will not fix itself), as in the seed engine. An error the request caused (``InvalidInput``,
``UnsupportedMode``, a provider's 400/413/422 about the input) weighs 0: one client's bad requests
must not open a circuit for every client. Thread-safe: one lock, held briefly.

This registry is one process's. ``breaker_redis.RedisBreakerRegistry`` shares the state across
replicas (``[coordination] redis_url``); ``circuit_breakers()`` there picks one for the settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from ..config import BreakerSettings
from ..errors import InvalidInput, ModelUnavailable, UnsupportedMode

__all__ = ["CircuitBreakerRegistry", "CircuitState", "CoordinationHealth", "failure_weight"]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def failure_weight(error: BaseException) -> int:
    """0 for an error the request caused, for a model that cannot run here (``ModelUnavailable``:
    no usable key, files not pulled; the router skips it anyway, and its circuit kept answering
    ``circuit_open`` for 30 s after `car keys reset`) and for a rate limit (429: the key pool rests
    the key for its Retry-After and answers 429 meanwhile, without a call; counted here it opened
    the circuit for its whole cooldown, and a 429 says nothing of the model's answers), 2 for a
    provider's other client error (``ProviderError.is_client_error``: 401, 403, 404...), else 1
    (5xx, timeouts, cut streams)."""
    if isinstance(error, InvalidInput | UnsupportedMode | ModelUnavailable):
        return 0
    if getattr(error, "caused_by_request", False) or getattr(error, "status", None) == 429:
        return 0
    return 2 if getattr(error, "is_client_error", False) else 1


class CoordinationHealth(BaseModel):
    """Where breaker state is shared: ``local`` (this process only) or ``redis`` (the fleet)."""

    backend: str = Field(description='"local" or "redis"')
    url: str | None = Field(default=None, description="the Redis URL, password masked")
    reachable: bool | None = Field(default=None, description="None for local; False: degraded to local")
    latency_ms: float | None = Field(default=None, description="the last fleet read's round trip")
    error: str | None = Field(default=None, description="why Redis is unreachable")


@dataclass(slots=True)
class _Breaker:
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    opened_at: float | None = None
    probe_started_at: float | None = None
    total_failures: int = 0
    total_successes: int = 0
    times_opened: int = 0


class CircuitBreakerRegistry:
    def __init__(
        self, settings: BreakerSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: dict[str, _Breaker] = {}
        # Models whose breaker is not closed: the router's fast path reads only these.
        self._tripped: set[str] = set()

    def _get(self, model_id: str) -> _Breaker:
        b = self._breakers.get(model_id)
        if b is None:
            b = self._breakers[model_id] = _Breaker()
        return b

    def _advance(self, b: _Breaker, now: float) -> None:
        """Move open -> half_open once the cooldown has passed; drop a stale probe claim."""
        cooldown = self.settings.cooldown_s
        if b.state is CircuitState.OPEN and b.opened_at is not None and now - b.opened_at >= cooldown:
            b.state = CircuitState.HALF_OPEN
            b.probe_started_at = None
        elif (
            b.state is CircuitState.HALF_OPEN
            and b.probe_started_at is not None
            and now - b.probe_started_at >= max(cooldown, 1.0)
        ):
            b.probe_started_at = None

    def allow(self, model_id: str) -> bool:
        """May a request go to ``model_id`` now? In half-open this claims the single probe."""
        with self._lock:
            b = self._breakers.get(model_id)
            if b is None or b.state is CircuitState.CLOSED:
                return True
            now = self._clock()
            self._advance(b, now)
            if b.state is CircuitState.HALF_OPEN and b.probe_started_at is None:
                b.probe_started_at = now
                return True
            return False

    def would_allow(self, model_id: str) -> bool:
        """Like ``allow`` but claims nothing: for ranking candidates."""
        with self._lock:
            return self._would_allow(model_id, self._clock())

    def _would_allow(self, model_id: str, now: float) -> bool:
        b = self._breakers.get(model_id)
        if b is None or b.state is CircuitState.CLOSED:
            return True
        self._advance(b, now)
        return b.state is CircuitState.HALF_OPEN and b.probe_started_at is None

    def blocked(self) -> dict[str, CircuitState]:
        """Models that would be refused now, with their state (empty when every circuit is closed)."""
        if not self._tripped:
            return {}
        with self._lock:
            now = self._clock()
            return {m: self._breakers[m].state for m in self._tripped if not self._would_allow(m, now)}

    def record_success(self, model_id: str) -> None:
        with self._lock:
            b = self._get(model_id)
            b.total_successes += 1
            b.consecutive_failures = 0
            b.state = CircuitState.CLOSED
            b.opened_at = None
            b.probe_started_at = None
            self._tripped.discard(model_id)

    def release(self, model_id: str) -> None:
        """The attempt said nothing about the model's health (the request was at fault): give back
        a half-open probe claim so that the next request probes."""
        with self._lock:
            b = self._breakers.get(model_id)
            if b is not None:
                b.probe_started_at = None

    def record_failure(self, model_id: str, weight: int = 1) -> None:
        """Count a failure of ``weight`` (see ``failure_weight``); weight 0 only releases a probe."""
        if weight <= 0:
            self.release(model_id)
            return
        with self._lock:
            b = self._get(model_id)
            now = self._clock()
            self._advance(b, now)
            b.total_failures += 1
            b.consecutive_failures += int(weight)
            if b.state is CircuitState.HALF_OPEN or (
                b.state is CircuitState.CLOSED and b.consecutive_failures >= self.settings.failure_threshold
            ):
                b.state = CircuitState.OPEN
                b.opened_at = now
                b.probe_started_at = None
                b.times_opened += 1
                self._tripped.add(model_id)
            elif b.state is CircuitState.OPEN:
                b.opened_at = now  # a failure while open (a caller that ignored allow) restarts the cooldown

    def coordination(self) -> CoordinationHealth:
        return CoordinationHealth(backend="local")

    def close(self) -> None:
        """Stop whatever keeps the state in step with other replicas (nothing, here)."""

    def state(self, model_id: str) -> CircuitState:
        with self._lock:
            b = self._breakers.get(model_id)
            if b is None:
                return CircuitState.CLOSED
            self._advance(b, self._clock())
            return b.state

    def reset(self, model_id: str | None = None) -> None:
        """Close one breaker, or all of them."""
        with self._lock:
            if model_id is None:
                self._breakers.clear()
                self._tripped.clear()
            else:
                self._breakers.pop(model_id, None)
                self._tripped.discard(model_id)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every breaker that has seen traffic: state, counts, and when it opened (clock seconds)."""
        with self._lock:
            now = self._clock()
            out: dict[str, dict[str, Any]] = {}
            for model_id, b in self._breakers.items():
                self._advance(b, now)
                retry_in = None
                if b.state is CircuitState.OPEN and b.opened_at is not None:
                    retry_in = max(0.0, self.settings.cooldown_s - (now - b.opened_at))
                out[model_id] = {
                    "state": b.state.value,
                    "consecutive_failures": b.consecutive_failures,
                    "opened_at": b.opened_at,
                    "retry_in_s": retry_in,
                    "probe_in_flight": b.probe_started_at is not None,
                    "total_failures": b.total_failures,
                    "total_successes": b.total_successes,
                    "times_opened": b.times_opened,
                }
            return out
