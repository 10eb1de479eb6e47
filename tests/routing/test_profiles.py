from __future__ import annotations

from car_inference.routing.profiles import ModelProfile, TaskStats


def test_seed_task_stats_get_their_success_rate_as_quality() -> None:
    stats = TaskStats(calls=4, success_count=3, fail_count=1)
    assert stats.quality_sum == 3.0 and stats.decayed_n == 4.0 and stats.decayed_sum == 3.0
    assert "resid_sum" not in stats.model_dump()  # schema 3 dropped the residual sums


def test_profile_defaults_and_unknown_fields() -> None:
    profile = ModelProfile.model_validate({"model_id": "a/x", "future_field": 1})
    assert profile.total_calls == 0 and profile.task_stats == {} and profile.ema_quality == 0.5
