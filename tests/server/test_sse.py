"""Streaming over SSE: a disconnect stops the model, headers wait for the model that answers, a
failure before the first token is a proper HTTP error, a failure after it an error event, and
the request timeout holds for streams too."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from car_inference.server.sse import ChatChunks, CompletionChunks
from car_inference.server.translate import chat_request
from car_inference.stream import Done, RouteEvent, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart
from fakes import FakeProviderServer, Fault, Reply

from .conftest import SMOL, model_freed
from .test_routes import WEATHER

MODELS = """
[[models]]
id = "fake/{name}"
name = "{name}"
provider = "fake"
capabilities = ["generate", "tool_use"]
context_length = 32768
quality = {quality}
[models.source]
kind = "openai"
base_url = "{url}"
model_name = "{name}"
needs_key = false
"""


def test_client_disconnect_stops_the_generation(
    local_server: ServerThread, server_engine: InferenceEngine
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}],
        "max_tokens": 3000,
        "temperature": 0.9,
        "seed": 11,
        "stream": True,
    }
    with (
        httpx.Client(base_url=local_server.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        trace = response.headers["x-car-trace-id"]
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received >= 4:
                break
    # The connection is closed: the server notices, closes the engine's stream, the model stops.
    entry = model_freed(server_engine, "the model kept generating after the client left")
    assert entry.instance.llm.n_tokens < 400, "it stopped long before max_tokens"
    # Kept as an abandoned trace (written on the server loop's next turn), counted for nothing.
    deadline = time.monotonic() + 5
    while (trace_row := server_engine.store.trace(trace)) is None:
        assert time.monotonic() < deadline, "the abandoned attempt was never recorded"
        time.sleep(0.01)
    assert trace_row["outcome"] == "abandoned" and trace_row["quality"] is None


@pytest.fixture(scope="module")
def remote(
    fake_provider: FakeProviderServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InferenceEngine]:
    home = tmp_path_factory.mktemp("sse-home")
    url = fake_provider.openai_base_url
    models = MODELS.format(name="first", quality=0.95, url=url) + MODELS.format(
        name="second", quality=0.9, url=url
    )
    (home / "models.toml").write_text(models)
    (home / "config.toml").write_text(
        "[routing]\nexploration_rate = 0.0\nseed = 7\n[remote]\ntimeout_s = 10\n"
    )
    engine = InferenceEngine(home=home)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(remote: InferenceEngine) -> Iterator[ServerThread]:
    with ServerThread(create_app(remote)) as s:
        yield s


@pytest.fixture
def client(server: ServerThread, fake_provider: FakeProviderServer) -> openai.OpenAI:
    fake_provider.reset()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_headers_name_the_model_that_answers_after_a_fallback(
    client: openai.OpenAI, fake_provider: FakeProviderServer
) -> None:
    fake_provider.queue(Fault.server_error(500))
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    ) as response:
        assert response.headers["x-car-model"] == SMOL
        assert response.headers["x-car-route-reason"].startswith("fallback 1 after fake/first")
        chunks = list(response.parse())
    assert chunks[0].model == SMOL and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chunks_after_a_mid_stream_fallback_name_the_model_that_wrote_them(
    client: openai.OpenAI, fake_provider: FakeProviderServer, remote: InferenceEngine, server: ServerThread
) -> None:
    """After a stream broke mid-way the chunks (and the usage of the model that finished) still
    named the first model; and a rating of the trace in the headers, the only one the client
    has, was recorded as that failed model's quality."""
    cut = Fault.cut_stream(after_chunks=2, reply=Reply(text="The answer is long and", chunk_chars=4))
    fake_provider.queue(cut, Reply(text=" it goes on."))
    with client.chat.completions.with_streaming_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Tell me"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        first, trace = response.headers["x-car-model"], response.headers["x-car-trace-id"]
        chunks = list(response.parse())
    models = [c.model for c in chunks]
    assert models[0] == first and models[-1] != first
    assert models == [first] * models.count(first) + [models[-1]] * (len(models) - models.count(first))
    assert chunks[-1].usage is not None  # the usage of the model that finished, under its name
    answer = httpx.post(server.url + "/v1/feedback", json={"trace_id": trace, "score": 1.0})
    assert answer.status_code == 200, answer.text
    remote.flush()
    with sqlite3.connect(remote.config.paths.state_db) as db:
        rated = db.execute("SELECT model_id, outcome FROM traces WHERE feedback = 1.0").fetchall()
    assert rated == [(models[-1], "success")]


def test_failure_before_the_first_token_is_an_http_error(
    client: openai.OpenAI, fake_provider: FakeProviderServer
) -> None:
    # With tools only the two hosted models are candidates; both fail.
    fake_provider.queue(Fault.server_error(500), Fault.server_error(503))
    with pytest.raises(openai.APIStatusError) as info:
        list(
            client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "x"}], tools=[WEATHER], stream=True
            )
        )
    error = info.value
    assert error.status_code == 502 and error.code == "all_models_failed"
    attempts = error.body["attempts"]  # type: ignore[index]
    # Both were tried (in the order the router's beliefs give: fake/first failed in the test above).
    assert sorted(a["model"] for a in attempts) == ["fake/first", "fake/second"]
    assert all(a["error"] == "ProviderError" for a in attempts)


def test_failure_after_the_first_token_is_an_error_event(
    client: openai.OpenAI, fake_provider: FakeProviderServer
) -> None:
    fake_provider.queue(Fault.cut_stream(after_chunks=2))
    stream = client.chat.completions.create(
        model="fake/first", messages=[{"role": "user", "content": "tell me more"}], stream=True
    )
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as info:
        received.extend(stream)
    assert any(c.choices and c.choices[0].delta.content for c in received)
    assert "fake/first" in info.value.message and info.value.code == "stream_failed"


def test_request_timeout_is_504_for_streams_and_plain_calls(
    remote: InferenceEngine, fake_provider: FakeProviderServer
) -> None:
    fake_provider.reset()
    with ServerThread(
        create_app(remote, remote.config.server.model_copy(update={"request_timeout_s": 0.5}))
    ) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            fake_provider.queue(Reply(delay_s=3), Reply(delay_s=3))
            with pytest.raises(openai.APIStatusError) as info:
                out = client.chat.completions.create(
                    model="auto", messages=[{"role": "user", "content": "x"}], tools=[WEATHER], stream=stream
                )
                list(out) if stream else None
            assert info.value.status_code == 504 and info.value.code == "request_timeout"


def test_chunk_rendering(tmp_path: Path) -> None:
    call = chat_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True})
    chunks = ChatChunks(call)
    head = chunks.head(RouteEvent(model_id="m", strategy="explicit", reason="r", trace_id="abcdef0123456789"))
    assert b'"role":"assistant"' in head and b"chatcmpl-abcdef0123456789" in head
    assert b'"reasoning_content":"hm"' in (chunks.event(ThinkingDelta(text="hm")) or b"")
    start = chunks.event(ToolCallStart(index=0, name="f")) or b""
    assert b'"id":"call_abcdef012345_0"' in start and b'"arguments":""' in start
    assert b'"arguments":"{}"' in (chunks.event(ToolCallDelta(index=0, arguments="{}")) or b"")
    final = chunks.finish(Done(text="ab"))
    assert final.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in final
    legacy = CompletionChunks(call)
    assert legacy.head(RouteEvent(model_id="m", strategy="s", reason="r", trace_id="t")) == b""
    assert b'"text":"hi"' in (legacy.event(TextDelta(text="hi")) or b"")
    assert legacy.event(ThinkingDelta(text="x")) is None
