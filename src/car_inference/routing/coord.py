"""Fleet: one replica's link to the state the fleet shares in Redis beyond breakers
(``[coordination] redis_url``): API keys' health, spend reservations (``coord_spend.py``), and the
notification that learned router state changed.

Keys, all under ``key_prefix``:

- ``keys`` (hash): a key's fingerprint -> ``d`` (disabled after a 401/403) or ``c<ms>`` (cooling
  until that Redis time, after a 429). ``KeyPool`` writes on such answers (rare) and reads the
  whole hash every ``refresh_ms`` (one script, one round trip) from this class's thread, so
  ``acquire`` never waits on Redis and a key refused on one replica is skipped by all within
  ~``refresh_ms``.
- ``alive:<replica>`` (``SET PX lease_s``): this replica's heartbeat, refreshed by the same thread;
  what a replica holds (spend reservations, concurrency slots) counts only while it is alive, so a
  replica killed outright gives everything back within ``lease_s``.
- channel ``router``: a replica that recorded outcomes publishes its id (at most every 100 ms,
  after its writes had time to commit); every other replica reloads its learned router state from
  the shared store (``follow``), debounced to at most one reload per 250 ms: within a second of
  the change. A listener thread of its own holds the subscription; on every (re)subscription it
  reloads once too, so a notification lost while Redis was away is made up for.

Times come from Redis's clock (``TIME``), never from the replicas' own. The client is redis-py's
synchronous one, used from threads and from the synchronous APIs it serves (``KeyPool.acquire``,
``SpendControl.check``); no call of a request's path waits longer than ``timeout_ms``.

Degrade, never fail: a Redis error makes ``reachable`` False (one warning per outage); callers then
use their local state, the thread tries Redis every second and says when it is back, and ``epoch``
counts the (re)connections so that callers can re-seed what Redis lost meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import CoordinationSettings
from ..errors import ConfigError, StateUnavailable
from ..redaction import redact_url

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

    from .outcomes import OutcomeTracker

__all__ = ["Fleet", "FleetHealth", "KeyHealth"]

log = logging.getLogger("car_inference.routing.coord")

_RETRY_DOWN_S = 1.0
_PUBLISH_AFTER_S = 0.1  # a change is announced this long after it was made (its commit is in)
_RELOAD_EVERY_S = 0.25  # at most one reload this often per replica
_RETRY_RELOAD_S = 1.0  # a reload that failed (the state store away) is tried again after this
_CHANNEL = "router"

# KEYS: keys hash. Returns fp, kind (d/c), remaining ms; forgets cooldowns that ended.
_READ_KEYS = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = all[i + 1]
  if v == 'd' then
    table.insert(out, {all[i], 'd', 0})
  else
    local left = tonumber(string.sub(v, 2)) - now
    if left > 0 then table.insert(out, {all[i], 'c', left}) else redis.call('HDEL', KEYS[1], all[i]) end
  end
end
return out
"""

# KEYS: keys hash. ARGV: fp, 'd' or cooldown ms. A cooldown never shortens one already running,
# nor replaces a disabled key.
_PUT_KEY = """
if ARGV[2] == 'd' then redis.call('HSET', KEYS[1], ARGV[1], 'd'); return 1 end
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local until_ms = now + tonumber(ARGV[2])
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old == 'd' then return 0 end
if old and tonumber(string.sub(old, 2)) >= until_ms then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'c' .. until_ms)
return 1
"""


@dataclass(slots=True, frozen=True)
class KeyHealth:
    """A key's health as the fleet saw it at the last read."""

    disabled: bool
    cooling_until: float | None  # time.monotonic() of this process


@dataclass(slots=True, frozen=True)
class FleetHealth:
    """What ``/v1/health`` and ``/metrics`` show of the fleet link."""

    reachable: bool
    error: str | None
    latency_ms: float | None
    replica: str


