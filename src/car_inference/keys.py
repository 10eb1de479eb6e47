"""KeyPool: several API keys per key variable, spread across requests, rested after a 429,
skipped after a 401/403, with statistics kept on disk.

Keys for a variable come from ``secrets.resolve_keys``: the variable, its plural
(``OPENAI_API_KEYS=k1,k2``), ``config.keys`` and the OS keyring. Each key is known by a sha256
fingerprint: the statistics (table ``key_stats`` beside the router's state: ``$CAR_HOME/state.db``,
or the PostgreSQL database of ``[state] url`` that replicas share; see ``keys_store``) hold
fingerprints, masked keys (``sk-…1a2b``) and counters, never a key.

Selection (``acquire``): among the variable's usable keys, the least recently handed out, so load
spreads round-robin. A key that answered 429 cools down for the provider's Retry-After, else
``config.remote.rate_limit_cooldown_s``; a key that answered 401 or 403 is disabled until it is
replaced (a new key has a new fingerprint) or ``reset``. When every usable key is cooling,
``acquire`` still returns the one whose cooldown ends first: the provider's answer stays the
authority (a single-key user is never locked out by our bookkeeping) and the engine's breaker and
fallbacks deal with a provider that keeps refusing. It returns None only when the variable has no
key or all its keys are disabled.

Backends call ``acquire`` -> request -> ``report(status=...)`` (200 on success, the HTTP status
on failure, None when the request never got an answer), and on 429/401/403 try the next key.
Thread-safe, and safe for several processes (a server and a CLI, server workers): counters are
kept as increments and written as SQL upserts (``requests = requests + ?``), never by writing back
totals read earlier, so no process loses another's counts. Increments are written at once when a
key's health changes and at most once a second otherwise (``flush`` writes what is pending; so a
process killed outright loses at most its last second of counts). Health (cooling, disabled) is
shared: a key refused in one process is skipped by the others after their next write or ``stats``.
The JSON file of earlier versions (``key_pool_stats.json``) is imported once.

Across replicas (``[coordination] redis_url``, a ``routing.coord.Fleet``): a 429 or a 401/403 is
also written to Redis at once, and every replica's fleet thread reads the fleet's cooling and
disabled keys every ``refresh_ms``, so a key refused on one replica is skipped by all within about
that long; ``reset`` clears them for the fleet. In a fleet a cooldown lasts its term (a success on
another replica does not end it early: that request may have started before the 429). While Redis
is away each replica goes by its own answers (and the statistics' shared health, as above).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from .config import CarConfig
from .keys_store import (
    KeyStatsDB,
    KeyStatsError,
    Pending,
    as_count,
    as_status,
    as_time,
    import_legacy,
    key_row,
    open_key_stats,
)
from .secrets import CachedSecrets, ResolvedKey, SecretStore, resolve_keys

if TYPE_CHECKING:
    from .routing.coord import Fleet

__all__ = ["KeyPool", "KeyStats", "fingerprint", "legacy_stats_path"]

log = logging.getLogger(__name__)

_SAVE_INTERVAL_S = 1.0
_HEALTH_STATUSES = frozenset({429, 401, 403})
# While every key of a variable is disabled, the database is read again this often when one is
# asked for: `car keys reset` in another process never reached a server whose only key was
# refused (it makes no requests, so it wrote nothing and never re-read the keys' health).
_RECHECK_S = 2.0
_RECHECK_WAIT_S = 1.0  # the most a request waits for that re-read


def fingerprint(key: str) -> str:
    """The name a key goes by on disk: the first 16 hex digits of its sha256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _mask(key: str) -> str:
    """``sk-…1a2b``: the last 4 characters tell keys apart; a short key shows fewer, so that most
    of it stays hidden (the prefix only when the key is long enough to spare it)."""
    if len(key) >= 12:
        return f"{key[:3]}…{key[-4:]}"
    return "…" + key[-min(4, len(key) // 2) :] if len(key) >= 2 else "…"


def legacy_stats_path(config: CarConfig) -> Path:
    """Where earlier versions kept key statistics as JSON (imported once into state.db)."""
    return config.home / "key_pool_stats.json"


class KeyStats(BaseModel):
    """How one key has fared. ``source`` is None for a key seen before but not configured now."""

    env_var: str
    fingerprint: str
    masked: str
    source: str | None = None
    state: Literal["ok", "cooling", "disabled"] = "ok"
    requests: int = 0
    failures: int = 0
    rate_limits: int = 0
    last_used: datetime | None = None
    last_status: int | None = None
    cooling_until: datetime | None = None
    disabled: bool = False


@dataclass
class _Record:
    env_var: str
    masked: str
    requests: int = 0
    failures: int = 0
    rate_limits: int = 0
    last_used: float | None = None
    last_status: int | None = None
    cooling_until: float | None = None
    disabled: bool = False
    order: int = field(default=0, compare=False)  # tie-break: resolution order (not saved)

    def cooling(self, now: float) -> bool:
        return self.cooling_until is not None and self.cooling_until > now


class KeyPool:
    """API keys per key variable; implements ``backends.base.KeyProvider``.

    Statistics live in ``config.paths.state_db``; ``legacy_path`` is a JSON statistics file of
    earlier versions, imported once. ``env`` (default: ``os.environ``, read live) and ``store``
    (default: the OS keyring under ``config.home``; None to leave the keyring out) are injectable
    for tests, as is ``clock``.
    """

    def __init__(
        self,
        config: CarConfig,
        legacy_path: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        store: SecretStore | Literal["default"] | None = "default",
        clock: Callable[[], float] = time.time,
        keyring_ttl_s: float = 60.0,
        fleet: Fleet | Literal["config"] | None = "config",
    ) -> None:
        """``fleet``: the replica's link to the fleet (None: this process only; "config": one of
        its own when ``[coordination] redis_url`` is set, closed with the pool)."""
        self.config = config
        self._own_fleet = fleet == "config"
        if fleet == "config":
            from .routing.coord import Fleet

            fleet = Fleet.for_settings(config.coordination)
        self.fleet: Fleet | None = fleet
        if fleet is not None:
            fleet.on_keys_cleared(_weak_listener(self))
        self.db_path = config.paths.state_db
        self.legacy_path = legacy_path
        self._env = env
        self._clock = clock
        secret_store = SecretStore(config.home) if store == "default" else store
        self._keyring = (
            CachedSecrets(secret_store, keyring_ttl_s, clock)
            if isinstance(secret_store, SecretStore)
            else None
        )
        self._lock = threading.RLock()  # the records; never held across a database call
        # One database call, or a write and the read after it, at a time (off the request path:
        # a database that stopped answering held the event loop, and every replica with it).
        self._io_lock = threading.RLock()
        self._flushing = self._flush_again = self._rechecking = False
        self._records: dict[str, _Record] = {}
        self._pending: dict[str, Pending] = {}
        self._last_save = 0.0
        self._rechecked: dict[str, float] = {}  # variable -> when its disabled keys were re-read
        self._timer: threading.Timer | None = None
        self._db = self._open()
        if self._db is not None and legacy_path is not None:
            import_legacy(self._db, legacy_path)
        self._refresh()
        _LIVE_POOLS.add(self)

    @classmethod
    def for_config(cls, config: CarConfig, **kwargs: Any) -> KeyPool:
        """The pool for ``config``: statistics in ``$CAR_HOME/state.db``, importing
        ``$CAR_HOME/key_pool_stats.json`` once when an earlier version left one."""
        return cls(config, legacy_stats_path(config), **kwargs)

    # --- keys ----------------------------------------------------------------------------------

    def _resolve(self, env_var: str) -> list[ResolvedKey]:
        return resolve_keys(env_var, self.config, env=self._env, store=self._keyring)

    def _record(self, env_var: str, key: str, order: int | None = None) -> _Record:
        fp = fingerprint(key)
        record = self._records.get(fp)
        if record is None:
            record = self._records[fp] = _Record(env_var=env_var, masked=_mask(key))
        record.masked = _mask(key)  # a row written by an earlier version may be masked otherwise
        if order is not None:
            record.order = order
        return record

    def _health(self, key: str, record: _Record) -> tuple[bool, float | None]:
        """(disabled, cooling until) of a key: its own record's, or the fleet's where that says more."""
        if self.fleet is None:
            return record.disabled, record.cooling_until
        fleet = self.fleet.key_health().get(fingerprint(key))
        if fleet is None:
            return record.disabled, record.cooling_until
        until = record.cooling_until
        if fleet.cooling_until is not None:
            theirs = self._clock() + (fleet.cooling_until - time.monotonic())
            until = theirs if until is None else max(until, theirs)
        return record.disabled or fleet.disabled, until

    def acquire(self, env_var: str, *, resting: bool = True) -> str | None:
        """The least recently used healthy key of ``env_var``, else (``resting``) the one cooling
        that is free soonest; None when none is, or when every one is disabled."""
        self._recheck_if_refused(env_var)
        with self._lock:
            now = self._clock()
            keys = self._resolve(env_var)
            usable: list[tuple[str, _Record, float]] = []
            for i, k in enumerate(keys):
                record = self._record(env_var, k.value, i)
                disabled, until = self._health(k.value, record)
                if not disabled:
                    usable.append((k.value, record, until if until is not None and until > now else 0.0))
            healthy = [(k, r, u) for k, r, u in usable if not u]
            if healthy:
                key, record, _ = min(healthy, key=lambda kru: (kru[1].last_used or 0.0, kru[1].order))
            elif not usable or not resting:
                return None
            else:
                key, record, _ = min(usable, key=lambda kru: (kru[2], kru[1].order))
            record.last_used = now
            return key

    def rest_left(self, env_var: str) -> float:
        """Seconds until a key of ``env_var`` that is not disabled is free again: 0 while one is
        (or none is usable at all), else how long the soonest of those cooling after a 429 rests."""
        with self._lock:
            now, left = self._clock(), float("inf")
            for i, k in enumerate(self._resolve(env_var)):
                disabled, until = self._health(k.value, self._record(env_var, k.value, i))
                if not disabled:
                    left = min(left, max(0.0, (until or 0.0) - now))
            return 0.0 if left == float("inf") else left

    def report(self, env_var: str, key: str, *, status: int | None, retry_after: float | None) -> None:
        """How a request with ``key`` went: 2xx clears a cooldown, 429 starts one, 401/403
        disable the key, None (no answer) and other errors only count."""
        with self._lock:
            now = self._clock()
            record = self._record(env_var, key)
            pending = self._pending.setdefault(fingerprint(key), Pending())
            record.requests += 1
            pending.requests += 1
            record.last_status = status
            pending.reported = True
            record.last_used = record.last_used or now
            if status is None or status >= 400:
                record.failures += 1
                pending.failures += 1
            if status == 429:
                record.rate_limits += 1
                pending.rate_limits += 1
                wait = retry_after if retry_after is not None else self.config.remote.rate_limit_cooldown_s
                record.cooling_until = now + wait
                log.info("%s key %s is rate limited; resting it %.0f s", env_var, record.masked, wait)
            elif status in (401, 403):
                if not record.disabled:
                    log.warning(
                        "%s key %s was refused (%s); it is skipped until replaced or reset",
                        env_var,
                        record.masked,
                        status,
                    )
                record.disabled = True
            elif status is not None and status < 400 and record.cooling_until is not None:
                record.cooling_until = None
                pending.health = True
            pending.health = pending.health or status in _HEALTH_STATUSES
            due = pending.health or now - self._last_save >= _SAVE_INTERVAL_S
        if self.fleet is not None and status in _HEALTH_STATUSES:  # the fleet skips it too
            if status == 429:
                self.fleet.put_key(fingerprint(key), cooling_s=(record.cooling_until or now) - now)
            else:
                self.fleet.put_key(fingerprint(key), disabled=True)
        self._flush_soon() if due else self._flush_later()

    def _flush_soon(self) -> None:
        """Write now, on a thread of its own: the caller (the event loop) never waits for the
        database. News that comes while a write is under way is written right after it."""
        with self._lock:
            if self._flushing:
                self._flush_again = True
                return
            self._flushing = True
        threading.Thread(target=self._flush_until_done, name="car-key-stats", daemon=True).start()

    def _flush_until_done(self) -> None:
        while True:
            self.flush()
            with self._lock:
                if not self._flush_again:
                    self._flushing = False
                    return
                self._flush_again = False

    def _flush_later(self) -> None:
        """Counts not written at once are written within ``_SAVE_INTERVAL_S`` (a daemon timer),
        so a process killed outright loses at most that much."""
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(_SAVE_INTERVAL_S, self._timed_flush)
            self._timer.daemon = True
            self._timer.start()

    def _timed_flush(self) -> None:
        with self._lock:
            self._timer = None
        self.flush()

    def _fleet_cleared(self, fps: list[str]) -> None:
        """The fleet lifted these keys' refusals (a reset on a replica, or a cooldown over):
        this replica's own copies go too."""
        with self._lock:
            for fp in fps:
                record = self._records.get(fp)
                if record is not None and (record.disabled or record.cooling_until is not None):
                    record.disabled, record.cooling_until = False, None
                    self._pending.setdefault(fp, Pending()).health = True
        self._flush_later()

    def has_key(self, env_var: str) -> bool:
        """True when ``env_var`` has a key that is not disabled (the registry's key check)."""
        self._recheck_if_refused(env_var)
        with self._lock:
            keys = self._resolve(env_var)
            return any(not self._health(k.value, self._record(env_var, k.value))[0] for k in keys)

    def refused(self, env_var: str) -> bool:
        """True when ``env_var`` has keys and the provider refused every one (each is disabled)."""
        with self._lock:
            keys = self._resolve(env_var)
            return bool(keys) and all(self._health(k.value, self._record(env_var, k.value))[0] for k in keys)

    def _recheck_if_refused(self, env_var: str) -> None:
        """When every key of ``env_var`` is disabled, their health as the database has it now
        (another process's `car keys reset`), at most every ``_RECHECK_S``, waiting at most
        ``_RECHECK_WAIT_S`` for it: a database that does not answer leaves the keys as they were."""
        if self._db is None:
            return
        with self._lock:
            keys = self._resolve(env_var)
            if not keys or self._rechecking:
                return
            if not all(self._health(k.value, self._record(env_var, k.value))[0] for k in keys):
                return
            now = time.monotonic()
            if now - self._rechecked.get(env_var, -_RECHECK_S) < _RECHECK_S:
                return
            self._rechecked[env_var] = now
            self._rechecking = True

        def recheck() -> None:
            try:
                self.flush()  # this process's own news first (a refusal not written yet would be lost)
                self._refresh()
            finally:
                with self._lock:
                    self._rechecking = False

        worker = threading.Thread(target=recheck, name="car-key-recheck", daemon=True)
        worker.start()
        worker.join(_RECHECK_WAIT_S)

    def reset(self, env_var: str | None = None) -> int:
        """Re-enable disabled keys and end cooldowns (of ``env_var``, or all); how many changed."""
        self._refresh()  # keys another process disabled are reset too
        with self._lock:
            changed = 0
            fleet = self.fleet.key_health() if self.fleet is not None else {}
            if fleet:  # keys only the fleet refused: known here once resolved
                for name in [env_var] if env_var is not None else sorted(self.known_variables()):
                    for resolved in self._resolve(name):
                        self._record(name, resolved.value)
            cleared = []
            for fp, record in self._records.items():
                if env_var not in (None, record.env_var):
                    continue
                if fp in fleet:
                    cleared.append(fp)
                if record.disabled or record.cooling_until or fp in fleet:
                    record.disabled = False
                    record.cooling_until = None
                    self._pending.setdefault(fp, Pending()).health = True
                    changed += 1
        if self.fleet is not None:
            self.fleet.clear_keys(list(fleet) if env_var is None else cleared)
        self.flush()
        return changed

    # --- statistics ----------------------------------------------------------------------------

    def known_variables(self) -> set[str]:
        """Variables with recorded statistics, configured keys, stored secrets or an ``*_API_KEY(S)``
        environment variable but car's own (CAR_SERVER_API_KEYS: its clients' keys, no provider's)."""
        env = os.environ if self._env is None else self._env
        names = {r.env_var for r in self._records.values()} | set(self.config.keys)
        keyed = (n for n in env if n.endswith(("_API_KEY", "_API_KEYS")) and not n.startswith("CAR_"))
        names |= {n.removesuffix("S") for n in keyed}
        if self._keyring is not None:
            names |= set(self._keyring.names())
        return names

    def stats(self, env_vars: Iterable[str] | None = None) -> dict[str, list[KeyStats]]:
        """Per variable, its configured keys (in resolution order) then keys seen before, with
        every process's counts."""
        self.flush()
        self._refresh()
        with self._lock:
            now = self._clock()
            out: dict[str, list[KeyStats]] = {}
            for env_var in sorted(set(env_vars) if env_vars is not None else self.known_variables()):
                rows: list[KeyStats] = []
                current = set()
                for i, resolved in enumerate(self._resolve(env_var)):
                    fp = fingerprint(resolved.value)
                    current.add(fp)
                    record = self._record(env_var, resolved.value, i)
                    health = self._health(resolved.value, record)
                    rows.append(self._stats(fp, record, resolved.source, now, health))
                for fp, record in self._records.items():
                    if record.env_var == env_var and fp not in current:
                        rows.append(
                            self._stats(fp, record, None, now, (record.disabled, record.cooling_until))
                        )
                if rows:
                    out[env_var] = rows
            return out

    @staticmethod
    def _stats(
        fp: str, record: _Record, source: str | None, now: float, health: tuple[bool, float | None]
    ) -> KeyStats:
        disabled, until = health
        cooling = until is not None and until > now
        return KeyStats(
            env_var=record.env_var,
            fingerprint=fp,
            masked=record.masked,
            source=source,
            state="disabled" if disabled else "cooling" if cooling else "ok",
            requests=record.requests,
            failures=record.failures,
            rate_limits=record.rate_limits,
            last_used=_when(record.last_used),
            last_status=record.last_status,
            cooling_until=_when(until) if cooling else None,
            disabled=disabled,
        )

    # --- persistence ---------------------------------------------------------------------------

    def _open(self) -> KeyStatsDB | None:
        self.stats_error: str | None = None  # why the statistics live in memory only, if they do
        try:
            return open_key_stats(self.config)
        except KeyStatsError as exc:
            log.warning("key statistics stay in memory: %s", exc)
            self.stats_error = str(exc)
            return None

    def _refresh(self) -> None:
        """Take every process's counts and health from the database (pending increments of this
        process are added on top)."""
        db = self._db
        if db is None:
            return
        with self._io_lock:  # never between a write and the records it changed
            try:
                rows = db.read()
            except KeyStatsError as exc:
                log.warning("could not read key statistics: %s", exc)
                return
            with self._lock:
                self._apply(rows)

    def _apply(self, rows: list[tuple[Any, ...]]) -> None:
        """Under ``_lock``: the database's rows, with this process's pending increments on top."""
        for fp, env_var, masked, *values in rows:
            requests, failures, rate_limits = (as_count(v) for v in values[:3])
            used, status, cooling, off = (
                as_time(values[3]),
                as_status(values[4]),
                as_time(values[5]),
                values[6],
            )
            record = self._records.get(fp)
            if record is None:
                record = self._records[fp] = _Record(env_var=env_var, masked=masked)
            pending = self._pending.get(fp, Pending())
            record.requests = requests + pending.requests
            record.failures = failures + pending.failures
            record.rate_limits = rate_limits + pending.rate_limits
            record.last_used = max(used or 0.0, record.last_used or 0.0) or None
            if not pending.reported:
                record.last_status = status
            if not pending.health:
                record.cooling_until, record.disabled = cooling, bool(off)

    def flush(self) -> None:
        """Write this process's increments and health news now, if there are any. The records
        stay free meanwhile: requests take keys and report while the database is written."""
        with self._io_lock:
            with self._lock:
                if not self._pending:
                    return
                self._last_save = self._clock()
                db = self._db
                if db is None:
                    self._pending.clear()
                    return
                taken, self._pending = self._pending, {}
                rows = [
                    key_row(fp, asdict(self._records[fp]), reported=p.reported, health=p.health) | p.counts()
                    for fp, p in taken.items()
                ]
            try:
                db.write(rows)
            except KeyStatsError as exc:
                log.warning("could not save key statistics: %s", exc)
                with self._lock:  # kept pending: the next write tries again
                    for fp, p in taken.items():
                        self._pending.setdefault(fp, Pending()).merge(p)
                return
            self._refresh()

    def close(self) -> None:
        """Write what is pending and close the database."""
        self.flush()
        with self._io_lock:
            with self._lock:
                db, self._db = self._db, None
            if db is not None:
                db.close()
        if self._own_fleet and self.fleet is not None:
            self.fleet.close()
            self.fleet = None


def _weak_listener(pool: KeyPool) -> Callable[[list[str]], None]:
    """``pool._fleet_cleared`` without keeping the pool alive from the fleet's thread."""
    ref = weakref.ref(pool)

    def listener(fps: list[str]) -> None:
        live = ref()
        if live is not None:
            live._fleet_cleared(fps)

    return listener


def _when(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


_LIVE_POOLS: weakref.WeakSet[KeyPool] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for pool in list(_LIVE_POOLS):
        pool.flush()
