"""Circuit breakers shared by every replica through Redis (``[coordination] redis_url``).

The fleet shares, per model, one Redis hash ``{prefix}breaker:{model}`` (``fails``: consecutive
failure weight; ``opened_at``: Redis server time in ms, present while open or half-open;
``times_opened``), a probe claim ``{prefix}probe:{model}`` taken with ``SET NX PX`` (so one probe
in half-open across the fleet; it expires after ``max(cooldown, 1 s)`` like the local one) and the
set ``{prefix}breakers`` of the models with any such state. Every transition is one Lua script,
so two replicas never interleave a read and a write, and times come from Redis's clock (``TIME``),
never from the replicas' own.

Reading: ``blocked()`` runs on every routing decision, so it never touches Redis. A daemon thread
reads the fleet's state (one script, one round trip) every ``refresh_ms`` (50 ms) into a local
cache, so a breaker opened on one replica stops the others within ~50 ms plus a round trip. Polling
rather than pub/sub: its bound holds whatever happens to the connection (a pub/sub message lost in
a reconnect would leave a replica blind until some later event, so a poll would be needed anyway),
and 20 tiny reads a second per replica cost Redis next to nothing. This replica's own transitions
update the cache at once. The client is redis-py's synchronous one: the registry's API is
synchronous (the router calls ``blocked()`` inside a synchronous ``route()``), and the only Redis
calls on a request's path are the rare transitions (a failure, the first success after failures,
a half-open probe claim), each one loopback round trip bounded by ``timeout_ms``.

Degrade, never fail: a Redis error switches the registry to the local breakers it keeps all along
(the base class), logs one warning, and the thread tries Redis again every second; when it answers,
the fleet's state is used again (and one line says so). ``coordination()`` reports it all.
Successes and failure totals stay per replica (counting every success in Redis would cost a round
trip per request); a success resets the fleet's count only when the cache shows one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import BreakerSettings, CoordinationSettings
from ..errors import ConfigError
from ..redaction import redact_url
from .breaker import CircuitBreakerRegistry, CircuitState, CoordinationHealth

if TYPE_CHECKING:
    import redis

    from .coord import Fleet

__all__ = ["RedisBreakerRegistry", "circuit_breakers"]

log = logging.getLogger("car_inference.routing.breaker")

_RETRY_DOWN_S = 1.0  # while Redis is unreachable, how often the thread tries it again
_KEY_TTL_MS = 7 * 24 * 3600 * 1000  # a model nobody calls any more leaves no key behind for good

# KEYS: hash, probe, set. ARGV: model, weight, threshold, cooldown ms, ttl ms.
# Returns {fails, retry_in_ms (-1: closed), probe held (0/1), times_opened}.
_FAILURE = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)  -- Redis's clock
local fails = redis.call('HINCRBY', KEYS[1], 'fails', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
local cooldown = tonumber(ARGV[4])
if opened and now - opened < cooldown then
  redis.call('HSET', KEYS[1], 'opened_at', now)  -- a failure while open restarts the cooldown
elseif opened or fails >= tonumber(ARGV[3]) then  -- half-open (the probe failed) or the threshold
  redis.call('HSET', KEYS[1], 'opened_at', now)
  redis.call('HINCRBY', KEYS[1], 'times_opened', 1)
  redis.call('DEL', KEYS[2])
else
  return {fails, -1, 0, tonumber(redis.call('HGET', KEYS[1], 'times_opened') or '0')}
end
return {fails, cooldown, 0, tonumber(redis.call('HGET', KEYS[1], 'times_opened'))}
"""