class Fleet:
    """This replica's link to the fleet's shared state in Redis (see the module's text)."""

    def __init__(self, settings: CoordinationSettings, *, threads: bool = True) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError(
                "[coordination] redis_url needs the redis package: pip install 'car-inference[redis]'"
            ) from None
        if settings.redis_url is None:
            raise ConfigError("a Fleet needs [coordination] redis_url")
        self.settings = settings
        self.url = redact_url(settings.redis_url)
        self.prefix = settings.key_prefix
        self.replica = uuid.uuid4().hex[:12]
        timeout = settings.timeout_ms / 1000
        try:  # what the settings do not check (a query option redis-py reads: ?socket_timeout=x)
            self.redis: redis.Redis = redis.Redis.from_url(
                settings.redis_url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # a dead Redis costs one timeout, then we degrade
            )
            self._pubsub_client: redis.Redis = redis.Redis.from_url(
                settings.redis_url, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
            )
        except ValueError as exc:
            raise ConfigError(f"[coordination] redis_url {self.url!r}: {exc}") from None
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._read_keys = self.redis.register_script(_READ_KEYS)
        self._put_key = self.redis.register_script(_PUT_KEY)
        self._lock = threading.Lock()
        self._reachable = False
        self._error: str | None = None
        self._latency_ms: float | None = None
        self._warned = False
        self.epoch = 0  # bumped on each (re)connection
        self._keys: dict[str, KeyHealth] = {}
        self._generation = 0  # bumped by this replica's own key writes: a read begun before is stale
        self._heartbeat_at = 0.0
        self._dirty_since: float | None = None
        self._followers: list[Callable[[], None]] = []
        self._key_listeners: list[Callable[[list[str]], None]] = []
        self._stop = threading.Event()
        self.reloads = 0  # reloads done on notifications (tests, /metrics)
        self.subscribed = threading.Event()  # set while the listener holds its subscription
        self._refused: BaseException | None = None  # the first read's error, when Redis answered one
        self._refusals = (redis.ResponseError, redis.AuthenticationError)  # a wrong URL, not an outage
        self._refresh()
        if isinstance(self._refused, self._refusals):
            self.redis.close()
            self._pubsub_client.close()
            raise ConfigError(
                f"Redis at {self.url} refused it ({type(self._refused).__name__}: {self._refused}): a "
                "wrong database, password or server, not an outage; fix [coordination] redis_url",
                field="coordination.redis_url",
            ) from None
        self._threads: list[threading.Thread] = []
        if threads:
            ref = weakref.ref(self)
            for target, name in ((_poll_loop, "car-fleet"), (_listen_loop, "car-fleet-notify")):
                thread = threading.Thread(target=target, args=(ref, self._stop), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    @classmethod
    def for_settings(cls, settings: CoordinationSettings) -> Fleet | None:
        """The fleet link when ``redis_url`` is set, else None (local only)."""
        return None if settings.redis_url is None else cls(settings)

    # --- reachability --------------------------------------------------------------------------

    @property
    def reachable(self) -> bool:
        return self._reachable

    def lost(self, exc: BaseException) -> None:
        """A Redis call failed: local state from now on, with one warning per outage."""
        with self._lock:
            self._reachable = False
            self._error = f"{type(exc).__name__}: {exc}"
            warn, self._warned = not self._warned, True
        if warn:
            log.warning(
                "Redis at %s is unreachable (%s): key health, spend limits and router reloads are this "
                "replica's own until it returns",
                self.url,
                self._error,
            )

    def _found(self, latency_ms: float) -> None:
        with self._lock:
            self._latency_ms = latency_ms
            back = not self._reachable
            self._reachable, self._error = True, None
            if back:
                self.epoch += 1
                self._heartbeat_at = 0.0  # a Redis that restarted lost the heartbeat: beat now
            said, self._warned = self._warned, False
        if back and said:
            log.warning("Redis at %s is reachable again: the fleet's state is shared again", self.url)

    def call(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script; on a Redis error, degrade and return None."""
        try:
            return script(keys=list(keys), args=list(args))
        except self.errors as exc:
            self.lost(exc)
            return None

    def health(self) -> FleetHealth:
        latency = None if self._latency_ms is None or not self._reachable else round(self._latency_ms, 3)
        return FleetHealth(self._reachable, self._error, latency, self.replica)

    # --- the thread's work ---------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _refresh(self) -> None:
        """Read the fleet's key health, beat the heart, announce a change (or learn that Redis is
        away, or back)."""
        started = time.perf_counter()
        generation = self._generation
        before = self._keys if self._reachable else {}
        try:
            rows = self._read_keys(keys=[self.key("keys")], args=[])
        except self.errors as exc:
            if not self.epoch and self._refused is None:  # at start: a URL the server refuses is said
                self._refused = exc
                if isinstance(exc, self._refusals):
                    return  # not an outage: __init__ refuses to start, without an outage's warning first
            self.lost(exc)
            return
        now = time.monotonic()
        read = {
            (fp.decode() if isinstance(fp, bytes) else str(fp)): KeyHealth(
                disabled=kind in (b"d", "d"),
                cooling_until=None if kind in (b"d", "d") else now + int(ms) / 1000,
            )
            for fp, kind, ms in rows
        }
        self._found((time.perf_counter() - started) * 1000)
        cleared: list[str] = []
        with self._lock:
            if generation == self._generation:  # no put or clear of this replica raced the read
                self._keys = read
                cleared = [fp for fp in before if fp not in read]
        if cleared:  # reset somewhere, or a cooldown over: replicas drop their own copies too
            for listener in list(self._key_listeners):
                listener(cleared)
        try:
            if now - self._heartbeat_at >= self.settings.lease_s / 3:
                self.redis.set(self.key("alive", self.replica), 1, px=int(self.settings.lease_s * 1000))
                self._heartbeat_at = now
            dirty = self._dirty_since
            if dirty is not None and now - dirty >= _PUBLISH_AFTER_S:
                self._dirty_since = None
                self.redis.publish(self.key(_CHANNEL), self.replica)
        except self.errors as exc:
            self.lost(exc)

    def alive_key(self) -> str:
        return self.key("alive", self.replica)

    # --- key health ----------------------------------------------------------------------------

    def key_health(self) -> dict[str, KeyHealth]:
        """The fleet's disabled and cooling keys at the last read ({} while Redis is away)."""
        return self._keys if self._reachable else {}

    def put_key(self, fp: str, *, cooling_s: float | None = None, disabled: bool = False) -> None:
        """Tell the fleet that a key is disabled, or cooling for ``cooling_s``."""
        if not self._reachable:
            return
        mode = "d" if disabled else str(max(1, int((cooling_s or 0.0) * 1000)))
        if not self.call(self._put_key, [self.key("keys")], [fp, mode]):
            return  # Redis away, or the fleet already holds a longer refusal (the next read has it)
        now = time.monotonic()
        health = KeyHealth(disabled, None if disabled else now + (cooling_s or 0.0))
        with self._lock:
            self._generation += 1
            self._keys = {**self._keys, fp: health}  # replaced, never mutated: readers iterate freely

    def on_keys_cleared(self, listener: Callable[[list[str]], None]) -> None:
        """Call ``listener(fingerprints)`` (from the fleet's thread) when keys the fleet had
        disabled or cooling are no longer: a reset on some replica, or a cooldown that ended."""
        self._key_listeners.append(listener)

    def clear_keys(self, fps: Sequence[str]) -> None:
        """Re-enable keys and end their cooldowns for the fleet."""
        if not fps or not self._reachable:
            return
        try:
            self.redis.hdel(self.key("keys"), *fps)
        except self.errors as exc:
            self.lost(exc)
            return
        with self._lock:
            self._generation += 1
            self._keys = {fp: h for fp, h in self._keys.items() if fp not in fps}

    # --- router notifications ------------------------------------------------------------------

    def changed(self) -> None:
        """Learned router state changed here: the others are told (within ``_PUBLISH_AFTER_S`` plus
        a refresh), so that they reload it."""
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def follow(self, reload: Callable[[], None]) -> None:
        """Call ``reload`` (from the listener thread) when another replica announces a change."""
        self._followers.append(reload)

    def share_learning(self, tracker: OutcomeTracker) -> None:
        """Announce ``tracker``'s changes to the fleet, and reload it on the others'."""
        tracker.on_change = self.changed
        self.follow(tracker.reload)

    def _reload(self) -> bool:
        """Reload every follower; False when one failed (tried again a second later)."""
        ok = True
        for reload in list(self._followers):
            try:
                reload()
            except StateUnavailable as exc:  # the store warned once already: no traceback per notice
                log.debug("reloading the learned router state waits for the state store: %s", exc)
                ok = False
            except Exception:  # a failed reload must not end the listener
                log.exception("reloading the learned router state failed")
                ok = False
        if ok:
            self.reloads += 1
        return ok

    def _listen(self, stop: threading.Event) -> None:
        """One subscription's life: reload at once (catching up), then on each other replica's
        notification, at most every ``_RELOAD_EVERY_S``."""
        pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.key(_CHANNEL))
            pubsub.get_message(timeout=self.settings.timeout_ms / 1000)  # the confirmation: subscribed
            self.subscribed.set()
            last = time.monotonic()
            # A reload the state store could not serve (an outage) is tried again a second on,
            # so a replica does not stay behind until the next notice.
            due: float | None = None if self._reload() else last + _RETRY_RELOAD_S
            while not stop.is_set():
                wait = 0.2 if due is None else max(0.0, due - time.monotonic())
                message = pubsub.get_message(timeout=wait)
                if message is not None and message.get("data") not in (self.replica, self.replica.encode()):
                    due = due or max(time.monotonic(), last + _RELOAD_EVERY_S)
                if due is not None and time.monotonic() >= due:
                    due, last = None, time.monotonic()
                    if not self._reload():
                        due = last + _RETRY_RELOAD_S
        finally:
            self.subscribed.clear()
            pubsub.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=1.5)
        with contextlib.suppress(*self.errors):  # Redis is away: the heartbeat expires by itself
            self.redis.delete(self.alive_key())
        self.redis.close()
        self._pubsub_client.close()


def _poll_loop(ref: weakref.ref[Fleet], stop: threading.Event) -> None:
    fleet = ref()
    while fleet is not None:
        wait = fleet.settings.refresh_ms / 1000 if fleet.reachable else _RETRY_DOWN_S
        del fleet
        if stop.wait(wait):
            return
        fleet = ref()
        if fleet is not None:
            fleet._refresh()


def _listen_loop(ref: weakref.ref[Fleet], stop: threading.Event) -> None:
    while not stop.is_set():
        fleet = ref()
        if fleet is None:
            return
        # Redis went away: the poll thread says so; subscribe again when it is back.
        with contextlib.suppress(*fleet.errors):
            fleet._listen(stop)
        del fleet
        stop.wait(_RETRY_DOWN_S)
