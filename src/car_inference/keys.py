"""KeyPool: several API keys per key variable, spread across requests, rested after a 429,
skipped after a 401/403, with statistics kept on disk.

Keys for a variable come from ``secrets.resolve_keys``: the variable, its plural
(``OPENAI_API_KEYS=k1,k2``), ``config.keys`` and the OS keyring. Each key is known by a sha256
fingerprint: the statistics file (``$CAR_HOME/key_pool_stats.json``) holds fingerprints, masked
keys (``sk-…1a2b``) and counters, never a key.

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
Thread-safe; the file is written atomically (temporary file + ``os.replace``) at once when a key's
health changes and at most once a second otherwise (``flush`` writes what is pending).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from .backends.remote import mask_key
from .config import CarConfig
from .secrets import ResolvedKey, SecretStore, atomic_write_text, resolve_keys

__all__ = ["KeyPool", "KeyStats", "fingerprint", "stats_path_for"]

log = logging.getLogger(__name__)

_FILE_VERSION = 1
_SAVE_INTERVAL_S = 1.0
_HEALTH_STATUSES = frozenset({429, 401, 403})


def fingerprint(key: str) -> str:
    """The name a key goes by on disk: the first 16 hex digits of its sha256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def stats_path_for(config: CarConfig) -> Path:
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

    def saved(self) -> dict[str, Any]:
        data = asdict(self)
        del data["order"]
        return data


