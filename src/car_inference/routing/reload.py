"""How ``OutcomeTracker.reload`` reads the store: all of it now and then, else what changed.

A busy fleet reloads the learned state up to four times a second on each replica (``coord.py``).
Reading every ``task_stats`` row and every model's latency window each time cost a median 63 ms
per reload (42 ms of the thread's CPU, holding the GIL the server's event loop needs) with 50
models, 5,500 rows and 200,000 traces on PostgreSQL; reading the changes, 4 ms when 50 rows change
between reloads 250 ms apart and 15-18 ms when 300 random ones do (so that most rows fall within
the slack; 21-24 ms with a 5 s slack), by ``benchmarks/state_reload.py [--changed N]``. So a
reload reads everything
on its first call and then at most every ``FULL_EVERY_S``; in between it reads the profiles (a row
per model) and the ``task_stats`` rows updated since the newest one it has seen, less
``SLACK_S``, and keeps its latency windows (this replica's own calls keep feeding them; the
others' arrive with the next full read).

``updated_at`` is the writing replica's clock when it wrote: a write that committed more than
``SLACK_S`` after that time, or one from a clock running that far behind, is missed by the reads
in between and picked up by the next full one. The writer thread takes that time when it writes a
record, not when the answer was given, and commits at the end of its batch, well within the
slack; records replayed after a database outage keep their old time and come with a full read. A
clock running ahead cannot hold the reads back: the newest time seen is capped at this replica's
own clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .estimate import ProfileRow, StatsRow
from .store_api import StateStore

__all__ = ["FULL_EVERY_S", "SLACK_S", "Snapshot", "StoreReader"]

FULL_EVERY_S = 30.0
SLACK_S = 2.0


@dataclass(slots=True)
class Snapshot:
    """What a read found: the profiles, the stats (key -> model -> row; unchanged keys share the
    current mapping's inner dicts, changed ones are new dicts), and the latency windows (None: keep
    the current ones)."""

    profiles: dict[str, ProfileRow]
    stats: dict[str, dict[str, StatsRow]]
    latencies: dict[str, deque[float]] | None
    full: bool


class StoreReader:
    """Reads a store for one tracker, remembering the newest ``updated_at`` it has seen."""

    def __init__(
        self,
        store: StateStore,
        window: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.window = window
        self._clock, self._wall = clock, wall
        self._full_at: float | None = None  # None: nothing read yet
        self._seen = 0.0  # the newest updated_at read, capped at our clock

    def read(self, current: dict[str, dict[str, StatsRow]], *, full: bool = False) -> Snapshot:
        """The store's state, merged over ``current`` (which is not changed) when only the changes
        are read; everything when ``full``, the first time, or ``FULL_EVERY_S`` after the last."""
        now = self._clock()
        whole = full or self._full_at is None or now - self._full_at >= FULL_EVERY_S
        profiles = {r.pop("model_id"): ProfileRow(**r) for r in self.store.profiles()}
        rows = self.store.task_stats(None if whole else self._seen - SLACK_S)
        stats: dict[str, dict[str, StatsRow]] = {} if whole else dict(current)
        fresh: set[str] = set()  # keys whose inner dict is already a copy
        newest = 0.0 if whole else self._seen
        for r in rows:
            model_id, key = r.pop("model_id"), r.pop("key")
            if key not in fresh:
                fresh.add(key)
                stats[key] = {} if whole else dict(stats.get(key, {}))
            stats[key][model_id] = row = StatsRow(**r)
            newest = max(newest, row.updated_at)
        self._seen = min(newest, self._wall())
        latencies = None
        if whole:
            self._full_at = now
            latencies = {
                m: deque(v, maxlen=self.window) for m, v in self.store.recent_latencies(self.window).items()
            }
        return Snapshot(profiles, stats, latencies, whole)
