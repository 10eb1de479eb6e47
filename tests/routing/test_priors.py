from __future__ import annotations

import json
from pathlib import Path

import pytest

from car_inference.config import RoutingSettings
from car_inference.errors import ConfigError
from car_inference.routing.outcomes import ModelProfile, OutcomeTracker
from car_inference.routing.priors import (
    BenchmarkPrior,
    apply_benchmark_priors,
    benchmark_priors_paths,
    load_all_benchmark_priors,
    load_benchmark_priors,
)
from car_inference.routing.store import OutcomeStore

QWEN = "qwen/qwen3-8b:q4_k_m"


def test_loads_benchmark_priors_on_startup(tmp_path: Path) -> None:
    """Port of the seed's engine_loads_benchmark_priors_on_startup, at the routing level."""
    priors_path = tmp_path / "benchmark_priors.json"
    priors_path.write_text(json.dumps({"model_id": QWEN, "overall_score": 0.88}))
    env = {"CAR_BENCHMARK_PRIORS_PATH": str(priors_path)}
    tracker = OutcomeTracker(OutcomeStore(tmp_path / "home" / "state.db"), RoutingSettings())
    apply_benchmark_priors(tracker, load_all_benchmark_priors(tmp_path / "home", env))
    profile = tracker.profile(QWEN)
    assert profile is not None, "benchmark prior should create a profile"
    assert abs(profile.ema_quality - 0.88) < 0.01


def test_benchmark_priors_do_not_override_observed_profiles(tmp_path: Path) -> None:
    """Port of the seed's benchmark_priors_do_not_override_observed_profiles: an observed profile
    (here restored from outcome_profiles.json into the store) survives a higher prior."""
    home = tmp_path / "home"
    observed = ModelProfile(
        model_id=QWEN,
        total_calls=12,
        success_count=3,
        fail_count=9,
        total_latency_ms=1200,
        ema_quality=0.21,
        updated_at=1,
    )
    OutcomeTracker(OutcomeStore(home / "state.db"), RoutingSettings()).import_profiles([observed])
    priors_path = tmp_path / "benchmark_priors.json"
    priors_path.write_text(json.dumps({"model_id": QWEN, "overall_score": 0.95}))

    tracker = OutcomeTracker(OutcomeStore(home / "state.db"), RoutingSettings())  # a restart
    created = apply_benchmark_priors(
        tracker, load_all_benchmark_priors(home, {"CAR_BENCHMARK_PRIORS_PATH": str(priors_path)})
    )
    assert created == 0
    profile = tracker.profile(QWEN)
    assert profile is not None, "observed profile should remain present"
    assert abs(profile.ema_quality - 0.21) < 0.01
    assert profile.total_calls == 12
    # The router's estimate is pulled well below the prior by what was observed.
    prior = tracker.benchmark_prior(QWEN)
    assert prior is not None
    estimate, _ = tracker.quality(QWEN, "chat", prior.score_for("chat"))
    assert estimate < 0.85


def test_prior_profile_gives_way_to_observations() -> None:
    tracker = OutcomeTracker(None, RoutingSettings())
    apply_benchmark_priors(tracker, [BenchmarkPrior(model_id="p/a", overall_score=0.9)])
    trace = tracker.record_start("p/a", family="chat")
    tracker.record_failure(trace, "ProviderError")
    profile = tracker.profile("p/a")
    assert profile is not None and profile.total_calls == 1 and profile.ema_quality == 0.0
    tracker.reload()  # no store: nothing to do, nothing lost
    assert tracker.profile("p/a").total_calls == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "payload",
    [
        {"model_id": "a/x", "overall_score": 0.7},
        [{"model_id": "a/x", "overall_score": 0.7}],
        {"models": [{"model_id": "a/x", "overall_score": 0.7}]},
        {"a/x": {"overall_score": 0.7}},
    ],
)
def test_file_shapes(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(payload))
    assert load_benchmark_priors(path)["a/x"].overall_score == 0.7


def test_task_scores_and_latency(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            [
                {
                    "model_id": "a/x",
                    "overall_score": 0.7,
                    "overall_latency_ms": 900,
                    "task_scores": {"code": 0.9},
                    "task_latency_ms": {"code": 1500},
                }
            ]
        )
    )
    prior = load_benchmark_priors(path)["a/x"]
    assert prior.score_for("code") == 0.9 and prior.score_for("chat") == 0.7
    assert prior.task_latency_ms["code"] == 1500


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    assert load_benchmark_priors(tmp_path / "absent.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_id": "a/x", "overall_score": 7}')
    with pytest.raises(ConfigError, match=r"bad\.json"):
        load_benchmark_priors(bad)
    bad.write_text("not json")
    with pytest.raises(ConfigError):
        load_benchmark_priors(bad)


def test_lookup_paths_in_order_and_later_files_win(tmp_path: Path) -> None:
    home = tmp_path / "home"
    extra = tmp_path / "extra.json"
    paths = benchmark_priors_paths(home, {"CAR_BENCHMARK_PRIORS_PATH": str(extra)})
    assert paths == [home / "models" / "benchmark_priors.json", home / "benchmark_priors.json", extra]
    assert benchmark_priors_paths(home, {}) == paths[:2]
    (home / "models").mkdir(parents=True)
    (home / "models" / "benchmark_priors.json").write_text(
        json.dumps({"model_id": "a/x", "overall_score": 0.1})
    )
    extra.write_text(json.dumps({"model_id": "a/x", "overall_score": 0.9}))
    (home / "benchmark_priors.json").write_text("broken")
    merged = load_all_benchmark_priors(home, {"CAR_BENCHMARK_PRIORS_PATH": str(extra)})
    assert merged["a/x"].overall_score == 0.9  # the broken middle file is skipped
    with pytest.raises(ConfigError):
        load_all_benchmark_priors(home, {}, strict=True)