class _CachedKeyring:
    """Keyring lookups are slow (D-Bus, Keychain) and may prompt to unlock: only names stored with
    `car secrets put` (the index) are looked up, each at most once per ``ttl_s``."""

    def __init__(self, store: SecretStore, ttl_s: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock
        self._values: dict[str, tuple[float, str | None]] = {}
        self._names: tuple[float, list[str]] = (float("-inf"), [])

    def names(self) -> list[str]:
        now = self.clock()
        if self._names[0] <= now:
            self._names = (now + self.ttl_s, self.store.names())
        return self._names[1]

    def get(self, name: str) -> str | None:
        if name not in self.names():
            return None
        now = self.clock()
        hit = self._values.get(name)
        if hit is None or hit[0] <= now:
            hit = self._values[name] = (now + self.ttl_s, self.store.get(name))
        return hit[1]


class KeyPool:
    """API keys per key variable; implements ``backends.base.KeyProvider``.

    ``env`` (default: ``os.environ``, read live) and ``store`` (default: the OS keyring under
    ``config.home``; None to leave the keyring out) are injectable for tests, as is ``clock``.
    """

    def __init__(
        self,
        config: CarConfig,
        stats_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        store: SecretStore | Literal["default"] | None = "default",
        clock: Callable[[], float] = time.time,
        keyring_ttl_s: float = 60.0,
    ) -> None:
        self.config = config
        self.stats_path = stats_path
        self._env = env
        self._clock = clock
        secret_store = SecretStore(config.home) if store == "default" else store
        self._keyring = (
            _CachedKeyring(secret_store, keyring_ttl_s, clock)
            if isinstance(secret_store, SecretStore)
            else None
        )
        self._lock = threading.RLock()
        self._records: dict[str, _Record] = {}
        self._dirty = False
        self._last_save = 0.0
        self._load()
        _LIVE_POOLS.add(self)

    @classmethod
    def for_config(cls, config: CarConfig, **kwargs: Any) -> KeyPool:
        """The pool for ``config``, its statistics in ``$CAR_HOME/key_pool_stats.json``."""
        return cls(config, stats_path_for(config), **kwargs)

    # --- keys ----------------------------------------------------------------------------------

    def _resolve(self, env_var: str) -> list[ResolvedKey]:
        return resolve_keys(env_var, self.config, env=self._env, store=self._keyring)

    def _record(self, env_var: str, key: str, order: int | None = None) -> _Record:
        fp = fingerprint(key)
        record = self._records.get(fp)
        if record is None:
            record = self._records[fp] = _Record(env_var=env_var, masked=mask_key(key))
        if order is not None:
            record.order = order
        return record

    def acquire(self, env_var: str) -> str | None:
        """A key for ``env_var``: the least recently used healthy one; when all are cooling, the
        one free soonest; None when there is none or every one is disabled."""
        with self._lock:
            now = self._clock()
            usable = [
                (k.value, r)
                for i, k in enumerate(self._resolve(env_var))
                if not (r := self._record(env_var, k.value, i)).disabled
            ]
            if not usable:
                return None
            healthy = [(k, r) for k, r in usable if not r.cooling(now)]
            if healthy:
                key, record = min(healthy, key=lambda kr: (kr[1].last_used or 0.0, kr[1].order))
            else:
                key, record = min(usable, key=lambda kr: (kr[1].cooling_until or 0.0, kr[1].order))
            record.last_used = now
            return key

    def report(self, env_var: str, key: str, *, status: int | None, retry_after: float | None) -> None:
        """How a request with ``key`` went: 2xx clears a cooldown, 429 starts one, 401/403
        disable the key, None (no answer) and other errors only count."""
        with self._lock:
            now = self._clock()
            record = self._record(env_var, key)
            record.requests += 1
            record.last_status = status
            record.last_used = record.last_used or now
            if status is None or status >= 400:
                record.failures += 1
            if status == 429:
                record.rate_limits += 1
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
            elif status is not None and status < 400:
                record.cooling_until = None
            self._dirty = True
            due = status in _HEALTH_STATUSES or now - self._last_save >= _SAVE_INTERVAL_S
        if due:
            self.flush()

    def has_key(self, env_var: str) -> bool:
        """True when ``env_var`` has a key that is not disabled (the registry's key check)."""
        with self._lock:
            return any(not self._record(env_var, k.value).disabled for k in self._resolve(env_var))

    def reset(self, env_var: str | None = None) -> int:
        """Re-enable disabled keys and end cooldowns (of ``env_var``, or all); how many changed."""
        with self._lock:
            changed = 0
            for record in self._records.values():
                if env_var in (None, record.env_var) and (record.disabled or record.cooling_until):
                    record.disabled = False
                    record.cooling_until = None
                    changed += 1
            self._dirty = self._dirty or bool(changed)
        self.flush()
        return changed

    # --- statistics ----------------------------------------------------------------------------

    def known_variables(self) -> set[str]:
        """Variables with recorded statistics, configured keys, stored secrets or an
        ``*_API_KEY(S)`` environment variable."""
        env = os.environ if self._env is None else self._env
        names = {r.env_var for r in self._records.values()} | set(self.config.keys)
        names |= {n for n in env if n.endswith("_API_KEY")}
        names |= {n[:-1] for n in env if n.endswith("_API_KEYS")}
        if self._keyring is not None:
            names |= set(self._keyring.names())
        return names

    def stats(self, env_vars: Iterable[str] | None = None) -> dict[str, list[KeyStats]]:
        """Per variable, its configured keys (in resolution order) then keys seen before."""
        with self._lock:
            now = self._clock()
            out: dict[str, list[KeyStats]] = {}
            for env_var in sorted(set(env_vars) if env_vars is not None else self.known_variables()):
                rows: list[KeyStats] = []
                current = set()
                for i, resolved in enumerate(self._resolve(env_var)):
                    fp = fingerprint(resolved.value)
                    current.add(fp)
                    rows.append(
                        self._stats(fp, self._record(env_var, resolved.value, i), resolved.source, now)
                    )
                for fp, record in self._records.items():
                    if record.env_var == env_var and fp not in current:
                        rows.append(self._stats(fp, record, None, now))
                if rows:
                    out[env_var] = rows
            return out

    @staticmethod
    def _stats(fp: str, record: _Record, source: str | None, now: float) -> KeyStats:
        cooling = record.cooling(now)
        return KeyStats(
            env_var=record.env_var,
            fingerprint=fp,
            masked=record.masked,
            source=source,
            state="disabled" if record.disabled else "cooling" if cooling else "ok",
            requests=record.requests,
            failures=record.failures,
            rate_limits=record.rate_limits,
            last_used=_when(record.last_used),
            last_status=record.last_status,
            cooling_until=_when(record.cooling_until) if cooling else None,
            disabled=record.disabled,
        )

    # --- persistence ---------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            data = json.loads(self.stats_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            log.warning("ignoring unreadable key statistics in %s", self.stats_path)
            return
        entries = data.get("keys", {}) if isinstance(data, dict) else {}
        names = set(_Record.__dataclass_fields__) - {"order"}
        for fp, raw in entries.items() if isinstance(entries, dict) else ():
            if isinstance(raw, dict) and isinstance(raw.get("env_var"), str):
                try:
                    self._records[fp] = _Record(**{k: v for k, v in raw.items() if k in names})
                except TypeError:
                    continue

    def flush(self) -> None:
        """Write the statistics now if anything changed since the last write."""
        with self._lock:
            if not self._dirty:
                return
            payload = {
                "version": _FILE_VERSION,
                "keys": {
                    fp: r.saved() for fp, r in sorted(self._records.items()) if r.requests or r.disabled
                },
            }
            self._dirty = False
            self._last_save = self._clock()
            text = json.dumps(payload, indent=2) + "\n"
            try:
                atomic_write_text(self.stats_path, text, durable=False)
            except OSError as exc:
                log.warning("could not save key statistics to %s: %s", self.stats_path, exc)


def _when(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


_LIVE_POOLS: weakref.WeakSet[KeyPool] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for pool in list(_LIVE_POOLS):
        pool.flush()