# KEYS: hash, probe, set. ARGV: model.
_SUCCESS = """
redis.call('HDEL', KEYS[1], 'fails', 'opened_at')
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: hash, probe. ARGV: cooldown ms, probe ttl ms, token. 1: the caller holds the fleet's one
# probe now; 2: closed meanwhile (send); 0: refused.
_CLAIM = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)  -- Redis's clock
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
if not opened then return 2 end
if now - opened < tonumber(ARGV[1]) then return 0 end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: probe. ARGV: token. Gives back a probe claim only if this replica holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: set. ARGV: prefix, cooldown ms. Returns model, fails, retry_in_ms (-1: closed), probe
# held, times_opened, for every model with state; forgets models whose hash expired.
_READ = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)  -- Redis's clock
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HMGET', ARGV[1] .. 'breaker:' .. m, 'fails', 'opened_at', 'times_opened')
  if not v[1] and not v[2] then
    redis.call('SREM', KEYS[1], m)
  else
    local retry = -1
    if v[2] then retry = math.max(0, tonumber(ARGV[2]) - (now - tonumber(v[2]))) end
    local probe = redis.call('EXISTS', ARGV[1] .. 'probe:' .. m)
    table.insert(out, {m, tonumber(v[1] or '0'), retry, probe, tonumber(v[3] or '0')})
  end
end
return out
"""


@dataclass(slots=True, frozen=True)
class _Fleet:
    """One model's state as the fleet saw it at the last read (monotonic seconds, this process)."""

    fails: int
    open_until: float | None  # None: closed; past: half-open
    probe: bool
    times_opened: int

    def state(self, now: float) -> CircuitState:
        if self.open_until is None:
            return CircuitState.CLOSED
        return CircuitState.OPEN if now < self.open_until else CircuitState.HALF_OPEN

    def refuses(self, now: float) -> bool:
        return self.open_until is not None and (now < self.open_until or self.probe)


def _entry(fails: Any, retry_ms: Any, probe: Any, times_opened: Any, now: float) -> _Fleet:
    retry = int(retry_ms)
    return _Fleet(int(fails), None if retry < 0 else now + retry / 1000, bool(int(probe)), int(times_opened))


