"""OpenTelemetry spans through the real server (uvicorn on loopback, the fake provider behind it):
the client's W3C traceparent is the parent of the server's span, the engine's spans (route, each
attempt, the provider call, the outcome write) hang below it, and OTLP export when configured.
Off, every hook is a no-op."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from car_inference import tracing
from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer, Fault, Reply
from fakes.optional import some

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    yield memory
    tracing.uninstall()


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


def _model(name: str, fake: FakeProviderServer, extra: str = "", capability: str = "generate") -> str:
    return (
        f'[[models]]\nid = "acme/{name}"\nname = "{name}"\nprovider = "acme"\n'
        f'capabilities = ["{capability}"]\ncontext_length = 32768\nquality = 0.9\n'
        f'{extra}[models.source]\nkind = "openai"\n'
        f'base_url = "{fake.openai_base_url}"\napi_key_env = "{name.upper()}_KEY"\nmodel_name = "{name}"\n'
    )


@pytest.fixture
def server(
    tmp_path: Path, fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServerThread, InferenceEngine]]:
    """A server over two models of the fake provider, alpha falling back to beta; each has its own
    key, so a fault can target one."""
    for name in ("alpha", "beta"):
        monkeypatch.setenv(f"{name.upper()}_KEY", f"key-{name}")
    (tmp_path / "models.toml").write_text(
        _model("alpha", fake, 'fallbacks = ["beta"]\n') + _model("beta", fake)
    )
    engine = InferenceEngine(home=tmp_path)
    with ServerThread(create_app(engine)) as thread:
        yield thread, engine
    engine.close()


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _finished(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    """The spans once the server's own has ended (just after the response went out)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        spans = exporter.get_finished_spans()
        if any(s.name.startswith("POST ") for s in spans):
            return spans
        time.sleep(0.01)
    return exporter.get_finished_spans()


def _check_tree(spans: tuple[ReadableSpan, ...]) -> dict[str, Any]:
    """The request's spans: one trace (the client's), the server span its child, the engine's
    below; returns them by role."""
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    (http,) = [s for s in spans if s.name.startswith("POST /v1/chat/completions")]
    assert _parent(http) == int(CLIENT_SPAN, 16) and some(http.attributes)["http.response.status_code"] == 200
    (generate,) = _by_name(spans, "inference.generate")  # the seed's span name
    (route,) = _by_name(spans, "inference.route")
    assert _parent(generate) == http.context.span_id and _parent(route) == generate.context.span_id
    attempts = _by_name(spans, "inference.attempt")
    calls = _by_name(spans, "inference.provider_call")
    records = _by_name(spans, "inference.record")
    ids = {a.context.span_id for a in attempts}
    assert all(_parent(a) == generate.context.span_id for a in attempts)
    assert sorted(some(_parent(c)) for c in calls) == sorted(ids) == sorted(some(_parent(r)) for r in records)
    return {"generate": generate, "route": route, "attempts": attempts, "calls": calls, "records": records}


def test_a_request_with_a_fallback_is_one_trace_below_the_clients_span(
    exporter: InMemorySpanExporter, server: tuple[ServerThread, InferenceEngine], fake: FakeProviderServer
) -> None:
    thread, engine = server
    fake.set_key_behavior("key-alpha", Fault.server_error())
    fake.queue(Reply(text="from beta", prompt_tokens=7, completion_tokens=2))
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    r = httpx.post(f"{thread.url}/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    engine.flush()  # the outcome writes run on the writer thread
    spans = _check_tree(_finished(exporter))
    first, second = sorted(spans["attempts"], key=lambda s: s.start_time)
    assert (first.attributes["model"], first.attributes["outcome"]) == ("acme/alpha", "failure")
    assert first.status.status_code == StatusCode.ERROR
    assert (second.attributes["model"], second.attributes["outcome"]) == ("acme/beta", "success")
    assert (
        second.attributes["trace_id"] == r.json()["id"].removeprefix("chatcmpl-")
        or second.attributes["trace_id"]
    )
    failed_call = [c for c in spans["calls"] if c.attributes["model"] == "acme/alpha"]
    assert (
        failed_call[0].status.status_code == StatusCode.ERROR
        and failed_call[0].attributes["provider"] == "acme"
    )
    generate = spans["generate"]
    assert generate.attributes["model"] == "acme/beta" and generate.attributes["max_tokens"] == 16
    assert generate.attributes["completion_tokens"] == 2 and generate.attributes["prompt_tokens"] == 7
    assert spans["route"].attributes["strategy"] == "explicit"
    assert spans["route"].attributes["fallbacks"] == ("acme/beta",)
    assert len(spans["records"]) == 2


def test_a_stream_is_traced_the_same_way(
    exporter: InMemorySpanExporter, server: tuple[ServerThread, InferenceEngine], fake: FakeProviderServer
) -> None:
    thread, engine = server
    fake.queue(Reply(text="streamed answer", completion_tokens=3))
    body = {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{thread.url}/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}
    ) as r:
        text = "".join(r.iter_text())
    assert r.status_code == 200 and "[DONE]" in text
    engine.flush()
    spans = _check_tree(_finished(exporter))
    (attempt,) = spans["attempts"]
    assert attempt.attributes["outcome"] == "success"
    assert spans["generate"].attributes["model"] == "acme/beta"
    assert spans["generate"].attributes["completion_tokens"] == 3


