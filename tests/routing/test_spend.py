from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from car_inference.config import SpendLimit, SpendSettings
from car_inference.errors import SpendLimitExceeded
from car_inference.routing.spend import SpendControl
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
    second.record("anthropic", "anthropic/y", 0.3)  # re-reads: sees the other process's 0.6
    assert second.would_exceed("openai", 0.2)
    assert not first.would_exceed("openai", 0.2)  # not yet reloaded
    first.reload()
    assert first.would_exceed("openai", 0.2)
    restarted = SpendControl(settings, OutcomeStore(tmp_path / "state.db"), clock)
    assert restarted.status().by_provider_today == {"openai": 0.6, "anthropic": 0.3}


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