class RedisBreakerRegistry(CircuitBreakerRegistry):
    """The fleet's breakers while Redis answers; this process's own (the base class) while not."""

    def __init__(
        self, settings: BreakerSettings | None, coordination: CoordinationSettings, fleet: Fleet | None = None
    ) -> None:
        super().__init__(settings)
        self.fleet = fleet  # the rest of the shared state: its health is reported with the breakers'
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError(
                "[coordination] redis_url needs the redis package: pip install 'car-inference[redis]'"
            ) from None
        assert coordination.redis_url is not None
        self._url = redact_url(coordination.redis_url)
        self._prefix = coordination.key_prefix
        self._interval = coordination.refresh_ms / 1000
        timeout = coordination.timeout_ms / 1000
        # No client-side retries (redis-py 6+ retries 3 times by default): a dead Redis must cost
        # one timeout, then the registry degrades.
        self._redis: redis.Redis = redis.Redis.from_url(
            coordination.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._failure = self._redis.register_script(_FAILURE)
        self._success = self._redis.register_script(_SUCCESS)
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._read = self._redis.register_script(_READ)
        self._token = uuid.uuid4().hex  # this replica's name on a probe claim
        self._fleet: dict[str, _Fleet] = {}
        self._probing: set[str] = set()  # models whose fleet probe this replica holds
        self._generation = 0  # bumped by each local transition: a read begun before it is stale
        self._reachable = False
        self._error: str | None = None
        self._latency_ms: float | None = None
        self._warned = False
        self._stop = threading.Event()
        self._refresh()  # the state before the first request, and a warning now if Redis is down
        self._thread = threading.Thread(
            target=_refresh_loop, args=(weakref.ref(self), self._stop), name="car-breakers", daemon=True
        )
        self._thread.start()

    # --- keys and Redis calls ------------------------------------------------------------------

    def _keys(self, model_id: str) -> list[str]:
        p = self._prefix
        return [f"{p}breaker:{model_id}", f"{p}probe:{model_id}", f"{p}breakers"]

    @property
    def _cooldown_ms(self) -> int:
        return int(self.settings.cooldown_s * 1000)

    def _lost(self, exc: BaseException) -> None:
        """Redis failed a call: local breakers from now on, with one warning per outage."""
        with self._lock:
            self._reachable = False
            self._error = f"{type(exc).__name__}: {exc}"
            warn, self._warned = not self._warned, True
        if warn:
            log.warning(
                "Redis at %s is unreachable (%s): circuit breakers are this replica's own until it returns",
                self._url,
                self._error,
            )

    def _refresh(self) -> None:
        """Read the fleet's breakers into the cache (or learn that Redis is away, or back)."""
        generation = self._generation
        started = time.perf_counter()
        try:
            rows = self._read(keys=[f"{self._prefix}breakers"], args=[self._prefix, self._cooldown_ms])
        except self._errors as exc:
            self._lost(exc)
            return
        now = time.monotonic()
        fleet = {
            (m.decode() if isinstance(m, bytes) else str(m)): _entry(fails, retry, probe, opened, now)
            for m, fails, retry, probe, opened in rows
        }
        with self._lock:
            self._latency_ms = (time.perf_counter() - started) * 1000
            back = not self._reachable and self._warned
            self._reachable, self._error, self._warned = True, None, False
            if generation == self._generation:  # no local transition raced the read
                self._fleet = fleet
        if back:
            log.warning("Redis at %s is reachable again: circuit breakers are shared again", self._url)

    def _set(self, model_id: str, entry: _Fleet | None) -> None:
        with self._lock:
            self._generation += 1
            fleet = dict(self._fleet)  # replaced, never mutated: readers iterate without the lock
            if entry is None:
                fleet.pop(model_id, None)
            else:
                fleet[model_id] = entry
            self._fleet = fleet

    # --- the registry's API --------------------------------------------------------------------

    def allow(self, model_id: str) -> bool:
        if not self._reachable:
            return super().allow(model_id)
        entry = self._fleet.get(model_id)
        now = time.monotonic()
        if entry is None or entry.open_until is None:
            return True
        if entry.refuses(now):  # open, or a probe is out (ours too: the claim marks the cache)
            return False
        keys = self._keys(model_id)
        probe_ms = int(max(self.settings.cooldown_s, 1.0) * 1000)
        try:
            answer = int(self._claim(keys=keys[:2], args=[self._cooldown_ms, probe_ms, self._token]))
        except self._errors as exc:
            self._lost(exc)
            return super().allow(model_id)
        if answer == 2:
            self._set(model_id, None)
        elif answer == 1:
            self._probing.add(model_id)
            self._set(model_id, _Fleet(entry.fails, entry.open_until, True, entry.times_opened))
        return answer > 0

    def would_allow(self, model_id: str) -> bool:
        if not self._reachable:
            return super().would_allow(model_id)
        entry = self._fleet.get(model_id)
        return entry is None or not entry.refuses(time.monotonic())

    def blocked(self) -> dict[str, CircuitState]:
        if not self._reachable:
            return super().blocked()
        fleet = self._fleet
        if not fleet:
            return {}
        now = time.monotonic()
        return {m: e.state(now) for m, e in fleet.items() if e.refuses(now)}

    def state(self, model_id: str) -> CircuitState:
        if not self._reachable:
            return super().state(model_id)
        entry = self._fleet.get(model_id)
        return CircuitState.CLOSED if entry is None else entry.state(time.monotonic())

    def record_success(self, model_id: str) -> None:
        super().record_success(model_id)  # this replica's totals, and its fallback state
        if not self._reachable or (model_id not in self._fleet and model_id not in self._probing):
            return  # nothing the fleet knows of to reset: no round trip on a healthy model's path
        self._probing.discard(model_id)
        try:
            self._success(keys=self._keys(model_id), args=[model_id])
        except self._errors as exc:
            self._lost(exc)
            return
        self._set(model_id, None)

    def release(self, model_id: str) -> None:
        super().release(model_id)
        if not self._reachable or model_id not in self._probing:
            return
        self._probing.discard(model_id)
        try:
            self._release(keys=self._keys(model_id)[1:2], args=[self._token])
        except self._errors as exc:
            self._lost(exc)
            return
        entry = self._fleet.get(model_id)
        if entry is not None:
            self._set(model_id, _Fleet(entry.fails, entry.open_until, False, entry.times_opened))

    def record_failure(self, model_id: str, weight: int = 1) -> None:
        if weight <= 0:
            self.release(model_id)
            return
        super().record_failure(model_id, weight)
        if not self._reachable:
            return
        self._probing.discard(model_id)
        args: list[str | int] = [
            model_id,
            int(weight),
            self.settings.failure_threshold,
            self._cooldown_ms,
            _KEY_TTL_MS,
        ]
        try:
            fails, retry, probe, opened = self._failure(keys=self._keys(model_id), args=args)
        except self._errors as exc:
            self._lost(exc)
            return
        self._set(model_id, _entry(fails, retry, probe, opened, time.monotonic()))

    def reset(self, model_id: str | None = None) -> None:
        super().reset(model_id)
        models = list(self._fleet) if model_id is None else [model_id]
        if not self._reachable:
            return
        try:
            for m in models:
                self._success(keys=self._keys(m), args=[m])
        except self._errors as exc:
            self._lost(exc)
        for m in models:
            self._set(m, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The base class's rows, with the fleet's state where Redis answers (totals stay this
        replica's own; ``opened_at`` is on this process's monotonic clock)."""
        out = super().snapshot()
        if not self._reachable:
            return out
        now = time.monotonic()
        cooldown = self.settings.cooldown_s
        for model_id, row in out.items():
            if model_id not in self._fleet:  # closed for the fleet, whatever this replica counted
                row.update(state="closed", consecutive_failures=0, opened_at=None, retry_in_s=None)
                row["probe_in_flight"] = False
        for model_id, e in self._fleet.items():
            row = out.setdefault(model_id, {"total_failures": 0, "total_successes": 0})
            row.update(
                state=e.state(now).value,
                consecutive_failures=e.fails,
                opened_at=None if e.open_until is None else e.open_until - cooldown,
                retry_in_s=None if e.open_until is None else max(0.0, e.open_until - now),
                probe_in_flight=e.probe,
                times_opened=e.times_opened,
            )
        return out

    def coordination(self) -> CoordinationHealth:
        """Redis's state for the breakers and, with a fleet, for the rest of the shared state:
        unreachable when either side found it so."""
        reachable, error = self._reachable, self._error
        if self.fleet is not None and not self.fleet.reachable:
            fleet = self.fleet.health()
            reachable, error = False, error or fleet.error or "not reached yet"
        return CoordinationHealth(
            backend="redis",
            url=self._url,
            reachable=reachable,
            # the last round trip, while Redis answers (a stale one would read as a live figure)
            latency_ms=None if self._latency_ms is None or not reachable else round(self._latency_ms, 3),
            error=error,
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        self._redis.close()


def _refresh_loop(ref: weakref.ref[RedisBreakerRegistry], stop: threading.Event) -> None:
    """Refresh the registry's cache until it is closed or collected (a weak reference: the
    thread alone does not keep an engine's registry alive)."""
    registry = ref()
    while registry is not None:
        wait = registry._interval if registry._reachable else _RETRY_DOWN_S
        del registry
        if stop.wait(wait):
            return
        registry = ref()
        if registry is not None:
            registry._refresh()


def circuit_breakers(
    settings: BreakerSettings, coordination: CoordinationSettings | None = None, fleet: Fleet | None = None
) -> CircuitBreakerRegistry:
    """The fleet's breakers when ``[coordination] redis_url`` is set, else this process's own."""
    if coordination is None or coordination.redis_url is None:
        return CircuitBreakerRegistry(settings)
    return RedisBreakerRegistry(settings, coordination, fleet)
