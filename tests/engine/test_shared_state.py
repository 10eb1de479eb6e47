"""Engines sharing their learned state through PostgreSQL (``[state] url``), as replicas do."""

from __future__ import annotations

import pytest

from car_inference.engine import InferenceEngine
from car_inference.requests import GenerateRequest
from car_inference.routing.store import SCHEMA_VERSION
from fakes.services import postgres_schema_url

from .conftest import RemoteEngine

TWO = {
    "alpha": {"provider": "acme", "quality": 0.8, "price": 1.0},
    "beta": {"provider": "bolt", "quality": 0.7, "price": 1.0},
}
ASK = GenerateRequest(prompt="Write a Python function that reverses a list.")


def test_outcomes_reported_to_one_engine_change_routing_on_another(remote_engine: RemoteEngine) -> None:
    config = f'[state]\nurl = "{postgres_schema_url()}"\n'
    one, two = remote_engine(TWO, config=config), remote_engine(TWO, config=config)
    try:
        assert one.store.backend == two.store.backend == "postgresql"
        assert two.route(ASK).model_id == "acme/alpha"  # the better prior, before any outcome
        trace_ids = []
        for _ in range(30):
            decision = one.route(ASK)
            ok = decision.model_id != "acme/alpha"
            trace_ids.append(one.report(decision, success=ok, score=None if ok else 0.0, cost_usd=0.001))
        one.flush()
        trace = two.store.trace(trace_ids[0])  # written by one, read by the other
        assert trace is not None and trace["outcome"] in ("success", "failure")
        two.tracker.reload()
        mine, theirs = one.tracker.profile("acme/alpha"), two.tracker.profile("acme/alpha")
        assert mine is not None and theirs is not None
        assert theirs.total_calls == mine.total_calls > 0 and theirs.fail_count == mine.total_calls
        picks = [two.route(ASK).model_id for _ in range(20)]
        assert picks.count("acme/alpha") == 0  # two learned from one's failures
        two.spend.reload()  # the spend ledger is shared too
        assert two.spend.status().entries[0].spent_usd == pytest.approx(0.001 * 30)
    finally:
        one.close()
        two.close()


def _answer(engine: InferenceEngine) -> str:
    """An answer through the fake provider, on a loop of its own; its trace id."""
    import asyncio

    return asyncio.run(engine.generate(ASK)).trace_id


def test_feedback_on_another_replica_waits_for_the_answering_ones_trace(remote_engine: RemoteEngine) -> None:
    """A load balancer sends the feedback to another replica than the one that answered, before
    that one's writer has committed the trace: it waits for it (up to SHARED_TRACE_WAIT_S) instead
    of answering 404, which tells the client not to retry. A trace no replica wrote is still a 404."""
    import time

    from car_inference.engine.learning import SHARED_TRACE_WAIT_S
    from car_inference.errors import TraceNotFound

    config = f'[state]\nurl = "{postgres_schema_url()}"\n'
    one, two = remote_engine(TWO, config=config), remote_engine(TWO, config=config)
    one.bookkeeper.delay_s = 0.5  # a writer that commits half a second after the answer
    one.bookkeeper.start_writer()
    try:
        trace_id = _answer(one)
        assert two.store.trace(trace_id) is None  # not written yet
        two.feedback(trace_id, 0.25)
        feedback = two.store.feedback_for(trace_id)
        assert [f["kind"] for f in feedback] == ["explicit"] and feedback[0]["value"] == 0.25
        started = time.monotonic()
        with pytest.raises(TraceNotFound):
            two.feedback("no-such-trace", 1.0)
        assert time.monotonic() - started >= SHARED_TRACE_WAIT_S
    finally:
        one.close()
        two.close()


def test_the_health_report_shows_the_state_backend_and_its_latency(remote_engine: RemoteEngine) -> None:
    url = postgres_schema_url()
    engine = remote_engine(TWO, config=f'[state]\nurl = "{url}"\n')
    try:
        state = engine.model_health().state
        assert state is not None and state.backend == "postgresql" and state.location == url
        assert state.schema_version == SCHEMA_VERSION and state.error is None
        assert state.round_trip_ms is not None and 0 < state.round_trip_ms < 1000
    finally:
        engine.close()


def test_an_engine_without_a_state_url_keeps_sqlite(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    try:
        state = engine.model_health().state
        assert state is not None and state.backend == "sqlite" and state.location.endswith("state.db")
        assert state.schema_version == SCHEMA_VERSION and state.round_trip_ms is not None
    finally:
        engine.close()
