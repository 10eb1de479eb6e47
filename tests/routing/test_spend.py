from __future__ import annotations

import contextlib
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from car_inference.config import SpendLimit, SpendSettings
from car_inference.errors import SpendLimitExceeded
from car_inference.routing.spend import EARLIER_DAYS_S, REFRESH_S, SpendControl
from car_inference.routing.store import OutcomeStore

from .helpers import FakeClock


def at(year: int, month: int, day: int, hour: int, minute: int) -> FakeClock:
    return FakeClock(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp())


def test_no_limits_never_blocks() -> None:
    spend = SpendControl(SpendSettings(), None)
    spend.record("openai", "openai/x", 1e6)
    spend.check("openai", 1e6)
    assert not spend.would_exceed("openai", 1e6)


def test_daily_global_limit() -> None:
    spend = SpendControl(SpendSettings(daily_usd=1.0), None, at(2025, 3, 10, 12, 0))
    spend.record("openai", "openai/x", 0.7)
    assert not spend.would_exceed("anthropic", 0.3)
    assert spend.would_exceed("anthropic", 0.31)
    with pytest.raises(SpendLimitExceeded) as info:
        spend.check("anthropic", 0.5)
    err = info.value
    assert (err.scope, err.period, err.limit_usd) == ("global", "daily", 1.0)
    assert err.spent_usd == pytest.approx(0.7) and err.estimate_usd == 0.5


def test_provider_limits_apply_only_to_that_provider() -> None:
    settings = SpendSettings(providers={"openai": SpendLimit(monthly_usd=2.0)})
    spend = SpendControl(settings, None, at(2025, 3, 10, 12, 0))
    spend.record("openai", "openai/x", 1.9)
    spend.record("anthropic", "anthropic/y", 50.0)
    assert spend.would_exceed("openai", 0.2)
    assert not spend.would_exceed("anthropic", 100.0)
    with pytest.raises(SpendLimitExceeded) as info:
        spend.check("OpenAI", 0.2)
    assert (info.value.scope, info.value.period) == ("OpenAI", "monthly")


def test_days_and_months_roll_over_in_utc() -> None:
    clock = at(2025, 1, 31, 23, 50)
    spend = SpendControl(SpendSettings(daily_usd=1.0, monthly_usd=1.5), None, clock)
    spend.record("openai", "openai/x", 0.9)
    assert spend.would_exceed("openai", 0.2)
    clock.advance(20 * 60)  # 00:10 UTC on 1 February: a new day and a new month
    assert not spend.would_exceed("openai", 0.9)
    spend.record("openai", "openai/x", 0.9)
    clock.advance(24 * 3600)  # 2 February: new day, same month
    assert spend.would_exceed("openai", 0.7)  # month: 0.9 + 0.7 > 1.5
    assert not spend.would_exceed("openai", 0.5)
    status = spend.status()
    assert status.day == "2025-02-02" and status.month == "2025-02"
    daily = status.entry("global", "daily")
    monthly = status.entry("global", "monthly")
    assert daily is not None and daily.spent_usd == 0 and daily.remaining_usd == 1.0
    assert monthly is not None and monthly.spent_usd == pytest.approx(0.9)
    assert monthly.remaining_usd == pytest.approx(0.6)


def test_spend_persists_and_is_shared_through_the_store(tmp_path: Path) -> None:
    clock = at(2025, 5, 5, 8, 0)
    settings = SpendSettings(daily_usd=1.0)
    first = SpendControl(settings, OutcomeStore(tmp_path / "state.db"), clock)
    second = SpendControl(settings, OutcomeStore(tmp_path / "state.db"), clock)
    first.record("openai", "openai/x", 0.6)
    second.record("anthropic", "anthropic/y", 0.05)  # within REFRESH_S of its last read: no re-read
    assert not second.would_exceed("openai", 0.2)
    clock.advance(REFRESH_S)
    second.record("anthropic", "anthropic/y", 0.25)  # re-reads: sees the other process's 0.6
    assert second.would_exceed("openai", 0.2)
    assert not first.would_exceed("openai", 0.2)  # not yet reloaded
    first.reload()
    assert first.would_exceed("openai", 0.2)
    restarted = SpendControl(settings, OutcomeStore(tmp_path / "state.db"), clock)
    assert restarted.status().by_provider_today == {"openai": 0.6, "anthropic": 0.3}


def test_the_months_earlier_days_are_re_read_less_often_than_today(tmp_path: Path) -> None:
    """The month = today (re-read every REFRESH_S) + the earlier days (every EARLIER_DAYS_S): a
    late entry for an earlier day counts within that; ``reload`` reads both at once."""
    clock = at(2025, 5, 5, 8, 0)
    store = OutcomeStore(tmp_path / "state.db")
    store.add_spend("openai", "openai/x", 0.4, ts=clock() - 3 * 86_400)
    spend = SpendControl(SpendSettings(monthly_usd=1.0), store, clock)
    assert spend.status().by_provider_month == {"openai": pytest.approx(0.4)}
    store.add_spend("openai", "openai/x", 0.3, ts=clock() - 2 * 86_400)  # a replayed buffer, say
    store.add_spend("openai", "openai/x", 0.1, ts=clock())  # another process, today
    clock.advance(REFRESH_S)
    spend.record("openai", "openai/x", 0.05)
    assert spend.headroom("openai") == pytest.approx(1.0 - 0.4 - 0.1 - 0.05)  # today's, not the late one
    clock.advance(EARLIER_DAYS_S)
    spend.record("openai", "openai/x", 0.05)
    assert spend.headroom("openai") == pytest.approx(1.0 - 0.4 - 0.3 - 0.1 - 0.1)
    store.add_spend("openai", "openai/x", 0.02, ts=clock() - 86_400)
    spend.reload()
    assert spend.headroom("openai") == pytest.approx(1.0 - 0.4 - 0.3 - 0.1 - 0.1 - 0.02)


