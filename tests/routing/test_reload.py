"""StoreReader on a real SQLite store written by a second tracker and by hand: what a reload between
two full reads sees, and what only the next full read does."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from car_inference.config import RoutingSettings
from car_inference.routing.outcomes import OutcomeTracker
from car_inference.routing.reload import FULL_EVERY_S, SLACK_S, StoreReader
from car_inference.routing.store import OutcomeStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write(tracker: OutcomeTracker, model: str) -> None:
    trace = tracker.record_start(model, family="code")
    tracker.record_complete(trace, 50.0)


def _set_updated_at(db: Path, model: str, calls: int, updated_at: float) -> None:
    """What a write from a replica whose clock was behind (or a late commit) leaves."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE task_stats SET calls = ?, updated_at = ? WHERE model_id = ? AND key = 'code'",
            (calls, updated_at, model),
        )


def test_between_full_reads_only_the_changes_are_read_and_a_missed_one_comes_with_the_next(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    writer = OutcomeTracker(OutcomeStore(db), RoutingSettings())
    _write(writer, "p/a")
    clock = Clock()
    reader = StoreReader(OutcomeStore(db), 256, clock=clock)
    first = reader.read({})
    assert first.full and first.stats["code"]["p/a"].calls == 1 and first.latencies is not None
    assert list(first.latencies["p/a"]) == [50.0]
    _write(writer, "p/a")  # a new write: updated now
    _write(writer, "p/b")
    clock.now += 1
    quick = reader.read(first.stats)
    assert not quick.full and quick.latencies is None  # the windows are kept
    assert quick.stats["code"]["p/a"].calls == 2 and quick.stats["code"]["p/b"].calls == 1
    assert first.stats["code"]["p/a"].calls == 1 and "p/b" not in first.stats["code"], "current not changed"
    _set_updated_at(db, "p/a", 7, time.time() - SLACK_S - 60)  # too old for the changes' read
    clock.now += 1
    assert reader.read(quick.stats).stats["code"]["p/a"].calls == 2
    clock.now += FULL_EVERY_S
    full = reader.read(quick.stats)
    assert full.full and full.stats["code"]["p/a"].calls == 7
    assert full.latencies is not None and list(full.latencies["p/a"]) == [50.0, 50.0]


def test_a_clock_running_ahead_does_not_hide_later_changes(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    writer = OutcomeTracker(OutcomeStore(db), RoutingSettings())
    _write(writer, "p/a")
    _write(writer, "p/b")
    _set_updated_at(db, "p/a", 5, time.time() + 3600)  # written by a replica an hour ahead
    clock = Clock()
    reader = StoreReader(OutcomeStore(db), 256, clock=clock)
    first = reader.read({})
    _write(writer, "p/b")
    clock.now += 1
    assert reader.read(first.stats).stats["code"]["p/b"].calls == 2
