"""Route-only use: engine.report, open_trace + feedback, route_adaptive with params."""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import pytest

from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput, ModelNotFound, UnsupportedMode
from car_inference.requests import GenerateRequest
from car_inference.routing.estimate import ProfileRow
from car_inference.routing.outcomes import InferenceTask
from car_inference.routing.store import TraceRow
from car_inference.routing.store_api import PRUNE_CHUNK

from .conftest import RemoteEngine

TWO = {
    "alpha": {"provider": "acme", "quality": 0.8, "price": 1.0},
    "beta": {"provider": "bolt", "quality": 0.7, "price": 1.0},
}
ASK = GenerateRequest(prompt="Write a Python function that reverses a list.")


def test_report_teaches_the_router_like_a_generated_answer(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    decision = engine.route(ASK)
    trace_id = engine.report(decision, score=0.25, cost_usd=0.002, latency_ms=420, output_tokens=90)
    trace = engine.store.trace(trace_id)
    assert trace is not None and trace["outcome"] == "success" and trace["quality"] == 0.25
    assert trace["family"] == decision.task_family and trace["cluster"] == decision.prompt_cluster
    assert [f["kind"] for f in engine.store.feedback_for(trace_id)] == ["explicit"]
    stats = engine.tracker.task_stats(decision.model_id, decision.task_family)
    assert stats is not None and stats.quality_sum == pytest.approx(0.25)
    profile = engine.tracker.profile(decision.model_id)
    assert profile is not None and profile.total_output_tokens == 90
    assert engine.spend.status().entries[0].spent_usd == pytest.approx(0.002)


def test_report_equals_record_attempt_then_feedback(remote_engine: RemoteEngine) -> None:
    """The two ways a replay can feed the router (a report, or the tracker's record then feedback)
    leave the same state, so either drives the same learning."""
    one, two = remote_engine(TWO), remote_engine(TWO)
    for score in (1.0, 0.0, 0.5, 1.0):
        d1 = one.route(ASK)
        one.report(d1, score=score, output_tokens=10, model_id="acme/alpha")
        d2 = two.route(ASK)
        trace_id = uuid.uuid4().hex
        two.tracker.record_attempt(
            "acme/alpha", InferenceTask.GENERATE, d2.task_family, d2.reason, None, trace_id=trace_id,
            started_at=0.0, success=True, cluster=d2.prompt_cluster, output_tokens=10,
        )  # fmt: skip
        two.feedback(trace_id, score)
    for key in (d1.task_family, f"{d1.task_family}|{d1.prompt_cluster}"):
        a, b = one.tracker.task_stats("acme/alpha", key), two.tracker.task_stats("acme/alpha", key)
        assert a is not None and b is not None
        assert (a.calls, a.quality_sum) == (b.calls, pytest.approx(b.quality_sum))


def test_reported_failures_move_traffic(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    for _ in range(30):
        decision = engine.route(ASK)
        engine.report(decision, success=decision.model_id != "acme/alpha")
    picks = [engine.route(ASK).model_id for _ in range(20)]
    assert picks.count("acme/alpha") == 0


def test_open_trace_then_feedback_completes_it(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    decision = engine.route(ASK)
    trace_id = engine.open_trace(decision)
    assert engine.store.trace(trace_id)["outcome"] == "pending"  # type: ignore[index]
    engine.feedback(trace_id, 0.4)
    trace = engine.store.trace(trace_id)
    assert trace is not None and trace["outcome"] == "success" and trace["quality"] == 0.4


def test_feedback_on_a_pending_trace_learns_no_made_up_latency(remote_engine: RemoteEngine) -> None:
    """The time between the decision and its rating was recorded as the model's latency: rated
    at once, a model looked 5,000 times faster than the others ("1 ms"); rated later, hours."""
    engine = remote_engine(TWO)
    for _ in range(4):
        trace_id = engine.open_trace(engine.route(ASK))
        time.sleep(0.01)
        engine.feedback(trace_id, 0.8)
        trace = engine.store.trace(trace_id)
        assert trace is not None and trace["outcome"] == "success" and trace["latency_ms"] is None
    assert (
        engine.tracker.latency_p50("acme/alpha") is None and engine.tracker.latency_p50("bolt/beta") is None
    )


def test_feedback_on_a_pending_trace_takes_what_the_caller_measured(remote_engine: RemoteEngine) -> None:
    """Route-only use over HTTP has only /v1/feedback: the call's latency, output tokens and cost
    complete the pending trace as ``report`` would; on a finished trace they are refused."""
    engine = remote_engine(TWO)
    decision = engine.route(ASK)
    trace_id = engine.open_trace(decision)
    engine.feedback(trace_id, 0.5, latency_ms=640.0, output_tokens=77, cost_usd=0.003)
    trace = engine.store.trace(trace_id)
    assert trace is not None and trace["latency_ms"] == 640.0 and trace["output_tokens"] == 77
    profile = engine.tracker.profile(decision.model_id)
    assert profile is not None and profile.total_output_tokens == 77
    assert engine.spend.status().entries[0].spent_usd == pytest.approx(0.003)
    with pytest.raises(
        InvalidInput, match=r"latency_ms complete a route-only decision .* is success already"
    ):
        engine.feedback(trace_id, 0.5, latency_ms=10.0)
    with pytest.raises(InvalidInput, match="output_tokens must be a whole number"):
        engine.feedback(trace_id, 0.5, output_tokens=-1)
    engine.feedback(trace_id, 0.9)  # a rating alone still replaces the score
    assert engine.store.trace(trace_id)["quality"] == 0.9  # type: ignore[index]


def test_two_feedbacks_at_once_charge_the_call_once(remote_engine: RemoteEngine) -> None:
    """Two feedbacks on one pending trace at once (the retry a 503 advises, two replicas) both read
    it pending, and each recorded the caller's cost: a $1 call was $2 in everyone's ledger. A lock
    held on the database lets both read the trace before either writes."""
    import sqlite3
    import threading

    first, second = remote_engine(TWO), remote_engine(TWO)  # two processes on one state.db
    trace_id = first.open_trace(first.route(ASK))
    first.flush()
    lock = sqlite3.connect(first.config.paths.state_db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    failed: list[BaseException] = []

    def rate(engine: InferenceEngine) -> None:
        try:
            engine.feedback(trace_id, 0.9, cost_usd=1.0)
        except BaseException as exc:  # pragma: no cover - the assertion below shows it
            failed.append(exc)

    threads = [threading.Thread(target=rate, args=(e,)) for e in (first, second)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # both have read the trace, pending, and wait for the write lock
    lock.execute("COMMIT")
    for thread in threads:
        thread.join(30)
    assert failed == []
    assert lock.execute("SELECT COUNT(*), SUM(usd) FROM spend").fetchone() == (1, 1.0)
    assert lock.execute("SELECT quality FROM traces WHERE trace_id = ?", (trace_id,)).fetchone() == (0.9,)
    lock.close()


def test_a_report_or_feedback_that_fails_midway_writes_nothing(remote_engine: RemoteEngine) -> None:
    """They wrote the trace and its counters in one transaction and the spend in another: a
    failure between them (a lock, a full disk, a kill) left the outcome counted without its spend,
    and the retry the error advised counted it twice. A trigger makes the spend insert fail the
    way a full disk does, after the trace and counters were written in the same transaction."""
    import sqlite3

    engine = remote_engine(TWO)
    decision = engine.route(ASK)
    conn = sqlite3.connect(engine.config.paths.state_db, isolation_level=None)
    conn.execute("CREATE TRIGGER full BEFORE INSERT ON spend BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    with pytest.raises(sqlite3.DatabaseError, match="disk is full"):
        engine.report(decision, score=0.5, cost_usd=0.01, latency_ms=100)
    assert conn.execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 0, "the trace went with the spend"
    assert conn.execute("SELECT COUNT(*) FROM task_stats WHERE calls > 0").fetchone()[0] == 0
    profile = engine.tracker.profile(decision.model_id)
    assert profile is None or profile.total_calls == 0, "the router's copy agrees with the store"
    pending = engine.open_trace(decision)
    with pytest.raises(sqlite3.DatabaseError, match="disk is full"):
        engine.feedback(pending, 0.1, cost_usd=0.01)
    assert engine.store.trace(pending)["outcome"] == "pending", "a retry can still complete it"  # type: ignore[index]
    conn.execute("DROP TRIGGER full")
    engine.feedback(pending, 0.1, cost_usd=0.01)  # the retry the error invites works, once
    trace = engine.store.trace(pending)
    assert trace is not None and trace["outcome"] == "success" and trace["quality"] == 0.1
    assert conn.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == 1
    conn.close()


def test_report_refuses_a_score_for_a_failed_call(remote_engine: RemoteEngine) -> None:
    """``success=False, score=0.9`` counted as a good outcome of a call recorded as failed."""
    engine = remote_engine(TWO)
    decision = engine.route(ASK)
    with pytest.raises(InvalidInput, match=r"a failed call .* has no answer to score"):
        engine.report(decision, success=False, score=0.9)
    assert (engine.tracker.profile(decision.model_id) or ProfileRow()).total_calls == 0, "nothing recorded"
    engine.report(decision, success=False, score=0.0)  # consistent: taken
    assert engine.tracker.profile(decision.model_id).fail_count == 1  # type: ignore[union-attr]


def test_routing_to_or_reporting_a_model_that_does_not_generate_is_refused(
    remote_engine: RemoteEngine,
) -> None:
    """Python and the CLI returned a decision for an embedding model (HTTP said 400), and a
    report recorded a generation outcome for it."""
    engine = remote_engine({**TWO, "vec": {"provider": "acme", "capabilities": ["embed"]}})
    with pytest.raises(UnsupportedMode, match="acme/vec does not declare generate"):
        engine.route(ASK.model_copy(update={"model": "acme/vec"}))
    with pytest.raises(UnsupportedMode, match="report: acme/vec does not declare generate"):
        engine.report(engine.route(ASK), model_id="acme/vec")


def test_a_new_process_routes_a_learned_template_from_its_first_request(remote_engine: RemoteEngine) -> None:
    """Which prefixes repeat is known per process, so a restarted engine (or `car route
    --explain`, one request per process) routed an application's first requests by the family
    rules, blind to the 113 outcomes learned under its template."""
    app = (
        "You are the support bot of ACME Corp. Answer in one short paragraph, politely, in plain English. "
        * 2
    )
    one = remote_engine(TWO)
    for question in ("Where is my order?", "How do I reset my password?", "Can I pay by card?"):
        decision = one.route(GenerateRequest(prompt=question, context=app))
        one.report(decision, score=1.0, latency_ms=300, output_tokens=40)
    assert decision.prompt_cluster is not None and "/p" in decision.prompt_cluster
    one.close()
    two = remote_engine(TWO)  # the same home, as a new process
    first = two.route(GenerateRequest(prompt="Do you ship abroad?", context=app))
    assert first.prompt_cluster == decision.prompt_cluster
    learned = {c.model_id: c.quality_observations for c in first.candidates}
    assert sum(learned.values()) >= 2, learned


def test_forget_model_with_an_empty_name_says_so(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    with pytest.raises(InvalidInput, match="the model name is empty"):  # was "model not found: "
        engine.forget_model("")
    engine.report(engine.route(ASK), score=0.5)
    with pytest.raises(InvalidInput, match="names the contexts' baselines"):  # it deleted them all
        engine.forget_model("*")
    assert engine.tracker.task_stats("*", engine.route(ASK).task_family) is not None  # still there


def test_report_refuses_a_score_out_of_range(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    with pytest.raises(InvalidInput, match=r"0\.\.1"):
        engine.report(engine.route(ASK), score=1.5)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("latency_ms", math.inf, "latency_ms must be a number from 0 to 86,400,000"),
        ("latency_ms", -1e9, "latency_ms must be a number from 0 to 86,400,000"),
        ("latency_ms", 1e300, "latency_ms must be a number from 0 to 86,400,000"),
        ("cost_usd", math.inf, "cost_usd must be a number from 0 to 10,000"),
        ("cost_usd", math.nan, "cost_usd must be a number from 0 to 10,000"),
        ("cost_usd", 1e308, "cost_usd must be a number from 0 to 10,000"),  # two made the spend inf
        ("cost_usd", "0.1", "cost_usd must be a number, not str"),
        ("score", math.nan, "score must be 0..1"),
        ("output_tokens", -(10**9), "output_tokens must be a whole number from 0"),
        ("output_tokens", 2**63, "output_tokens must be a whole number from 0"),  # was OverflowError
        # Two of 2**63 - 1 turned the sums REAL and broke `car profiles export` for good.
        ("output_tokens", 2**63 - 1, "output_tokens must be a whole number from 0 to 20,000,000"),
        ("input_tokens", 20_000_001, "input_tokens must be a whole number from 0 to 20,000,000"),
        ("input_tokens", 2.5, "input_tokens must be a whole number from 0"),
        ("prompt", "a\ud800", "prompt holds an unpaired surrogate"),  # was stored as is
        ("prompt", 123, "prompt must be a str"),  # was AttributeError
        ("success", "no", "success must be True or False"),
    ],
)
def test_report_refuses_numbers_no_outcome_has_and_records_nothing(
    remote_engine: RemoteEngine, field: str, value: object, says: str
) -> None:
    """An infinite latency or cost, a negative token count, NaN: each was written into the
    counters and the spend ledger for good (an infinite spend refused every paid call)."""
    engine = remote_engine(TWO)
    decision = engine.route(ASK)
    with pytest.raises(InvalidInput, match=says):
        engine.report(decision, **{field: value})  # type: ignore[arg-type]
    engine.flush()
    assert engine.store.profiles() == [] and engine.store.spend_by_provider(0.0) == {}


def test_report_and_feedback_name_what_is_wrong(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    decision = engine.route(ASK)
    with pytest.raises(ModelNotFound, match="alpah") as unknown:
        engine.report(decision, model_id="alpah")
    assert "acme/alpha" in unknown.value.suggestions
    assert engine.store.profiles() == []
    with pytest.raises(InvalidInput, match="must be a RoutingDecision, not str"):
        engine.report("acme/alpha")  # type: ignore[arg-type]
    # The decision's own model is checked too (one rebuilt from JSON may name anything): "*" was
    # recorded and counted twice in the baselines, an embedding model as a generation.
    with pytest.raises(ModelNotFound):
        engine.report(decision.model_copy(update={"model_id": "*"}))
    with pytest.raises(UnsupportedMode):
        engine.report(decision.model_copy(update={"model_id": "sentence-transformers/all-minilm-l6-v2"}))
    # open_trace checks the same (the decision with "*" made every later `car profiles export` fail)
    for bad, error in (("*", ModelNotFound), ("acme/alpah", ModelNotFound),
                       ("sentence-transformers/all-minilm-l6-v2", UnsupportedMode)):  # fmt: skip
        with pytest.raises(error):
            engine.open_trace(decision.model_copy(update={"model_id": bad}))
    with pytest.raises(InvalidInput, match="open_trace: decision must be a RoutingDecision, not dict"):
        engine.open_trace({"model_id": "acme/alpha"})  # type: ignore[arg-type]
    assert engine.store.profiles() == [] and engine.export_profiles() == []
    trace_id = engine.report(decision, model_id="beta")  # a name resolves to its id
    assert engine.store.trace(trace_id)["model_id"] == "bolt/beta"  # type: ignore[index]
    for score in (math.nan, 1.5, -0.1):
        with pytest.raises(InvalidInput, match=r"feedback score must be 0\.\.1"):
            engine.feedback(trace_id, score)
    with pytest.raises(InvalidInput, match="must be a number, not str"):
        engine.feedback(trace_id, "0.5")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unpaired surrogate"):
        engine.feedback("\ud800", 0.5)  # was UnicodeEncodeError from the store


async def test_misused_engine_arguments_are_inference_errors(
    remote_engine: RemoteEngine, tmp_path: Path
) -> None:
    """Each raised a bare error from deep inside, or did the wrong thing without one."""
    engine = remote_engine(TWO)
    with pytest.raises(InvalidInput, match="route_async takes a GenerateRequest, not dict"):
        await engine.route_async({"prompt": "hi"})  # type: ignore[arg-type]  # was AttributeError
    (result,) = await engine.warm_up("alpha")  # was one result a character
    assert result is None
    from_str = InferenceEngine(home=str(tmp_path))  # was TypeError
    assert from_str.config.home == tmp_path
    from_str.close()
    with pytest.raises(InvalidInput, match="home must be a path or a str, not int"):
        InferenceEngine(home=5)  # type: ignore[arg-type]


async def test_route_adaptive_takes_the_params_that_change_the_decision(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    short = await engine.route_adaptive("Summarise this paragraph.", max_tokens=40)
    row = next(c for c in short.candidates if c.model_id == "acme/alpha")
    assert row.expected_output_tokens == 40
    assert row.cost_usd == pytest.approx((short.estimated_input_tokens + 40) / 1e6)
    with pytest.raises(InvalidInput, match="route_adaptive: max_tokens"):
        await engine.route_adaptive("Summarise this paragraph.", max_tokens=-1)
    with pytest.raises(InvalidInput, match="max_tokns: Extra inputs are not permitted"):
        await engine.route_adaptive("Summarise this paragraph.", max_tokns=5)


def test_old_traces_are_pruned_by_the_retention_a_chunk_at_a_time(remote_engine: RemoteEngine) -> None:
    """``[state] trace_retention_days``: traces older than it go (more than one chunk of them),
    newer ones and the learned counters stay."""
    engine = remote_engine(TWO, config="[state]\ntrace_retention_days = 7\n")
    old, now = time.time() - 8 * 86_400, time.time()
    with engine.store.batch():
        for i in range(PRUNE_CHUNK + 3):
            row = TraceRow(f"old-{i}", "acme/alpha", "generate", "chat", None, "t", None, old + i)
            engine.store.record_trace(row, success=True, latency_ms=5.0)
        engine.store.record_trace(
            TraceRow("new", "acme/alpha", "generate", "chat", None, "t", None, now),
            success=True,
            latency_ms=5.0,
        )
    calls = [p["total_calls"] for p in engine.store.profiles()]
    assert engine.prune_traces() == PRUNE_CHUNK + 3
    assert engine.store.trace("old-0") is None and engine.store.trace("new") is not None
    assert [p["total_calls"] for p in engine.store.profiles()] == calls
    assert engine.prune_traces(older_than_days=0) == 0 and engine.store.trace("new") is not None


def test_dormant_templates_are_forgotten_in_the_store_and_the_router(remote_engine: RemoteEngine) -> None:
    """``engine.forget_templates``: a template not seen for ``template_retention_days`` leaves the
    store and this process's router; one seen since stays in both, and so do the family's rows."""
    engine = remote_engine(TWO, config="[state]\ntemplate_retention_days = 7\n")
    old, now = time.time() - 8 * 86_400, time.time()
    for i, (cluster, at) in enumerate((("coarse/pold", old), ("coarse/pnew", now), (None, old))):
        row = TraceRow(f"t{i}", "acme/alpha", "generate", "chat", cluster, "t", None, at)
        engine.store.record_trace(row, success=True, latency_ms=5.0, now=at)
    engine.tracker.reload(full=True)
    _, levels, _ = engine.tracker.views("chat", "coarse/pold")
    assert "acme/alpha" in levels[-1], "the template's row, before"
    assert engine.forget_templates() == 1
    assert {r["key"] for r in engine.store.task_stats()} == {"chat", "template|pnew"}
    _, levels, _ = engine.tracker.views("chat", "coarse/pold")
    assert levels[-1] == {}, "and in the router"
    _, levels, _ = engine.tracker.views("chat", "coarse/pnew")
    assert "acme/alpha" in levels[-1]
    assert engine.forget_templates() == 0 and engine.forget_templates(older_than_days=0) == 0


def test_a_forgotten_model_is_tried_again_as_a_new_one(remote_engine: RemoteEngine) -> None:
    """``engine.forget_model``: after an upgrade behind the same name, say. In a settled context
    the leader's record goes (store and router), and the router draws it whole again; a name
    the registry does not know is refused with close matches."""
    engine = remote_engine(TWO, routing="settle_after = 20")
    decision = engine.route(ASK)
    for i in range(30):
        model = ("acme/alpha", 0.9) if i % 3 else ("bolt/beta", 0.3)
        engine.report(decision, model_id=model[0], score=model[1], output_tokens=20)
    # the local default model, never tried, draws whole; the two that were tried, not
    assert "settled context: draws at 0.25 of the uncertainty (1 new here: whole)" in engine.route(ASK).reason
    assert engine.forget_model("alpha") == ("acme/alpha", 3)  # its profile, its family's and cluster's rows
    assert engine.tracker.profile("acme/alpha") is None
    assert not any(r["model_id"] == "acme/alpha" for r in engine.store.task_stats())
    assert "(2 new here: whole)" in engine.route(ASK).reason
    assert engine.forget_model("acme/alpha") == ("acme/alpha", 0)
    with pytest.raises(ModelNotFound, match="alpah"):
        engine.forget_model("alpah")


def test_the_spend_ledger_of_past_days_is_rolled_up(remote_engine: RemoteEngine) -> None:
    """``engine.compact_spend``: yesterday's entries (more than one chunk) become one per
    provider and model; today's stay as they are, the totals the limits read as before."""
    engine = remote_engine(TWO)
    now = time.time()
    today = now // 86_400 * 86_400
    with engine.store.batch():
        for i in range(PRUNE_CHUNK + 3):
            engine.store.add_spend("acme", "acme/alpha" if i % 2 else "acme/beta", 0.25, ts=today - 1 - i)
        engine.store.add_spend("acme", "acme/alpha", 1.0, ts=now)

    def totals() -> tuple[dict[str, float], ...]:
        return engine.store.spend_by_provider(today - 86_400, today), engine.store.spend_by_provider(today)

    before = totals()
    assert engine.compact_spend() == PRUNE_CHUNK + 3
    assert engine.compact_spend() == 0
    assert totals() == before
    with engine.store._read() as conn:  # type: ignore[attr-defined]
        rows = sorted((r["ts"], r["model_id"]) for r in conn.execute("SELECT ts, model_id FROM spend"))
    assert rows == [(today - 86_400, "acme/alpha"), (today - 86_400, "acme/beta"), (now, "acme/alpha")]