def test_headroom_is_the_tightest_remaining_limit() -> None:
    settings = SpendSettings(
        daily_usd=5.0, monthly_usd=100.0, providers={"openai": SpendLimit(daily_usd=1.0)}
    )
    spend = SpendControl(settings, None, at(2025, 6, 1, 9, 0))
    assert spend.headroom("anthropic") == 5.0
    spend.record("openai", "openai/x", 0.25)
    assert spend.headroom("openai") == pytest.approx(0.75)
    assert spend.headroom("anthropic") == pytest.approx(4.75)
    assert SpendControl(SpendSettings(), None).headroom("openai") == float("inf")


def test_a_status_read_during_the_writers_batch_does_not_deadlock(tmp_path: Path) -> None:
    """The writer thread records spend inside the store's batch (store lock, then spend lock);
    ``status`` read the store under the spend lock (spend, then store). Taken in opposite orders,
    the two threads waited for each other for ever: a fleet test hung its 600 s."""
    import threading
    import time

    store = OutcomeStore(tmp_path / "state.db")
    spend = SpendControl(SpendSettings(daily_usd=10.0), store)
    in_batch, recorded = threading.Event(), threading.Event()

    def writer() -> None:
        with store.batch():
            in_batch.set()
            time.sleep(0.3)  # status() starts meanwhile, on the other thread
            spend.record("openai", "openai/x", 0.5)
        recorded.set()

    statuses: list[object] = []
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert in_batch.wait(5)
    reader = threading.Thread(target=lambda: statuses.append(spend.status()), daemon=True)
    reader.start()
    reader.join(10)
    thread.join(10)
    assert recorded.is_set() and statuses, "the writer and status() waited for each other"
    entry = spend.status().entry("global", "daily")
    assert entry is not None and entry.spent_usd == 0.5
    store.close()


def test_estimates_in_flight_count_against_the_limits_of_a_lone_process() -> None:
    """Without a fleet nothing was held: ten concurrent calls of one `car serve`, each costing
    exactly its estimate, all passed a daily limit that three fitted in."""
    spend = SpendControl(SpendSettings(daily_usd=0.002))
    held = []
    with pytest.raises(SpendLimitExceeded) as info:
        for _ in range(10):
            held.append(spend.reserve("openai", 0.0006))
    assert len(held) == 3 and all(r is not None and r.local for r in held)
    assert info.value.spent_usd == pytest.approx(0.0018), "spent and in flight together"
    # ... but the message tells them apart: "spent $0.0451" was said while $0.0001 was spent.
    assert "spent $0.00 and $0.0018 held by calls in flight" in str(info.value), str(info.value)
    assert spend.would_exceed("openai", 0.0006)
    spend.release(held.pop())  # a call failed: its estimate is free again
    assert not spend.would_exceed("openai", 0.0006)
    spend.record("openai", "openai/x", 0.0005, reservation=held.pop())  # settled at its real cost
    assert spend.status().entry("global", "daily").spent_usd == pytest.approx(0.0005)  # type: ignore[union-attr]
    assert spend.headroom("openai") == pytest.approx(0.002 - 0.0005 - 0.0006)  # spent, and one in flight
    spend.check("openai", 0.0008)  # a check holds nothing
    assert spend.reserve("openai", 0.0008) is not None
    with pytest.raises(SpendLimitExceeded):  # 0.0005 spent + 0.0006 and 0.0008 in flight
        spend.reserve("openai", 0.0002)


def test_concurrent_reservations_never_pass_together_past_a_limit() -> None:
    spend = SpendControl(SpendSettings(daily_usd=1.0))
    passed: list[object] = []

    def call() -> None:
        with contextlib.suppress(SpendLimitExceeded):
            passed.append(spend.reserve("openai", 0.1))

    threads = [threading.Thread(target=call) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) == 10


def test_totals_read_outside_the_lock_lose_nothing_counted_meanwhile(tmp_path: Path) -> None:
    """The store is read before the lock is taken (a hung database held it, and every paid
    request with it): spend this process counted between that read and its use stays counted."""
    clock = at(2025, 3, 10, 12, 0)
    spend = SpendControl(SpendSettings(daily_usd=1.0), OutcomeStore(tmp_path / "state.db"), clock)
    spend.record("openai", "openai/x", 0.25)
    stale = spend._fetch(whole=True)  # a read begun before the next record...
    spend.record("openai", "openai/x", 0.5)
    with spend._locked():
        spend._install(stale, keep_larger=True)  # ...and used after it
    assert spend.would_exceed("openai", 0.26) and not spend.would_exceed("openai", 0.24)
