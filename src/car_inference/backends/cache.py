"""Loaded-model cache shared by the in-process backends: a memory budget with LRU eviction.

Each entry holds one loaded instance and its own lock (llama.cpp and torch models are not safe to
run from two threads at once). Loading happens once per key even under concurrent requests.
Eviction only drops our reference: a request still using an evicted model finishes normally.

The budget counts what a load measurably added to the process (resident memory plus CUDA memory),
with the catalog size as the estimate before loading and when a load shows no growth (mmapped
weights not yet touched). It is approximate: loads of different models running at once share
their deltas and the first load of an engine also pays for importing its library (both overstate),
while weights mmapped from a file count only once touched (that understates until then).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..hardware import process_memory_mb

__all__ = ["CachedModel", "ModelCache"]


@dataclass
class CachedModel:
    key: str
    instance: Any
    size_mb: float  # what the budget counts: measured_mb when there is one, else estimated_mb
    lock: threading.Lock = field(default_factory=threading.Lock)
    estimated_mb: float = 0.0
    measured_mb: float | None = None


class ModelCache:
    def __init__(self, budget_mb: float) -> None:
        self.budget_mb = budget_mb
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.evictions: list[str] = []

    def get(self, key: str) -> CachedModel | None:
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

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
            with self._guard:
                self._make_room(entry.size_mb)  # the measured size may exceed the estimate
                self._entries[key] = entry
                self._loading.pop(key, None)
            return entry

    def _make_room(self, size_mb: float) -> None:
        # A model bigger than the whole budget still loads, alone.
        while self._entries and self.used_mb + size_mb > self.budget_mb:
            key, _ = self._entries.popitem(last=False)
            self.evictions.append(key)

    def invalidate(self, key: str) -> None:
        with self._guard:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._guard:
            self._entries.clear()

    @property
    def used_mb(self) -> float:
        return sum(e.size_mb for e in self._entries.values())

    def keys(self) -> list[str]:
        with self._guard:
            return list(self._entries)