def test_without_a_traceparent_the_server_starts_a_trace(
    exporter: InMemorySpanExporter, server: tuple[ServerThread, InferenceEngine], fake: FakeProviderServer
) -> None:
    thread, _engine = server
    fake.queue(Reply(text="ok"))
    body = {"model": "beta", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{thread.url}/v1/chat/completions", json=body).status_code == 200
    spans = _finished(exporter)
    (http,) = [s for s in spans if s.name.startswith("POST")]
    assert http.parent is None
    (generate,) = _by_name(spans, "inference.generate")
    assert generate.context.trace_id == http.context.trace_id


def test_server_spans_are_named_by_route_not_by_the_clients_path(
    exporter: InMemorySpanExporter, server: tuple[ServerThread, InferenceEngine]
) -> None:
    """A made-up path (or a job id) named a span of its own: a client chose span names freely."""
    thread, _engine = server
    httpx.get(f"{thread.url}/v1/does/not/exist/qqqqqqqq")
    httpx.get(f"{thread.url}/v1/models/some-model-id")
    names = {s.name for s in _finished(exporter) if s.name.startswith("GET")}
    assert names == {"GET other", "GET /v1/models/{id}"}


def test_off_it_is_a_no_op() -> None:
    assert not tracing.active()
    assert tracing.start(tracing.ATTEMPT, model="m") is None
    with tracing.span(tracing.ROUTE) as s:
        assert s is None
    tracing.end(None, RuntimeError("x"))

    async def events() -> Any:
        yield 1

    gen = events()
    assert tracing.traced_stream(tracing.GENERATE, gen) is gen  # not even a wrapper

    async def double(x: int) -> int:
        return 2 * x

    async def traced_double() -> int:  # traced_task promises an Awaitable; asyncio.run takes a coroutine
        return await tracing.traced_task("inference.embed", double, model="m")(2)

    assert asyncio.run(traced_double()) == 4


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Collector.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_configured_by_the_otel_variables_it_exports_over_otlp() -> None:
    collector = HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    try:
        assert not tracing.configure_from_env({})  # nothing asked for: stays off
        assert not tracing.configure_from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SDK_DISABLED": "true"}
        )
        # the exporter reads its endpoint from the process environment, as in production
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
            assert tracing.configure_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})
            with tracing.span(tracing.ROUTE, model="m"):
                pass
            tracing.uninstall()  # shuts the provider down: the batch is sent
        assert not tracing.active()
        (path, content_type, body) = _Collector.received[-1]
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        assert b"inference.route" in body and b"car-inference" in body
    finally:
        tracing.uninstall()
        collector.shutdown()


def test_a_collector_that_does_not_answer_holds_the_exit_up_one_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The exporter retries a silent collector for 10 s and more; at exit (uninstall, also the
    atexit handler) the queued spans get ``SHUTDOWN_S``, and the loss is logged."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections are taken by the kernel, never answered
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/traces"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
            assert tracing.configure_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})
            with tracing.span(tracing.ROUTE, model="m"):
                pass
            started = time.perf_counter()
            with caplog.at_level(logging.WARNING, logger="car_inference.tracing"):
                tracing.uninstall()
            took = time.perf_counter() - started
        assert tracing.SHUTDOWN_S <= took < tracing.SHUTDOWN_S + 1.0, took
        assert "the last ones are dropped" in caplog.text
        assert not tracing.active()
    finally:
        tracing.uninstall()
        silent.close()


def test_the_other_tasks_are_spans_below_the_request(
    exporter: InMemorySpanExporter, fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedding request (the fake provider's OpenAI embeddings) is one ``inference.embed`` span
    below the server's; a provider failure marks it failed; a local tokenize has its own span."""
    monkeypatch.setenv("EMB_KEY", "key-emb")
    (tmp_path / "models.toml").write_text(_model("emb", fake, capability="embed"))
    engine = InferenceEngine(home=tmp_path)
    try:
        with ServerThread(create_app(engine)) as thread:
            body = {"model": "acme/emb", "input": ["one", "two"]}
            r = httpx.post(f"{thread.url}/v1/embeddings", json=body, headers={"traceparent": TRACEPARENT})
            assert r.status_code == 200, r.text
            spans = _finished(exporter)
            (http,) = [s for s in spans if s.name.startswith("POST /v1/embeddings")]
            (embed,) = _by_name(spans, "inference.embed")
            assert _parent(http) == int(CLIENT_SPAN, 16) and _parent(embed) == http.context.span_id
            assert (some(embed.attributes)["model"], some(embed.attributes)["provider"]) == (
                "acme/emb",
                "acme",
            )
            assert embed.status.status_code != StatusCode.ERROR

            exporter.clear()
            fake.set_key_behavior("key-emb", Fault.server_error())
            r = httpx.post(f"{thread.url}/v1/embeddings", json=body, headers={"traceparent": TRACEPARENT})
            assert r.status_code >= 500, r.text
            (failed,) = _by_name(_finished(exporter), "inference.embed")
            assert failed.status.status_code == StatusCode.ERROR
        exporter.clear()
        result = asyncio.run(engine.tokenize("smollm2", "hi"))
        (tokenize,) = _by_name(exporter.get_finished_spans(), "inference.tokenize")
        assert result.tokens and some(tokenize.attributes)["model"] == result.model_used
    finally:
        engine.close()
