from __future__ import annotations

import math
import time

import pytest
from pydantic import ValidationError

from car_inference.routing.profiles import ModelProfile, TaskStats, parsed_profiles, unread_keys


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


@pytest.mark.parametrize(
    ("profile", "says"),
    [
        ({"model_id": "*"}, "model_id"),  # the baselines' name: every later export failed
        ({"model_id": ""}, "model_id"),
        ({"model_id": "a b"}, "model_id"),
        ({"model_id": "m", "total_calls": 2**62}, "total_calls"),  # two of them overflowed SQLite
        ({"model_id": "m", "total_latency_ms": 1e308}, "total_latency_ms"),  # two summed to inf
        (
            {"model_id": "m", "task_stats": {"chat": {"calls": 2, "quality_sum": 5.0}}},
            "quality_sum 5.0 is more",
        ),
        (
            {"model_id": "m", "task_stats": {"chat": {"calls": 2, "decayed_n": 1.0, "decayed_sum": 3.0}}},
            "decayed_sum 3.0 is more",
        ),
        # 10**6 successes in 601 calls was imported (as were keys "" and " chat")
        ({"model_id": "m", "total_calls": 601, "success_count": 10**6}, "add up to more than calls 601"),
        (
            {"model_id": "m", "task_stats": {"chat": {"calls": 2, "success_count": 2, "fail_count": 1}}},
            "add up to more than calls 2",
        ),
        ({"model_id": "m", "task_stats": {"": {"calls": 1}}}, "a key is empty"),
        ({"model_id": "m", "task_stats": {" chat": {"calls": 1}}}, "a key is empty"),
        # 500 calls in one family of a 1-call profile: every model's quality there went to ~0
        (
            {"model_id": "m", "total_calls": 1, "task_stats": {"chat": {"calls": 500}}},
            "more than total_calls 1",
        ),
    ],
)
def test_a_profile_holds_nothing_that_poisons_the_sums(profile: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        ModelProfile.model_validate(profile)


def test_a_model_given_twice_is_refused() -> None:
    """ "imported 2", and the last of the two silently kept."""
    with pytest.raises(ValueError, match="a/x has two profiles"):
        parsed_profiles([{"model_id": "a/x"}, {"model_id": "b/y"}, {"model_id": "a/x", "total_calls": 3}])
    assert [p.model_id for p in parsed_profiles([{"model_id": "a/x"}, {"model_id": "b/y"}])] == ["a/x", "b/y"]


def test_our_own_sums_and_the_seed_shape_still_load() -> None:
    ok = ModelProfile.model_validate(
        {"model_id": "huggingface/smollm2-135m-instruct:q4_1", "total_input_tokens": 10**13, "total_calls": 3,
         "task_stats": {"chat|latin-short": {"calls": 3, "quality_sum": 3.0000000001, "decayed_sum": 2.9,
                                              "decayed_n": 2.9}}}
    )  # fmt: skip
    assert ok.task_stats["chat|latin-short"].calls == 3


def test_an_imported_updated_at_ahead_of_the_clock_is_refused() -> None:
    # Milliseconds, or a clock years ahead: its template was never forgotten.
    ahead = int(time.time()) + 400 * 86_400
    with pytest.raises(ValueError, match=r"m: updated_at .* is 400 days ahead of this clock"):
        parsed_profiles([{"model_id": "m", "updated_at": ahead}])
    with pytest.raises(ValueError, match=r"task_stats\['chat'\].updated_at .* days ahead"):
        parsed_profiles([{"model_id": "m", "total_calls": 1, "task_stats": {"chat": {"updated_at": ahead}}}])
    soon = int(time.time()) + 3600  # another replica's clock a little ahead: taken
    assert parsed_profiles([{"model_id": "m", "updated_at": soon}])[0].updated_at == soon
    # Checked on import only: a row stored so before is exported as it is (it failed every
    # export, and so every `car profiles import`, which reads what it replaces first).
    assert ModelProfile.model_validate({"model_id": "m", "updated_at": ahead}).updated_at == ahead


def test_unread_keys_names_keys_the_router_never_counts_under() -> None:
    keys = [
        "chat", "image", "code|latin-short", "reasoning|cjk-mc", "template|p0123456789",  # read
        "Code", "coding", "code|latin", "bogus|latin-short", "template|x", "template|p0123",  # not
    ]  # fmt: skip
    stats: dict[str, dict[str, int]] = {key: {} for key in keys}
    profile = ModelProfile.model_validate({"model_id": "m", "total_calls": 1, "task_stats": stats})
    assert unread_keys(profile) == keys[5:]
