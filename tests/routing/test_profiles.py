from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from car_inference.routing.profiles import ModelProfile, TaskStats


def test_seed_task_stats_get_their_success_rate_as_quality() -> None:
    stats = TaskStats(calls=4, success_count=3, fail_count=1)
    assert stats.quality_sum == 3.0 and stats.decayed_n == 4.0 and stats.decayed_sum == 3.0
    assert "resid_sum" not in stats.model_dump()  # schema 3 dropped the residual sums


def test_profile_defaults_and_unknown_fields() -> None:
    profile = ModelProfile.model_validate({"model_id": "a/x", "future_field": 1})
    assert profile.total_calls == 0 and profile.task_stats == {} and profile.ema_quality == 0.5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quality_sum", math.nan),  # failed deep in the store with a traceback
        ("quality_sum", math.inf),  # taken: "quality 1.00 from 0 obs", then exported as Infinity
        ("calls", -5),
        ("ema_quality", 1.5),
    ],
)
def test_an_imported_profile_holds_only_numbers_a_profile_can_have(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        ModelProfile.model_validate({"model_id": "m", "task_stats": {"chat": {"calls": 3, field: value}}})
    with pytest.raises(ValidationError):
        ModelProfile.model_validate({"model_id": "m", "total_calls": -1})
