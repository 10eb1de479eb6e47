from __future__ import annotations

import json
from pathlib import Path

import pytest

from car_inference.config import RoutingSettings
from car_inference.routing.outcomes import InferenceTask, ModelProfile, OutcomeTracker
from car_inference.routing.signals import ImplicitSignal, ImplicitSignalType
from car_inference.routing.store import OutcomeStore

from .helpers import FakeClock


@pytest.fixture(params=["memory", "sqlite"])
def tracker(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> OutcomeTracker:
    store = OutcomeStore(tmp_path / "state.db") if request.param == "sqlite" else None
    return OutcomeTracker(store, RoutingSettings(), clock=clock)


def _run(tracker: OutcomeTracker, model: str, family: str, ok: bool, latency: float = 100.0) -> str:
    trace = tracker.record_start(model, InferenceTask.GENERATE, family, "test")
    if ok:
        tracker.record_complete(trace, latency, input_tokens=20, output_tokens=10)
    else:
        tracker.record_failure(trace, "ProviderError", "500 from upstream")
    return trace


def test_counts_and_profile(tracker: OutcomeTracker) -> None:
    for ok in (True, True, False):
        _run(tracker, "p/a", "code", ok)
    profile = tracker.profile("p/a")
    assert profile is not None
    assert (profile.total_calls, profile.success_count, profile.fail_count) == (3, 2, 1)
    assert profile.total_latency_ms == 200.0
    assert profile.total_input_tokens == 40
    stats = tracker.task_stats("p/a", "code")
    assert stats is not None and stats.calls == 3 and stats.success_count == 2
    assert tracker.profile("p/none") is None


@pytest.mark.parametrize("with_store", [False, True])
def test_record_attempt_counts_like_start_then_finish(
    tmp_path: Path, clock: FakeClock, with_store: bool
) -> None:
    def make(name: str) -> OutcomeTracker:
        store = OutcomeStore(tmp_path / f"{name}.db") if with_store else None
        return OutcomeTracker(store, RoutingSettings(), clock=clock)

    two_steps, one_step = make("two"), make("one")
    for i, ok in enumerate((True, False, True, True)):
        _run(two_steps, "p/a", "code", ok)
        one_step.record_attempt(
            "p/a", InferenceTask.GENERATE, "code", "test", trace_id=f"t{i}", started_at=clock(),
            success=ok, latency_ms=100.0 if ok else None, input_tokens=20 if ok else 0,
            output_tokens=10 if ok else 0, error_class=None if ok else "ProviderError",
        )  # fmt: skip
    assert one_step.profile("p/a") == two_steps.profile("p/a")
    assert one_step.task_stats("p/a", "code") == two_steps.task_stats("p/a", "code")
    assert one_step.quality("p/a", "code", 0.5) == two_steps.quality("p/a", "code", 0.5)
    # Abandoned: a trace, counted nowhere.
    one_step.record_attempt("p/a", trace_id="gone", started_at=clock(), success=None)
    assert one_step.profile("p/a").total_calls == 4  # type: ignore[union-attr]
    if with_store:
        row = one_step.store.trace("gone")  # type: ignore[union-attr]
        assert row is not None and row["outcome"] == "abandoned" and row["quality"] is None
        failed = one_step.store.trace("t1")  # type: ignore[union-attr]
        assert failed["outcome"] == "failure" and failed["error_class"] == "ProviderError"  # type: ignore[index]


def test_record_attempt_marks_a_quick_retry(tracker: OutcomeTracker, clock: FakeClock) -> None:
    tracker.record_attempt("p/a", prompt="2+2?", trace_id="first", started_at=clock(), success=True)
    clock.advance(5)
    tracker.record_attempt("p/a", prompt="2+2?", trace_id="again", started_at=clock(), success=True)
    # The first answer lost half its quality (the quick_retry weight), as with record_start.
    assert tracker.task_stats("p/a", "chat").quality_sum == pytest.approx(1.5)  # type: ignore[union-attr]


def test_a_trace_is_counted_once(tracker: OutcomeTracker) -> None:
    trace = _run(tracker, "p/a", "chat", True)
    tracker.record_complete(trace, 50)
    tracker.record_failure(trace, "X")
    tracker.record_complete("unknown-trace", 50)
    assert tracker.profile("p/a").total_calls == 1  # type: ignore[union-attr]


def test_quality_shrinks_toward_the_prior(tracker: OutcomeTracker) -> None:
    assert tracker.quality("p/a", "code", 0.8) == (0.8, 0)
    for _ in range(10):
        _run(tracker, "p/a", "code", False)
    estimate, n = tracker.quality("p/a", "code", 0.8)
    assert n == 10
    # 10 failures against a 0.8 prior: the evidence wins, the prior keeps it off zero.
    assert 0.05 < estimate < 0.4
    for _ in range(200):
        _run(tracker, "p/a", "code", True)
    estimate, _ = tracker.quality("p/a", "code", 0.8)
    assert estimate > 0.9


def test_a_hard_family_does_not_write_a_model_off_elsewhere() -> None:
    tracker = OutcomeTracker(None, RoutingSettings())
    # A hard family: every model scores low there, p/good a bit less low than p/weak.
    for i in range(40):
        _run(tracker, "p/good", "math", i % 4 == 0)  # 25 %
        _run(tracker, "p/weak", "math", i % 10 == 0)  # 10 %
    good, _ = tracker.quality("p/good", "math", 0.5)
    weak, _ = tracker.quality("p/weak", "math", 0.5)
    assert good > weak
    assert 0.15 < good < 0.4 and weak < 0.25
    # Another family starts from the priors again (moved by how that family's models do there),
    # not from either model's record in math.
    _run(tracker, "p/other", "chat", True)
    priors = {"p/good": 0.5, "p/weak": 0.5, "p/other": 0.5}
    good_chat, _ = tracker.quality("p/good", "chat", 0.5, priors=priors)
    weak_chat, _ = tracker.quality("p/weak", "chat", 0.5, priors=priors)
    # Their math records inform a first look at chat, discounted: neither is written off there.
    assert good_chat > weak_chat
    assert good_chat > good + 0.1 and weak_chat > weak + 0.1


def test_feedback_replaces_success_score(tracker: OutcomeTracker) -> None:
    trace = _run(tracker, "p/a", "chat", True)
    tracker.record_feedback(trace, 0.2)
    stats = tracker.task_stats("p/a", "chat")
    assert stats is not None and stats.quality_sum == pytest.approx(0.2)
    tracker.record_feedback(trace, 0.6)  # a second rating replaces the first
    assert tracker.task_stats("p/a", "chat").quality_sum == pytest.approx(0.6)  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        tracker.record_feedback(trace, 1.5)


def test_implicit_signals_lower_quality_until_explicit_feedback(tracker: OutcomeTracker) -> None:
    trace = _run(tracker, "p/a", "code", True)
    tracker.record_signal(trace, ImplicitSignal(ImplicitSignalType.CODE_COMPILE_FAILED))
    assert tracker.task_stats("p/a", "code").quality_sum == pytest.approx(0.5)  # type: ignore[union-attr]
    tracker.record_signal(trace, ImplicitSignal(ImplicitSignalType.EMPTY_RESPONSE))
    assert tracker.task_stats("p/a", "code").quality_sum == pytest.approx(0.0)  # type: ignore[union-attr]
    tracker.record_feedback(trace, 0.7)
    tracker.record_signal(trace, ImplicitSignal(ImplicitSignalType.QUICK_RETRY))
    assert tracker.task_stats("p/a", "code").quality_sum == pytest.approx(0.7)  # type: ignore[union-attr]


def test_quick_retry_marks_the_previous_trace(tracker: OutcomeTracker, clock: FakeClock) -> None:
    first = tracker.record_start("p/a", family="chat", prompt="What is the weather?")
    tracker.record_complete(first, 100)
    clock.advance(30)
    second = tracker.record_start("p/a", family="chat", prompt="What is the weather?")
    tracker.record_complete(second, 100)
    assert tracker.task_stats("p/a", "chat").quality_sum == pytest.approx(1.5)  # type: ignore[union-attr]
    clock.advance(500)  # outside the window: no signal
    third = tracker.record_start("p/a", family="chat", prompt="What is the weather?")
    tracker.record_complete(third, 100)
    assert tracker.task_stats("p/a", "chat").quality_sum == pytest.approx(2.5)  # type: ignore[union-attr]
    other = tracker.record_start("p/a", family="chat", prompt="Something else")
    tracker.record_complete(other, 100)
    assert tracker.task_stats("p/a", "chat").quality_sum == pytest.approx(3.5)  # type: ignore[union-attr]


def test_latency_p50_needs_three_samples(tracker: OutcomeTracker) -> None:
    _run(tracker, "p/a", "chat", True, latency=100)
    _run(tracker, "p/a", "chat", True, latency=300)
    assert tracker.latency_p50("p/a") is None
    _run(tracker, "p/a", "chat", True, latency=200)
    _run(tracker, "p/a", "chat", False)  # failures carry no latency
    assert tracker.latency_p50("p/a") == 200
    _run(tracker, "p/a", "chat", True, latency=1000)
    assert tracker.latency_p50("p/a") == 250


def test_export_import_round_trip(tracker: OutcomeTracker, tmp_path: Path) -> None:
    for i in range(12):
        _run(tracker, "p/a", "code", i % 4 != 0, latency=50 + i)
        _run(tracker, "p/b", "math", i % 2 == 0)
    exported = tracker.export_profiles()
    blob = json.dumps([p.model_dump() for p in exported])
    keys = set(json.loads(blob)[0])
    assert keys == {
        "model_id",
        "total_calls",
        "success_count",
        "fail_count",
        "total_latency_ms",
        "total_input_tokens",
        "total_output_tokens",
        "task_stats",
        "ema_quality",
        "quality_per_1k_tokens",
        "updated_at",
    }
    fresh = OutcomeTracker(OutcomeStore(tmp_path / "other.db"), RoutingSettings())
    assert fresh.import_profiles(json.loads(blob)) == 2
    assert [p.model_dump() for p in fresh.export_profiles()] == [p.model_dump() for p in exported]
    # Baselines are rebuilt from the models' rows, so estimates match up to the decay order.
    assert fresh.quality("p/a", "code", 0.5)[0] == pytest.approx(
        tracker.quality("p/a", "code", 0.5)[0], abs=1e-3
    )
    reopened = OutcomeTracker(OutcomeStore(tmp_path / "other.db"), RoutingSettings())
    assert [p.model_dump() for p in reopened.export_profiles()] == [p.model_dump() for p in exported]
    # No traces came with the profiles: the mean latency stands in for the p50 (an import scored
    # a model learned at 900 ms at the catalog's 4,867 ms, and decided otherwise).
    mean = sum(50 + i for i in range(12) if i % 4 != 0) / 9
    assert fresh.latency_p50("p/a") == pytest.approx(mean) == reopened.latency_p50("p/a")
    assert fresh.latency_p50("p/b") is not None


def test_import_accepts_the_seed_shape() -> None:
    tracker = OutcomeTracker(None, RoutingSettings())
    seed = {
        "model_id": "qwen/qwen3-8b:q4_k_m",
        "total_calls": 12,
        "success_count": 3,
        "fail_count": 9,
        "total_latency_ms": 1200,
        "total_input_tokens": 0,
        "total_output_tokens": 0,
        "task_stats": {"code": {"calls": 4, "success_count": 1, "fail_count": 3}},
        "ema_quality": 0.21,
        "quality_per_1k_tokens": 0.0,
        "updated_at": 1,
    }
    tracker.import_profiles([ModelProfile.model_validate(seed)])
    profile = tracker.profile("qwen/qwen3-8b:q4_k_m")
    assert profile is not None and profile.total_calls == 12 and profile.ema_quality == pytest.approx(0.21)
    estimate, n = tracker.quality("qwen/qwen3-8b:q4_k_m", "code", 0.9)
    assert n == 4 and estimate < 0.65  # 1 success in 4 code calls and a 0.21 EMA pull a 0.9 prior down


def test_reload_sees_another_process_writes(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    ours = OutcomeTracker(OutcomeStore(db), RoutingSettings())
    theirs = OutcomeTracker(OutcomeStore(db), RoutingSettings())
    for _ in range(5):
        _run(theirs, "p/a", "code", True, latency=80)
    assert ours.profile("p/a") is None
    ours.reload()  # the changes: counters, not the latency windows (reload.py)
    assert ours.profile("p/a").total_calls == 5  # type: ignore[union-attr]
    assert ours.latency_p50("p/a") == 80, "the profile's mean latency until the traces' window is read"
    ours.reload(full=True)
    assert ours.latency_p50("p/a") == 80
    # feedback through one tracker for a trace the other started lands in the shared store
    trace = theirs.record_start("p/a", family="code")
    theirs.record_complete(trace, 80)
    ours.record_feedback(trace, 0.0)
    theirs.reload()
    assert theirs.task_stats("p/a", "code").quality_sum == pytest.approx(5.0)  # type: ignore[union-attr]


def test_a_row_knows_when_its_model_joined_the_context(tracker: OutcomeTracker) -> None:
    """The mirror sets ``joined_at`` as the store does (the key's outcomes before the model's
    first there), and a reload reads the same."""
    for model in ("p/a", "p/a", "p/b", "p/a", "p/c"):
        _run(tracker, model, "code", True)
    joined = {m: tracker.task_stats(m, "code").joined_at for m in ("p/a", "p/b", "p/c")}  # type: ignore[union-attr]
    assert joined == {"p/a": 0, "p/b": 2, "p/c": 4}
    if tracker.store is not None:
        tracker.reload(full=True)
        assert {m: tracker.task_stats(m, "code").joined_at for m in joined} == joined  # type: ignore[union-attr]


def test_forget_model_drops_its_profile_and_rows_and_rebuilds_the_family_views(
    tracker: OutcomeTracker,
) -> None:
    _cluster_run(tracker, "p/a", "code", "latin-short")
    _cluster_run(tracker, "p/a", "code", "latin-mc")
    _cluster_run(tracker, "p/b", "code", "latin-short")
    assert "p/a" in tracker.views("code", "latin-short")[1][0]  # the family view, cached
    _cluster_run(tracker, "p/a", "code", "latin-mc")  # a third latency: the p50 is known
    assert tracker.latency_p50("p/a") == 100.0
    tracker.forget_model("p/a")
    assert tracker.profile("p/a") is None and tracker.task_stats("p/a", "code") is None
    assert tracker.latency_p50("p/a") is None, "as a new process knows it: the catalog's latency"
    assert "p/a" not in tracker.views("code", "latin-short")[1][0]
    assert tracker.task_stats("*", "code").calls == 4  # type: ignore[union-attr]
    assert tracker.model_ids() == ["p/b"]


def _cluster_run(tracker: OutcomeTracker, model: str, family: str, cluster: str) -> None:
    trace = tracker.record_start(model, family=family, cluster=cluster)
    tracker.record_complete(trace, 100.0)


def test_forget_drops_templates_not_updated_since_and_keeps_the_rest(
    tracker: OutcomeTracker, clock: FakeClock
) -> None:
    """The mirror's side of ``forget_templates``: a key whose rows are all older than the cutoff
    goes; one updated since (here, counted in memory after the store's delete) stays."""
    _cluster_run(tracker, "p/a", "code", "latin-short/pold")
    _cluster_run(tracker, "p/a", "code", "latin-short/pback")
    _cluster_run(tracker, "p/a", "code", "latin-short")
    clock.advance(100.0)
    _cluster_run(tracker, "p/b", "code", "latin-short/pback")  # came back
    tracker.views("code", "latin-short")  # the family view and its sibling index, built
    tracker.forget(["template|pold", "template|pback", "template|pnone"], older_than=clock() - 50.0)
    assert tracker.views("code", "latin-short/pold")[1][-1] == {}
    assert set(tracker.views("code", "latin-short/pback")[1][-1]) == {"p/a", "p/b", "*"}
    assert tracker.task_stats("p/a", "code") is not None
    _cluster_run(tracker, "p/b", "code", "latin-mc")  # a new cluster, as many keys as before
    family_level = tracker.views("code", "latin-short")[1][0]
    assert family_level["p/b"].decayed_n == pytest.approx(1.0), "the family level counts its outcome"


def test_a_familys_view_is_rebuilt_when_its_stats_change_and_only_then(tracker: OutcomeTracker) -> None:
    """The family level is cached per family: an outcome elsewhere keeps it, one in the family, a
    template's outcome aside, an import and a reload rebuild it."""
    for cluster in ("latin-mc", "latin-short"):
        _cluster_run(tracker, "p/a", "reasoning", cluster)
    view = tracker.views("reasoning", "latin-mc")[1][0]
    _cluster_run(tracker, "p/b", "code", "latin-short")
    _cluster_run(tracker, "p/b", "reasoning", "latin-mc/pabc")  # a template: counted in no family's view
    assert tracker.views("reasoning", "latin-mc")[1][0] is view
    _cluster_run(tracker, "p/b", "reasoning", "latin-short")
    view = tracker.views("reasoning", "latin-mc")[1][0]
    assert "p/b" in view
    imported = ModelProfile.model_validate(
        {"model_id": "p/c", "total_calls": 4, "success_count": 4, "ema_quality": 0.9,
         "task_stats": {"reasoning": {"calls": 4, "success_count": 4, "quality_sum": 4.0,
                                      "decayed_sum": 4.0, "decayed_n": 4.0, "ema_quality": 1.0}}}
    )  # fmt: skip
    tracker.import_profiles([imported])
    assert "p/c" in tracker.views("reasoning", "latin-mc")[1][0], "an import is seen at once"


def test_an_import_keeps_what_other_processes_counted_in_the_baselines(tmp_path: Path) -> None:
    """A long-lived engine wrote every baseline from its stale copy: outcomes another process had
    recorded since vanished from them (500 became 100 while the models' rows summed to 359)."""
    db = tmp_path / "state.db"
    ours = OutcomeTracker(OutcomeStore(db), RoutingSettings())
    theirs = OutcomeTracker(OutcomeStore(db), RoutingSettings())
    for _ in range(3):
        _run(theirs, "p/a", "code", True)
    ours.reload(full=True)
    for _ in range(5):  # after our copy was read
        _run(theirs, "p/b", "code", True)
        _run(theirs, "p/b", "math", True)
    seed = {"model_id": "p/c", "total_calls": 2, "task_stats": {"code": {"calls": 2, "success_count": 2}}}
    assert ours.import_profiles([seed]) == 1
    fresh = OutcomeTracker(OutcomeStore(db), RoutingSettings())
    assert fresh.task_stats("*", "code").calls == 3 + 5 + 2  # type: ignore[union-attr]
    assert fresh.task_stats("*", "math").calls == 5  # type: ignore[union-attr]
