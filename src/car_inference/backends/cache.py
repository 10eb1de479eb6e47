"""Loaded-model cache shared by the in-process backends: a memory budget with LRU eviction.

Each entry holds one loaded instance and its own lock (llama.cpp and torch models are not safe to
run from two threads at once). Loading happens once per key even under concurrent requests.
Eviction only drops our reference: a request still using an evicted model finishes normally.

The budget counts what a load measurably added to the process (resident memory plus CUDA memory),
with the catalog size as the estimate before loading and when a load shows no growth (mmapped
weights not yet touched). It is approximate: loads of different models running at once share
their deltas and the first load of an engine also pays for importing its library (both overstate),
while weights mmapped from a file count only once touched (that understates until then).

Each entry knows when it was loaded and last used (a use ends when its lock is released), which
``car models ps`` shows. A cache given a ``record_dir`` keeps ``loaded-<pid>-<n>.json`` there up to date
and deletes it at exit, so ``car models ps`` in another process sees what a ``car serve`` has
loaded; ``read_records`` skips records of dead processes. Loads and unloads are written at once;
a model starting or stopping being used is written by a thread of the record's own at most every
``RECORD_EVERY_S`` (``_Record``): every use flips it, and a write (two files, a rename) took 0.3
ms, 5-10 % of a short embedding and more than a llama.cpp tokenize, twice per use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..hardware import process_memory_mb
from .fair import FairLock

__all__ = ["RECORD_EVERY_S", "CachedModel", "LoadedModel", "ModelCache", "UseLock", "read_records"]

RECORD_EVERY_S = 0.2  # a use starting or ending reaches the record this late at most (plus a write)
RECORD_IDLE_S = 10.0  # the record's writer thread ends after this long without a change
_CACHES = itertools.count()  # names each cache's record in this process


class UseLock(FairLock):
    """The entry's lock (llama.cpp and torch models are not safe from two threads): a lock taken
    in fair turns between clients (``fair.FairLock``) that also stamps the entry's last use when a
    use starts and ends."""

    def __init__(self, on_use: Callable[[bool], None]) -> None:
        super().__init__()
        self._on_use = on_use

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = super().acquire(blocking, timeout)
        if got:
            self._on_use(True)
        return got

    def release(self) -> None:
        self._on_use(False)
        super().release()


@dataclass
class LoadedModel:
    """One loaded model as ``car models ps`` shows it."""

    key: str
    pid: int
    measured_mb: float | None
    estimated_mb: float
    loaded_at: float
    last_used: float
    busy: bool = False

    @property
    def idle_s(self) -> float:
        return 0.0 if self.busy else max(0.0, round(time.time() - self.last_used, 1))


@dataclass
class CachedModel:
    key: str
    instance: Any
    size_mb: float  # what the budget counts: measured_mb when there is one, else estimated_mb
    lock: UseLock = field(default_factory=lambda: UseLock(lambda _: None))
    estimated_mb: float = 0.0
    measured_mb: float | None = None
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    busy: int = 0

    def used(self, starting: bool) -> None:
        self.busy += 1 if starting else -1
        self.last_used = time.time()

    def loaded(self) -> LoadedModel:
        return LoadedModel(self.key, os.getpid(), self.measured_mb, self.estimated_mb,
                           self.loaded_at, self.last_used, self.busy > 0)  # fmt: skip


class ModelCache:
    def __init__(self, budget_mb: float, record_dir: Path | None = None) -> None:
        self.budget_mb = budget_mb
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.evictions: list[str] = []
        self.record: _Record | None = None
        if record_dir is not None:
            name = f"loaded-{os.getpid()}-{next(_CACHES)}.json"  # a process may have several engines
            self.record = _Record(record_dir / name, weakref.WeakMethod(self.loaded))
            weakref.finalize(self, self.record.close)  # collected, or the process exits

    def get(self, key: str) -> CachedModel | None:
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used = time.time()
            return entry

    def loaded(self) -> list[LoadedModel]:
        """What is loaded now, least recently used first."""
        with self._guard:
            return [e.loaded() for e in self._entries.values()]

    # --- the record other processes read ------------------------------------------------------

    def _use(self, entry: CachedModel, starting: bool) -> None:
        entry.used(starting)
        if self.record is not None and entry.busy == (1 if starting else 0):  # ps shows idle/busy
            self.record.soon()

    def _record(self) -> None:
        if self.record is not None:
            self.record.write()

    def get_or_load(self, key: str, size_mb: float, loader: Callable[[], Any]) -> CachedModel:
        """The cached entry for ``key``, loading it with ``loader`` (blocking) when absent."""
        entry = self.get(key)
        if entry is not None:
            return entry
        with self._guard:
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:
            entry = self.get(key)
            if entry is not None:
                return entry
            with self._guard:
                self._make_room(size_mb)
            before = process_memory_mb()
            instance = loader()
            grew = round(process_memory_mb() - before)  # under 1 MB is noise, not the model
            measured = float(grew) if grew > 0 else None
            entry = CachedModel(key=key, instance=instance, size_mb=measured or size_mb,
                                estimated_mb=size_mb, measured_mb=measured)  # fmt: skip
            entry.lock = UseLock(functools.partial(self._use, entry))
            with self._guard:
                self._make_room(entry.size_mb)  # the measured size may exceed the estimate
                self._entries[key] = entry
                self._loading.pop(key, None)
            self._record()
            return entry

    def _make_room(self, size_mb: float) -> None:
        # A model bigger than the whole budget still loads, alone.
        while self._entries and self.used_mb + size_mb > self.budget_mb:
            key, _ = self._entries.popitem(last=False)
            self.evictions.append(key)

    def close(self) -> None:
        """Remove the record and let go of every loaded model (the engine is closed): they stayed
        in memory while the engine object was referenced (a notebook's `engine` after `with`)."""
        if self.record is not None:
            self.record.close()
        self.clear()

    def invalidate(self, key: str) -> None:
        with self._guard:
            self._entries.pop(key, None)
        self._record()

    def clear(self) -> None:
        with self._guard:
            self._entries.clear()
        self._record()

    @property
    def used_mb(self) -> float:
        return sum(e.size_mb for e in self._entries.values())

    def keys(self) -> list[str]:
        with self._guard:
            return list(self._entries)


class _Record:
    """``path``, the JSON record of what ``snapshot()()`` says is loaded (a weak method: the
    cache's finalizer closes its record, which must not keep it alive): written now (``write``, for
    loads and unloads) or by a thread of its own within ``RECORD_EVERY_S`` (``soon``, for uses,
    which come in bursts: one write carries all of a burst's). Writes take turns, each of the state
    when it starts, so the last one written is the newest; none after ``close``."""

    def __init__(self, path: Path, snapshot: Callable[[], Callable[[], list[LoadedModel]] | None]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._writing = threading.Lock()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_guard = threading.Lock()
        self._closed = False
        self.writes = 0  # records written (tests)

    def write(self) -> None:
        with self._writing, contextlib.suppress(OSError):
            if self._closed:
                return
            self.writes += 1
            snapshot = self._snapshot()
            models = [vars(m) for m in snapshot()] if snapshot is not None else []
            if not models:
                self.path.unlink(missing_ok=True)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "models": models}))
            tmp.replace(self.path)

    def soon(self) -> None:
        self._changed.set()
        if self._thread is None:
            with self._thread_guard:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._run, name="car-loaded-record", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            if not self._changed.wait(RECORD_IDLE_S):
                with self._thread_guard:  # soon() sets the event before it looks for this thread
                    if not self._changed.is_set():
                        self._thread = None
                        return
                continue
            time.sleep(RECORD_EVERY_S)  # the rest of the burst
            self._changed.clear()
            self.write()

    def close(self) -> None:
        """Remove the record; nothing writes it again."""
        with self._writing, contextlib.suppress(OSError):
            self._closed = True
            self.path.unlink(missing_ok=True)


def read_records(record_dir: Path) -> list[LoadedModel]:
    """What the live processes using ``record_dir`` have loaded (records of dead ones are removed)."""
    from ..runtimes.state import pid_alive

    found: list[LoadedModel] = []
    for path in sorted(record_dir.glob("loaded-*.json")) if record_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = data.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found.extend(m for m in map(_loaded, data.get("models") or []) if m is not None)
    return found


_LOADED_FIELDS = frozenset(f.name for f in dataclasses.fields(LoadedModel))


def _loaded(entry: object) -> LoadedModel | None:
    """One model of a record, or None for an entry of another shape (a process of another car
    version, a damaged file): `car models ps` crashed on one with a field it did not know."""
    if not isinstance(entry, dict):
        return None
    try:
        return LoadedModel(**{k: v for k, v in entry.items() if k in _LOADED_FIELDS})
    except TypeError:  # a field it needs is missing
        return None
