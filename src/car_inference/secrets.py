"""API keys: where they come from, and the OS keyring store behind `car secrets`.

Resolution order for a key variable such as ``OPENAI_API_KEY`` (``resolve_keys``):

1. the environment variable itself;
2. its plural, ``OPENAI_API_KEYS=k1,k2`` (comma-separated);
3. ``config.keys["OPENAI_API_KEY"]`` (a list in ``config.toml``);
4. the OS keyring, service ``car-inference``, user name = the variable (``car secrets put``).
   A stored value may hold several keys separated by commas.

Duplicates are dropped, first source wins. The keyring comes through the optional ``keyring``
package (``pip install 'car-inference[keyring]'``); when it is not installed or has no usable
backend, resolution skips it and ``SecretStore.put`` fails with a one-line error naming the fix.
The keyring cannot list what it holds, so ``$CAR_HOME/secrets.json`` keeps an index of the names
stored here (names only, never values), written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import CarConfig
from .errors import ConfigError, InferenceError

__all__ = [
    "SERVICE",
    "CachedSecrets",
    "ResolvedKey",
    "SecretStore",
    "SecretStoreUnavailable",
    "atomic_write_text",
    "check_name",
    "header_safe",
    "no_usable_key",
    "resolve_keys",
]

log = logging.getLogger(__name__)

SERVICE = "car-inference"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INSTALL_HINT = "pip install 'car-inference[keyring]'"


class SecretSource(Protocol):
    def get(self, name: str) -> str | None: ...


class SecretStoreUnavailable(InferenceError):
    """The OS keyring cannot be used: the package is missing or no backend works here."""


@dataclass(frozen=True)
class ResolvedKey:
    """A key and where it came from: ``env``, ``env:NAME_KEYS``, ``config`` or ``keyring``."""

    value: str
    source: str

    def __repr__(self) -> str:  # never the value
        return f"ResolvedKey(source={self.source!r})"


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``; readers
    see the old file or the new one, never a part. ``durable`` syncs to disk before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"{name!r} is not a valid secret name (use letters, digits and _, like OPENAI_API_KEY)"
        )
    return name


class SecretStore:
    """Secrets in the OS keyring under service ``car-inference``, with a name index in ``home``."""

    def __init__(self, home: Path, service: str = SERVICE) -> None:
        self.home = home
        self.service = service

    @property
    def index_path(self) -> Path:
        return self.home / "secrets.json"

    def _keyring(self) -> Any:
        try:
            import keyring
            from keyring.backends import fail
        except ImportError:
            raise SecretStoreUnavailable(f"the keyring package is not installed: {_INSTALL_HINT}") from None
        backend = keyring.get_keyring()
        if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 1) <= 0:
            raise SecretStoreUnavailable(
                "no usable OS keyring backend on this machine: install one (e.g. `pip install "
                "keyrings.alt`) or set the key as an environment variable instead"
            )
        return keyring

    def available(self) -> bool:
        try:
            self._keyring()
        except SecretStoreUnavailable:
            return False
        return True

    def ensure_available(self) -> None:
        """``SecretStoreUnavailable`` saying why (and what to install) when the keyring cannot
        be used."""
        self._keyring()

    def put(self, name: str, value: str) -> None:
        check_name(name)
        value = value.strip()
        if not value:
            raise ConfigError(f"refusing to store an empty value for {name}")
        if not header_safe(value):
            raise ConfigError(
                f"refusing to store {name}: it holds a character an HTTP header cannot carry "
                "(a zero-width space, a line break, a non-ASCII letter?)"
            )
        keyring = self._keyring()
        # The keyring's write inside the index's lock, after the index reads: a file keyring
        # rewrites its whole file, and puts at once lost each other's values (and older ones);
        # a value stored before an unreadable index refused the put was kept, never listed.
        with self._index_locked():
            names = self.indexed()
            try:
                keyring.set_password(self.service, name, value)
            except keyring.errors.KeyringError as exc:
                raise SecretStoreUnavailable(
                    f"the keyring refused to store {name}: {type(exc).__name__}"
                ) from None
            self._write_index(sorted({*names, name}))

    def get(self, name: str) -> str | None:
        """The stored value, or None when absent or when the keyring cannot be used."""
        try:
            keyring = self._keyring()
            return keyring.get_password(self.service, name)
        except SecretStoreUnavailable:
            return None
        except Exception as exc:  # a broken backend must not break key resolution
            log.debug("keyring lookup of %s failed: %s", name, type(exc).__name__)
            return None

    def delete(self, name: str) -> bool:
        """Remove ``name``; False when it was not stored."""
        check_name(name)
        keyring = self._keyring()
        with self._index_locked():
            existed = name in self.indexed()
            try:
                keyring.delete_password(self.service, name)
                existed = True
            except keyring.errors.PasswordDeleteError:
                pass
            self._write_index([n for n in self.indexed() if n != name])
        return existed

    def names(self) -> list[str]:
        """The stored names; an unreadable index reads as none, with a warning (key resolution
        must go on: the environment and config.toml still give keys). ``indexed`` refuses it."""
        try:
            return self.indexed()
        except ConfigError:
            log.warning("ignoring unreadable %s", self.index_path)
            return []

    def indexed(self) -> list[str]:
        """``names()`` for a change of the index: an unreadable index is refused, not replaced by
        the one name being stored (the others' keys were then never looked up again)."""
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        else:
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, list):
                return sorted(n for n in names if isinstance(n, str) and _NAME.match(n))
            # `[1, 2]` was replaced, `{"names": "OPENAI_API_KEY"}` read letter by letter
            problem = 'not {"names": [...]}'
        raise ConfigError(
            f"cannot be read ({problem}): fix it, or delete it and put the keys again"
            " (the keyring keeps their values; this file lists their names)",
            path=str(self.index_path),
        )

    @contextlib.contextmanager
    def _index_locked(self) -> Iterator[None]:
        """The index's read, change and write as one step across processes: eight `car secrets
        put` at once left six names in it (each wrote what it had read, plus its own)."""
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.index_path.with_name(self.index_path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_index(self, names: list[str]) -> None:
        atomic_write_text(self.index_path, json.dumps({"names": names}, indent=2) + "\n")


class CachedSecrets:
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


def resolve_keys(
    env_var: str,
    config: CarConfig | None = None,
    *,
    env: Mapping[str, str] | None = None,
    store: SecretSource | None = None,
) -> list[ResolvedKey]:
    """Every key for ``env_var``, in resolution order, without duplicates."""
    env = os.environ if env is None else env
    found: list[ResolvedKey] = []
    seen: set[str] = set()

    def add(values: list[str], source: str) -> None:
        for value in values:
            if value not in seen and _sendable(value, env_var, source):
                seen.add(value)
                found.append(ResolvedKey(value, source))

    add(_split(env.get(env_var)), "env")
    add(_split(env.get(env_var + "S")), f"env:{env_var}S")
    if config is not None:
        add([k.strip() for k in config.keys.get(env_var, []) if k.strip()], "config")
    if store is not None:
        add(_split(store.get(env_var)), "keyring")
    return found


_WARNED: set[tuple[str, str]] = set()


def header_safe(value: str) -> bool:
    """Whether ``value`` can go in an HTTP header (printable ASCII, spaces and tabs)."""
    return all(" " <= c <= "~" or c == "\t" for c in value)


def _sendable(value: str, env_var: str, source: str) -> bool:
    """A key an HTTP header can carry; another (a pasted zero-width space or line break) failed
    every request it was picked for as a "malformed response", never rotated past: skipped, said
    once per variable and source (never the key)."""
    if header_safe(value):
        return True
    if (env_var, source) not in _WARNED:
        _WARNED.add((env_var, source))
        log.warning(
            "a key in %s (%s) holds a character an HTTP header cannot carry (a pasted zero-width "
            "space or line break?): it is skipped",
            env_var,
            source,
        )
    return False


def no_usable_key(env_var: str, refused: bool) -> str:
    """Why ``env_var`` gives no key, and what to do: set one, or replace (or reset) refused ones."""
    if refused:
        return (
            f"every key in {env_var} was refused by the provider (401/403) and is skipped: replace it,"
            f" or run `car keys reset {env_var}` once it is valid again"
        )
    given = _split(os.environ.get(env_var)) + _split(os.environ.get(env_var + "S"))
    if given and not any(header_safe(value) for value in given):  # set, said "set OPENAI_API_KEY"
        return (
            f"every key in {env_var} holds a character an HTTP header cannot carry (a pasted"
            " zero-width space or line break) and is skipped: set it again without it"
        )
    return f"set {env_var} (or store it with `car secrets put {env_var}`)"
