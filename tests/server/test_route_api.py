"""POST /v1/route: a decision without a generation, and the report that teaches the router."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from car_inference.engine import InferenceEngine
from car_inference.engine.bookkeeping import Bookkeeper
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer

from .conftest import remote_home

ASK = [{"role": "user", "content": "Write a Python function that reverses a list."}]


@pytest.fixture(scope="module")
def routed(
    tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProviderServer
) -> Iterator[tuple[httpx.Client, InferenceEngine]]:
    home = remote_home(tmp_path_factory.mktemp("route-home"), fake_provider, "alpha", "beta")
    engine = InferenceEngine(home=home)
    with ServerThread(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        yield http, engine
    engine.close()


def test_route_returns_the_decision_and_runs_nothing(
    routed: tuple[httpx.Client, InferenceEngine], fake_provider: FakeProviderServer
) -> None:
    http, _engine = routed
    before = len(fake_provider.requests)
    response = http.post("/v1/route", json={"messages": ASK, "max_tokens": 64, "record": False})
    assert response.status_code == 200, response.text
    body = response.json()
    decision = body["decision"]
    assert body["trace_id"] is None
    assert decision["task_family"] == "code" and decision["strategy"] in ("adaptive", "explore")
    candidates = {c["model_id"]: c for c in decision["candidates"]}
    assert decision["model_id"] in candidates
    for c in candidates.values():
        assert c["quality_sd"] > 0 and c["expected_output_tokens"] <= 64 and c["notes"]
    assert len(fake_provider.requests) == before  # nothing was generated


def test_a_reported_outcome_teaches_the_router(routed: tuple[httpx.Client, InferenceEngine]) -> None:
    """Route-only use: the caller runs the model and reports a score by trace id; the model's
    observations in that context grow and its belief moves toward the reported scores."""
    http, engine = routed
    body = {"messages": ASK, "model": "fake/beta"}  # a named model is explained, not replaced
    first = http.post("/v1/route", json=body).json()
    assert first["decision"]["model_id"] == "fake/beta" and first["decision"]["strategy"] == "explicit"
    before = first["decision"]["predicted_quality"]
    for _ in range(8):
        trace_id = http.post("/v1/route", json=body).json()["trace_id"]
        assert trace_id
        ok = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 0.0})
        assert ok.status_code == 200, ok.text
    after = http.post("/v1/route", json=body).json()["decision"]["predicted_quality"]
    assert after < before - 0.1
    profile = engine.tracker.profile("fake/beta")
    assert profile is not None and profile.total_calls == 8


def test_feedback_completes_a_route_with_what_the_caller_measured(
    routed: tuple[httpx.Client, InferenceEngine],
) -> None:
    """The time from /v1/route to /v1/feedback was learned as the model's latency (a model rated
    at once looked 1 ms fast), and HTTP route-only use could not say answer lengths or cost."""
    http, engine = routed
    routed_ = http.post("/v1/route", json={"messages": ASK, "model": "fake/alpha"})
    trace_id = routed_.json()["trace_id"]
    assert routed_.headers["x-car-trace-id"] == trace_id == routed_.headers["x-request-id"]
    bare = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 1})
    assert bare.status_code == 200, bare.text
    assert engine.store.trace(trace_id)["latency_ms"] is None  # type: ignore[index]
    trace_id = http.post("/v1/route", json={"messages": ASK, "model": "fake/alpha"}).json()["trace_id"]
    # A misspelt field was dropped: the trace completed without it, and the real one was refused.
    misspelt = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 0.5, "latency": 812})
    assert misspelt.status_code == 400 and misspelt.json()["error"]["param"] == "latency", misspelt.text
    assert "did you mean latency_ms?" in misspelt.json()["error"]["message"]
    assert engine.store.trace(trace_id)["outcome"] == "pending"  # type: ignore[index]
    body = {"trace_id": trace_id, "score": 0.5, "latency_ms": 812, "output_tokens": 40, "cost_usd": 0.0004}
    measured = http.post("/v1/feedback", json=body)
    assert measured.status_code == 200, measured.text
    trace = engine.store.trace(trace_id)
    assert trace is not None and trace["latency_ms"] == 812 and trace["output_tokens"] == 40
    again = http.post("/v1/feedback", json=body)  # the trace is complete now
    assert again.status_code == 400 and again.json()["error"]["param"] == "latency_ms"
    for bad, param in (({"output_tokens": 1.5}, "output_tokens"), ({"cost_usd": "1"}, "cost_usd")):
        refused = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 1, **bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    negative = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 1, "latency_ms": -5})
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "latency_ms"


def test_feedback_says_a_routed_call_failed(routed: tuple[httpx.Client, InferenceEngine]) -> None:
    """A route-only caller over HTTP could only rate its failed call 0, counted as an answer (a
    success of quality 0); Python's report(success=False) recorded a failure."""
    http, engine = routed
    before = engine.tracker.profile("fake/alpha")
    fails, successes = (before.fail_count, before.success_count) if before is not None else (0, 0)
    trace_id = http.post("/v1/route", json={"messages": ASK, "model": "fake/alpha"}).json()["trace_id"]
    failed = http.post("/v1/feedback", json={"trace_id": trace_id, "success": False, "latency_ms": 30000})
    assert failed.status_code == 200, failed.text
    assert failed.json() == {"trace_id": trace_id, "score": 0.0, "recorded": True, "success": False}
    trace = engine.store.trace(trace_id)
    assert trace is not None and trace["outcome"] == "failure" and trace["error_class"] == "reported_failure"
    profile = engine.tracker.profile("fake/alpha")
    assert profile is not None and (profile.fail_count, profile.success_count) == (fails + 1, successes)
    for body, param in (
        ({"trace_id": trace_id, "success": False}, "trace_id"),  # a failed call already
        ({"trace_id": "x", "success": "no"}, "success"),
        ({"trace_id": "x", "success": False, "score": 0.5}, "score"),  # a failed call has no answer
    ):
        refused = http.post("/v1/feedback", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def test_route_refuses_bad_bodies(routed: tuple[httpx.Client, InferenceEngine]) -> None:
    http, _engine = routed
    for body, param in (({"messages": ASK, "record": "yes"}, "record"), ({"messages": "hi"}, "messages")):
        response = http.post("/v1/route", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    unknown = http.post("/v1/route", json={"messages": ASK, "model": "fake/gamma"})
    assert unknown.status_code == 404 and "fake/gamma" in unknown.json()["error"]["message"]


def test_feedback_behind_a_slow_store_holds_up_no_other_request(
    tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProviderServer
) -> None:
    """Feedback writes its answer's record first, behind whatever the writer has queued: with the
    store stalled, that request waits (off the event loop) and every other request is answered."""
    home = remote_home(tmp_path_factory.mktemp("slow-home"), fake_provider, "alpha")
    engine = InferenceEngine(home=home)
    with ServerThread(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        stuck = threading.Event()
        keeper = engine.bookkeeper = Bookkeeper()  # writes that stall outside the store's batch
        keeper.start_writer()
        keeper.submit(stuck.wait, 20)
        trace_id = http.post("/v1/route", json={"messages": ASK}).json()["trace_id"]
        answers: list[httpx.Response] = []
        waiting = threading.Thread(
            target=lambda: answers.append(http.post("/v1/feedback", json={"trace_id": trace_id, "score": 1}))
        )
        waiting.start()
        time.sleep(0.2)
        assert not answers, "the feedback waits for its record"
        started = time.monotonic()
        assert http.get("/v1/models", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        assert http.get("/v1/health", timeout=5).status_code == 200
        stuck.set()
        waiting.join(20)
        assert answers and answers[0].status_code == 200 and answers[0].json()["recorded"] is True
    engine.close()


def test_feedback_waits_for_a_locked_store_a_bounded_time_and_is_written_later(
    tmp_path_factory: pytest.TempPathFactory,
    fake_provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A state database another program holds write-locked kept a feedback request waiting up to
    request_timeout_s (600 s). Past FEEDBACK_WAIT_S it is a 503 state_store_behind with
    Retry-After, and the feedback is written once the lock is let go: nothing is lost."""
    import sqlite3

    from car_inference.server import common

    monkeypatch.setattr(common, "FEEDBACK_WAIT_S", 0.5)
    home = remote_home(tmp_path_factory.mktemp("locked-home"), fake_provider, "alpha")
    engine = InferenceEngine(home=home)
    with ServerThread(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        trace_id = http.post("/v1/route", json={"messages": ASK}).json()["trace_id"]
        holder = sqlite3.connect(home / "state.db", timeout=1, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another program's write transaction
        try:
            started = time.monotonic()
            busy = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 0.25})
            assert time.monotonic() - started < 5
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "state_store_behind"
            assert busy.headers["retry-after"]
            # Not "it is written once the store lets it": with the database away it was then lost.
            assert "may still be written" in busy.json()["error"]["message"]
            assert "send it again" in busy.json()["error"]["message"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        deadline = time.monotonic() + 15
        while (engine.store.trace(trace_id) or {}).get("feedback") != 0.25:
            assert time.monotonic() < deadline, "the feedback was lost"
            time.sleep(0.05)
        again = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 0.25})  # a safe retry
        assert again.status_code == 200 and (engine.store.trace(trace_id) or {}).get("feedback") == 0.25
    engine.close()


def test_a_route_whose_trace_waits_for_the_store_holds_up_no_other_request(
    tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProviderServer
) -> None:
    """The writer thread holds the store (SQLite's one connection) for its batch: a recorded
    decision's trace waits for it off the event loop, and other requests are answered meanwhile."""
    home = remote_home(tmp_path_factory.mktemp("busy-home"), fake_provider, "alpha")
    engine = InferenceEngine(home=home)
    with ServerThread(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        stuck = threading.Event()
        engine.bookkeeper.submit(stuck.wait, 20)  # the writer's batch stalls, holding the store
        time.sleep(0.1)
        answers: list[httpx.Response] = []
        ask = {"messages": ASK}
        waiting = threading.Thread(target=lambda: answers.append(http.post("/v1/route", json=ask)))
        waiting.start()
        time.sleep(0.2)
        assert not answers, "the trace waits for the store"
        assert http.get("/v1/models", timeout=5).status_code == 200
        stuck.set()
        waiting.join(20)
        assert answers and answers[0].status_code == 200 and answers[0].json()["trace_id"]
    engine.close()


def test_a_named_model_that_cannot_chat_is_a_400_not_a_decision(
    routed: tuple[httpx.Client, InferenceEngine],
) -> None:
    """An embedding model named for a chat: the 400 of /v1/chat/completions (it returned a
    generate decision for it, and kept a pending trace)."""
    http, _engine = routed
    refused = http.post("/v1/route", json={"messages": ASK, "model": "all-MiniLM-L6-v2"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_mode"
    assert "does not declare generate" in refused.json()["error"]["message"]
