"""The app as a whole: liveness, the model health report, /metrics, errors for unknown routes,
start-up discovery and who owns the engine."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from car_inference.engine import InferenceEngine
from car_inference.routing.store import TraceRow
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer

from .conftest import SMOL


def test_health_and_model_health(local_server: ServerThread) -> None:
    assert httpx.get(local_server.url + "/health").json() == {"status": "ok"}
    report = httpx.get(local_server.url + "/v1/health").json()
    assert report["available_models"] >= 2 and report["total_models"] > report["available_models"]
    assert any(d["capability"] == "generate" and d["configured_model"] == SMOL for d in report["defaults"])


def test_metrics_count_requests_tokens_and_decisions(local_server: ServerThread) -> None:
    client = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    list(
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    response = httpx.get(local_server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    ok = f'car_requests_total{{model="{SMOL}",route="/v1/chat/completions",status="200"}}'
    assert ok in text
    assert 'car_requests_total{model="-",route="/v1/chat/completions",status="404"}' in text
    for name in (
        f'car_request_latency_seconds_count{{model="{SMOL}"}}',
        f'car_time_to_first_token_seconds_count{{model="{SMOL}"}}',
        f'car_input_tokens_total{{model="{SMOL}"}}',
        f'car_output_tokens_total{{model="{SMOL}"}}',
        'car_errors_total{error="ModelNotFound",model="-"}',
        "car_routing_decisions_total{strategy=",
    ):
        assert name in text, name


def test_failures_are_counted_on_every_route(local_server: ServerThread) -> None:
    """car_errors_total counted failures of chat and completions only: a failed embedding,
    transcription or image request left no trace in it. A capability no model has names no model
    (it was labelled model="image_generation")."""
    from prometheus_client.parser import text_string_to_metric_families

    def errors() -> dict[tuple[str, str], float]:
        text = httpx.get(local_server.url + "/metrics").text
        family = next(f for f in text_string_to_metric_families(text) if f.name == "car_errors")
        return {
            (s.labels["model"], s.labels["error"]): s.value
            for s in family.samples
            if s.name == "car_errors_total"
        }

    client = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused", max_retries=0)
    before = errors()
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="x")
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper-base", file=("a.wav", b"not audio at all"))
    with pytest.raises(openai.APIStatusError) as unavailable:
        client.images.generate(prompt="a cat")
    assert unavailable.value.status_code == 501
    after = errors()
    grew = {key for key, value in after.items() if value > before.get(key, 0)}
    assert ("-", "ModelNotFound") in grew
    assert ("-", "ModelUnavailable") in grew and not any(m == "image_generation" for m, _ in after)
    assert ("-", "InvalidInput") in grew, grew  # the audio that cannot be decoded


def test_an_error_a_retry_cannot_change_tells_the_sdk_not_to_retry(local_server: ServerThread) -> None:
    """OpenAI's SDK retries every 5xx twice: a 501 for a capability no model has (or a 503 for a
    model that is not pulled) reached the server three times per call, each after a back-off."""
    client = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused", max_retries=2)

    def served() -> float:
        text = httpx.get(local_server.url + "/metrics").text
        line = 'car_requests_total{model="-",route="/v1/images/generations",status="501"}'
        return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))

    before = served()
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(prompt="a cat")
    assert info.value.status_code == 501 and info.value.response.headers["x-should-retry"] == "false"
    assert served() == before + 1
    busy = httpx.post(local_server.url + "/v1/chat/completions", json={"model": "no-such", "messages": []})
    assert "x-should-retry" not in busy.headers  # a 4xx: the SDK does not retry those anyway
    # A streamed request for a model that is not pulled: the same 503, which lacked the header
    # (the SDK sent it three times).
    body = {"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    streamed = httpx.post(local_server.url + "/v1/chat/completions", json=body)
    assert streamed.status_code == 503 and streamed.headers["x-should-retry"] == "false"


def test_every_response_has_a_request_id(local_server: ServerThread) -> None:
    """OpenAI's SDK reads x-request-id as ``_request_id`` (and an error's ``request_id``): it was
    None on every response. An answer's is its trace id, the one feedback rates."""
    client = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.headers["x-request-id"] == raw.headers["x-car-trace-id"]
    assert raw.parse()._request_id == raw.headers["x-car-trace-id"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.request_id and len(missing.value.request_id) == 32
    ids = {httpx.get(local_server.url + path).headers.get("x-request-id") for path in ("/health", "/metrics")}
    assert None not in ids and len(ids) == 2, ids


def test_unknown_routes_and_methods_are_openai_errors(local_server: ServerThread) -> None:
    missing = httpx.post(local_server.url + "/v1/nothing-here", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_route"
    assert "/openapi.json lists the routes" in missing.json()["error"]["message"]
    # They said "the API lives under /v1", of a path under /v1: these live on the WebSocket.
    rpc = httpx.post(local_server.url + "/v1/tokenize", json={})
    assert rpc.json()["error"]["message"] == (
        "no route POST /v1/tokenize; tokenize is a JSON-RPC method on /ws (docs/protocol.md)"
    )
    assert "lives under /v1" in httpx.get(local_server.url + "/chat").json()["error"]["message"]
    wrong = httpx.get(local_server.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    # A trailing slash was a 307 to http://<the client's Host header>/..., the body posted twice.
    slash = httpx.post(local_server.url + "/v1/chat/completions/", json={}, headers={"Host": "evil.example"})
    assert slash.status_code == 404 and "location" not in slash.headers, slash.headers
    assert slash.json()["error"]["message"].endswith("no trailing slash: /v1/chat/completions")


def test_an_app_without_an_engine_makes_and_closes_its_own(isolated_home: Path) -> None:
    app = create_app()
    engine = app.state.car.engine
    assert engine.config.home == isolated_home and app.state.car.settings.port == 8642
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(sqlite3.ProgrammingError):
        engine.store.trace("any")


def test_start_up_discovers_endpoints(fake_provider: FakeProviderServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models.toml").write_text(
        f'[[endpoints]]\nname = "box"\nbase_url = "{fake_provider.openai_base_url}"\ndiscover = true\n'
        '[[endpoints]]\nname = "gone"\nbase_url = "http://127.0.0.1:9/v1"\ndiscover = true\n'
    )
    engine = InferenceEngine(home=home)
    with ServerThread(create_app(engine)) as server:  # an unreachable endpoint does not stop the start
        ids = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    engine.close()
    assert "box/gpt-4o-mini" in ids and not any(i.startswith("gone/") for i in ids)


def test_an_error_escaping_a_route_is_still_an_openai_500(server_engine: InferenceEngine) -> None:
    app = create_app(server_engine)

    async def boom() -> None:
        raise RuntimeError("internal detail /etc/secret")

    app.add_api_route("/v1/boom", boom, methods=["GET"])
    with ServerThread(app, log_level="critical") as server:
        response = httpx.get(server.url + "/v1/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error" and "secret" not in response.text


def test_the_server_deletes_traces_older_than_the_retention(tmp_path: Path) -> None:
    """`car serve` prunes at start (and hourly): an old trace goes, a recent one stays; so does a
    template unseen for its retention; the spend ledger's past days are rolled up, today's entries
    stay as they are."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[state]\ntrace_retention_days = 10\ntemplate_retention_days = 10\n")
    engine = InferenceEngine(home=home)
    now = time.time()
    for trace_id, age_days in (("old", 11), ("recent", 9)):
        at = now - age_days * 86_400
        row = TraceRow(trace_id, "p/a", "generate", "chat", f"coarse/p{trace_id}", "t", None, at)
        engine.store.record_trace(row, success=True, latency_ms=1.0, now=at)
    day = (now // 86_400 - 3) * 86_400  # a midnight UTC three days ago
    for ts in (day + 100, day + 200, now):
        engine.store.add_spend("openai", "openai/a", 0.5, ts=ts)
    rolled_up = {day, now}
    try:
        with ServerThread(create_app(engine)):
            deadline = time.monotonic() + 10
            while _spend_times(engine) != rolled_up and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.store.trace("old") is None and engine.store.trace("recent") is not None
            assert {r["key"] for r in engine.store.task_stats()} == {"template|precent"}
            assert _spend_times(engine) == rolled_up
            assert engine.store.spend_by_provider(0.0) == {"openai": 1.5}
    finally:
        engine.close()


def _spend_times(engine: InferenceEngine) -> set[float]:
    with engine.store._read() as conn:  # type: ignore[attr-defined]
        return {r["ts"] for r in conn.execute("SELECT ts FROM spend")}
