"""A WebSocket client runs delegated models for the server (runner.register): a real server, a real
runner client and real callers over JSON-RPC and HTTP; the fallback is the embedded SmolLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from car_inference.backends.remote import answer_budget
from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app

from .conftest import SMOL

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_examples() -> list[str]:
    """The Python blocks of the README's section on delegated models."""
    section = README.read_text().split("## Host-supplied inference (delegated models)\n", 1)[1]
    return re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)


DELEGATED = """
[[models]]
id = "host/echo"
name = "echo"
provider = "host"
capabilities = ["generate"]
context_length = 8192
[models.source]
kind = "delegated"
hint = "a JSON-RPC client"

[[models]]
id = "host/careful"
name = "careful"
provider = "host"
capabilities = ["generate"]
context_length = 8192
fallbacks = ["{smol}"]
[models.source]
kind = "delegated"
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    home: Path = tmp_path_factory.mktemp("runner-home")
    (home / "models.toml").write_text(DELEGATED.replace("{smol}", SMOL))
    engine = InferenceEngine(home=home)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine: InferenceEngine) -> Iterator[ServerThread]:
    with ServerThread(create_app(engine, ServerSettings(request_timeout_s=30))) as thread:
        yield thread


@pytest.fixture(autouse=True)
def closed_circuits(engine: InferenceEngine) -> Iterator[None]:
    """Each test is a scenario of its own: failures an earlier one provoked on purpose (timeouts,
    disconnects) must not leave a circuit open that refuses this one's calls before any runner
    sees them."""
    engine.router.breakers.reset()
    yield


def _rpc(method: str, params: Any = None, rid: Any = None) -> str:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if rid is not None:
        message["id"] = rid
    return json.dumps(message)


async def _recv(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _register(ws: ClientConnection, **params: Any) -> dict[str, Any]:
    await ws.send(_rpc("runner.register", params, rid="reg"))
    reply = await _recv(ws)
    assert reply["id"] == "reg"
    return reply


def _available(engine: InferenceEngine, model: str) -> bool:
    found = engine.registry.get(model)
    return found is not None and found.available


async def _eventually(check: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def test_a_client_runs_a_delegated_model_for_ws_and_http_callers(
    server: ServerThread, engine: InferenceEngine
) -> None:
    assert not _available(engine, "host/echo")
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        reply = await _register(runner, models=["host/echo"], name="echoer")
        assert reply["result"] == {"runner": "echoer", "models": ["host/echo"], "timeout_s": None}
        assert _available(engine, "host/echo")

        await caller.send(_rpc("infer", {"prompt": "ping", "model": "host/echo"}, rid=1))
        call = await _recv(runner)
        assert call["method"] == "infer" and call["params"]["stream"] is False
        assert call["params"]["model"]["id"] == "host/echo"
        assert call["params"]["request"]["prompt"] == call["params"]["prompt"] == "ping"
        answer = {"text": "pong", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": answer}))
        result = (await _recv(caller))["result"]
        assert result["text"] == "pong" and result["model_used"] == "host/echo"
        assert result["usage"]["completion_tokens"] == 1

        async def serve_one() -> None:  # the same runner answers an HTTP caller
            call = await _recv(runner)
            prompt = call["params"]["request"]["messages"][-1]["content"]
            await runner.send(
                json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": f"<{prompt}>"}})
            )

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            body = {"model": "host/echo", "messages": [{"role": "user", "content": "hi"}]}
            response, _ = await asyncio.gather(http.post("/v1/chat/completions", json=body), serve_one())
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "<hi>"
    await _eventually(lambda: not _available(engine, "host/echo"))


async def test_a_streaming_caller_gets_the_runner_events_as_they_come(server: ServerThread) -> None:
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=["host/echo"])
        await caller.send(_rpc("infer", {"prompt": "count", "model": "host/echo", "stream": True}, rid="s"))
        call = await _recv(runner)
        assert call["params"]["stream"] is True
        for piece in ("one ", "two"):
            event = {"type": "text_delta", "text": piece}
            await runner.send(_rpc("runner.event", {"id": call["id"], "event": event}))
            seen = await _recv(caller)  # the route event first, then this delta
            while seen["params"]["event"]["type"] != "text_delta":
                seen = await _recv(caller)
            assert seen["params"]["event"]["text"] == piece
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": ""}}))
        final = await _recv(caller)
        while "result" not in final:
            final = await _recv(caller)
        assert final["id"] == "s" and final["result"]["text"] == "one two"


async def test_a_runner_that_does_not_answer_in_time_is_told_to_cancel(server: ServerThread) -> None:
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        reply = await _register(runner, models=["host/echo"], timeout_s=0.5)
        assert reply["result"]["timeout_s"] == 0.5
        started = time.monotonic()
        await caller.send(_rpc("infer", {"prompt": "slow", "model": "host/echo"}, rid=2))
        call = await _recv(runner)
        cancel = await _recv(runner)  # never answered: the server gives up and says so
        assert cancel == {"jsonrpc": "2.0", "method": "cancel", "params": {"id": call["id"]}}
        error = (await _recv(caller))["error"]
        assert time.monotonic() - started < 5
        assert "no answer in 0.5 s" in error["message"] and error["data"]["retryable"] is True
        # A late answer to a call that is over is ignored, and the runner still serves.
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": "late"}}))
        await caller.send(_rpc("infer", {"prompt": "again", "model": "host/echo"}, rid=3))
        call = await _recv(runner)
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": "ok"}}))
        assert (await _recv(caller))["result"]["text"] == "ok"


async def test_a_caller_that_cancels_cancels_the_runner_call(server: ServerThread) -> None:
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=["host/echo"])
        await caller.send(_rpc("infer", {"prompt": "never mind", "model": "host/echo"}, rid=4))
        call = await _recv(runner)
        await caller.send(_rpc("cancel", {"id": 4}, rid=5))
        replies = {r["id"]: r for r in [await _recv(caller), await _recv(caller)]}
        assert replies[4]["error"]["message"] == "request cancelled"
        assert await _recv(runner) == {"jsonrpc": "2.0", "method": "cancel", "params": {"id": call["id"]}}


async def test_a_runner_that_disconnects_mid_request_fails_the_call_at_once(
    server: ServerThread, engine: InferenceEngine
) -> None:
    async with connect(server.ws_url) as caller:
        runner = await connect(server.ws_url)
        await _register(runner, models=["host/echo"])
        await caller.send(_rpc("infer", {"prompt": "hello?", "model": "host/echo"}, rid=6))
        await _recv(runner)  # the call arrived; the runner goes away without answering
        started = time.monotonic()
        await runner.close()
        error = (await _recv(caller))["error"]
        assert time.monotonic() - started < 5
        assert "host/echo" in error["message"] and "disconnected before answering" in error["message"]
        assert error["data"]["retryable"] is True
        await _eventually(lambda: not _available(engine, "host/echo"))
        # Now the model is unavailable, and says why.
        await caller.send(_rpc("infer", {"prompt": "anyone?", "model": "host/echo"}, rid=7))
        error = (await _recv(caller))["error"]
        assert "no inference runner is registered" in error["message"]


async def test_a_disconnect_mid_request_falls_back_to_the_next_model(server: ServerThread) -> None:
    async with connect(server.ws_url) as caller:
        runner = await connect(server.ws_url)
        await _register(runner, models=["host/careful"])
        params = {"prompt": "Say hi", "model": "host/careful", "params": {"max_tokens": 4, "temperature": 0}}
        await caller.send(_rpc("infer", params, rid=8))
        await _recv(runner)
        await runner.close()
        result = (await _recv(caller, timeout=60))["result"]
        assert result["model_used"] == SMOL and result["text"]


async def test_a_runner_error_fails_the_attempt_with_its_message(server: ServerThread) -> None:
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=["host/echo"])
        await caller.send(_rpc("infer", {"prompt": "x", "model": "host/echo"}, rid=9))
        call = await _recv(runner)
        failure = {"code": -32000, "message": "GPU on fire", "data": {"retryable": True}}
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "error": failure}))
        error = (await _recv(caller))["error"]
        assert "GPU on fire" in error["message"] and error["data"]["retryable"] is True
        # A bare string as the error: its text was lost ("the runner failed").
        await caller.send(_rpc("infer", {"prompt": "x", "model": "host/echo"}, rid=10))
        call = await _recv(runner)
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "error": "boom"}))
        assert "boom" in (await _recv(caller))["error"]["message"]


async def test_models_a_runner_brings_come_and_go_with_it(
    server: ServerThread, engine: InferenceEngine
) -> None:
    async with connect(server.ws_url) as runner:
        reply = await _register(runner, models=[{"id": "ws/brought", "capabilities": ["generate"]}])
        assert reply["result"]["models"] == ["ws/brought"]
        brought = engine.registry.get("ws/brought")
        assert brought is not None and brought.available and brought.kind == "delegated"
        # Served when named, never picked for another client's request without a model: that
        # request's prompt would go to a stranger's runner.
        assert brought.tags == ["named-only"]
        async with connect(server.ws_url) as caller:
            await caller.send(_rpc("route", {"prompt": "Say OK."}, rid="r"))
            decision = (await _recv(caller))["result"]
            assert decision["model_id"] != "ws/brought"
            assert decision["excluded"]["ws/brought"] == "served only when named (tag named-only)"
            await caller.send(_rpc("infer", {"prompt": "ping", "model": "ws/brought"}, rid=1))
            call = await _recv(runner)
            assert call["params"]["model"]["id"] == "ws/brought"
            await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": "pong"}}))
            assert (await _recv(caller))["result"]["text"] == "pong"
        await runner.send(_rpc("runner.unregister", rid="u"))
        assert (await _recv(runner))["result"] == {"unregistered": True}
        assert engine.registry.get("ws/brought") is None


async def test_another_client_cannot_take_over_a_model_a_runner_brought(server: ServerThread) -> None:
    """A second socket registering the same id took the calls, prompts included, until it left."""
    async with connect(server.ws_url) as owner, connect(server.ws_url) as thief:
        await _register(owner, models=[{"id": "ws/mine", "capabilities": ["generate"]}], name="owner")
        refused = (await _register(thief, models=["ws/mine"]))["error"]
        assert (
            refused["data"]["status"] == 400
            and "served by the runner that brought it (owner)" in refused["message"]
        )
        async with connect(server.ws_url) as caller:
            await caller.send(_rpc("infer", {"prompt": "secret", "model": "ws/mine"}, rid=1))
            call = await _recv(owner)
            assert call["params"]["model"]["id"] == "ws/mine"
            await owner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": "ok"}}))
            assert (await _recv(caller))["result"]["text"] == "ok"
        # An event id that is no call id (a list raised TypeError in the server: -32603 and a
        # traceback in its log).
        await owner.send(
            _rpc("runner.event", {"id": ["a"], "event": {"type": "text_delta", "text": "x"}}, rid=2)
        )
        bad = await _recv(owner)
        assert bad["error"]["code"] == -32602 and bad["error"]["data"]["param"] == "id"


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"models": [SMOL]}, 400, "runners serve delegated ones"),
        ({"models": []}, 400, "`models` must be a non-empty list"),
        ({"models": ["host/ecoh"]}, 404, "host/echo"),
        ({"models": ["host/echo"], "timeout_s": -1}, 400, "`timeout_s` must be a positive number"),
        ({"models": [{"id": "no-slash"}]}, 400, "an id like host/name"),
        ({"models": [{"id": "x/y", "capabilities": ["dance"]}]}, 400, "capabilities"),
        # 16,000 models in one registration slowed every client's registration, and its leaving
        # froze the server.
        ({"models": [f"x/m{i}" for i in range(1001)]}, 400, "at most 1,000 models (1,001 given)"),
        # The name is in every caller's error about the runner's models.
        ({"models": ["host/echo"], "name": "n" * 101}, 400, "1 to 100 printable characters"),
        ({"models": ["host/echo"], "name": "evil\nINFO: forged"}, 400, "1 to 100 printable characters"),
        ({"models": ["host/echo"], "name": " "}, 400, "1 to 100 printable characters"),
        ({"models": [{"id": "openai /gpt-4o"}]}, 400, "an id like host/name"),  # beside openai's
        ({"models": [{"id": "\u043epenai/gpt-4o"}]}, 400, "an id like host/name"),  # a Cyrillic o
        ({"models": [{"id": "x/y", "context_length": 10**30}]}, 400, "context_length"),
        ({"models": [{"id": "HOST/ECHO"}]}, 400, "is a name of host/echo"),  # found before host/echo
    ],
)
async def test_bad_registrations_are_refused_clearly(
    server: ServerThread, params: dict[str, Any], status: int, words: str
) -> None:
    async with connect(server.ws_url) as runner:
        error = (await _register(runner, **params))["error"]
    assert error["data"]["status"] == status and words in error["message"], error


async def test_the_readme_runner_client_runs(server: ServerThread, engine: InferenceEngine) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(readme_examples()[1], namespace)  # defines serve_as_runner; runs nothing on import
    runner = asyncio.create_task(namespace["serve_as_runner"](server.ws_url))
    try:
        await _eventually(lambda: _available(engine, "app/shout"))
        async with connect(server.ws_url) as caller:
            await caller.send(_rpc("infer", {"prompt": "hello there", "model": "app/shout"}, rid=1))
            assert (await _recv(caller))["result"]["text"] == "HELLO THERE"
        # A 600 KB prompt (sent twice in the call: 1.2 MB) dropped the example's runner, which
        # took websockets' default 1 MiB frames, and its model left for every client.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = {"model": "app/shout", "messages": [{"role": "user", "content": "a" * 600_000}]}
            answer = await http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"].startswith(
            "AAA"
        )
        assert _available(engine, "app/shout")
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    await _eventually(lambda: engine.registry.get("app/shout") is None)


async def test_an_invalid_stream_event_fails_the_call_and_registering_again_replaces(
    server: ServerThread, engine: InferenceEngine
) -> None:
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=["host/echo"])
        await caller.send(_rpc("infer", {"prompt": "x", "model": "host/echo", "stream": True}, rid=10))
        call = await _recv(runner)
        await runner.send(_rpc("runner.event", {"id": call["id"], "event": {"type": "confetti"}}))
        reply = await _recv(caller)
        while "error" not in reply:
            reply = await _recv(caller)
        assert "streamed an invalid event" in reply["error"]["message"]
        assert await _recv(runner) == {"jsonrpc": "2.0", "method": "cancel", "params": {"id": call["id"]}}
        # A second registration replaces the first: host/careful now, host/echo no more.
        assert (await _register(runner, models=["host/careful"]))["result"]["models"] == ["host/careful"]
        assert _available(engine, "host/careful") and not _available(engine, "host/echo")
        assert len(engine.runners.list()) == 1


async def test_a_runner_whose_answer_contradicts_its_stream_fails_the_call(server: ServerThread) -> None:
    """Streamed "abc", answered "xyz": the client saw one answer, the record and a non-streaming
    caller got another. Arguments for a tool call never started made a call without id or name.
    Both are the runner's invalid answer."""
    cases: list[tuple[list[dict[str, Any]], dict[str, Any] | None, str]] = [
        ([{"type": "text_delta", "text": "abc"}], {"text": "xyz"}, "whose text does not continue the text"),
        ([{"type": "tool_call_delta", "index": 0, "arguments": "{}"}], None, "before its tool_call_start"),
        # A `done` event is its answer as a result is: "NO" after "yes" was a 200 of two answers.
        (
            [{"type": "text_delta", "text": "yes"}, {"type": "done", "text": "NO"}],
            None,
            "whose text does not continue the text",
        ),
    ]
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=["host/echo"])
        for rid, (events, result, problem) in enumerate(cases):
            await caller.send(_rpc("infer", {"prompt": "x", "model": "host/echo", "stream": True}, rid=rid))
            call = await _recv(runner)
            while call["method"] == "cancel":  # of the call before, refused mid-stream
                call = await _recv(runner)
            for event in events:
                await runner.send(_rpc("runner.event", {"id": call["id"], "event": event}))
            if result is not None:
                await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}))
            reply = await _recv(caller)
            while "error" not in reply and "result" not in reply:
                reply = await _recv(caller)
            assert problem in reply["error"]["message"], reply


async def test_an_http_caller_gets_a_clear_answer_when_the_runner_goes(server: ServerThread) -> None:
    runner = await connect(server.ws_url)
    await _register(runner, models=["host/echo"])

    async def vanish() -> None:
        await _recv(runner)  # the call arrived; the runner goes away without answering
        await runner.close()

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        body = {"model": "host/echo", "messages": [{"role": "user", "content": "hi"}]}
        response, _ = await asyncio.gather(http.post("/v1/chat/completions", json=body), vanish())
    assert response.status_code in (502, 503), response.text
    assert "disconnected before answering" in response.json()["error"]["message"]


async def test_one_socket_cannot_take_every_slot(engine: InferenceEngine) -> None:
    """A client that keeps calls in flight (here to a runner that never answers) gets 429 past
    [server] ws_max_in_flight on its own socket; another client is still served."""
    settings = ServerSettings(request_timeout_s=30, ws_max_in_flight=2, max_concurrency=3)
    with ServerThread(create_app(engine, settings)) as thread:
        async with connect(thread.ws_url) as runner, connect(thread.ws_url) as hog:
            await _register(runner, models=[{"id": "ws/tarpit"}])
            for rid in (1, 2):
                await hog.send(_rpc("infer", {"prompt": "x", "model": "ws/tarpit"}, rid=rid))
            for _ in (1, 2):
                assert (await _recv(runner))["method"] == "infer"  # both held by the runner
            await hog.send(_rpc("infer", {"prompt": "x", "model": "ws/tarpit"}, rid=3))
            refused = await _recv(hog)
            assert refused["id"] == 3 and refused["error"]["data"]["status"] == 429
            assert "ws_max_in_flight" in refused["error"]["message"]
            async with connect(thread.ws_url) as other:
                await other.send(_rpc("tokenize", {"text": "hi"}, rid="t"))
                assert (await _recv(other))["result"]["tokens"]


async def test_a_result_only_runner_streams_its_text_and_tool_calls_to_an_sse_caller(
    server: ServerThread,
) -> None:
    """A runner that answers with a result (no runner.event): a streaming caller still gets the text
    and the tool calls as deltas, not just the role and the finish."""
    answers = iter(
        [
            {"text": "HELLO STREAM"},
            {"text": "", "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": {"city": "Oslo"}}]},
        ]
    )
    async with connect(server.ws_url) as runner:
        await _register(runner, models=["host/echo"])

        async def serve_one() -> None:
            call = await _recv(runner)
            assert call["params"]["stream"] is True
            await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": next(answers)}))

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            body = {"model": "host/echo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            for expected in ("text", "tool"):
                response, _ = await asyncio.gather(http.post("/v1/chat/completions", json=body), serve_one())
                assert response.status_code == 200, response.text
                chunks = [
                    json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
                ]
                deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
                if expected == "text":
                    assert "".join(d.get("content") or "" for d in deltas) == "HELLO STREAM"
                else:
                    calls = [t for d in deltas for t in d.get("tool_calls") or []]
                    assert calls and calls[0]["function"]["name"] == "get_weather"
                    arguments = "".join(t["function"].get("arguments") or "" for t in calls)
                    assert json.loads(arguments) == {"city": "Oslo"}
                    finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
                    assert "tool_calls" in finish


async def test_models_clients_bring_share_one_metrics_label(server: ServerThread) -> None:
    """Each id a client brought added some 21 series to /metrics, kept after it left: any client
    could grow it without end (300 ids: 100 KB -> 3.5 MB)."""
    async with connect(server.ws_url) as runner:
        await _register(runner, models=[{"id": "ws/metric-me-1234567", "capabilities": ["generate"]}])

        async def serve_one() -> None:
            call = await _recv(runner)
            await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": "ok"}}))

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            body = {"model": "ws/metric-me-1234567", "messages": [{"role": "user", "content": "hi"}]}
            response, _ = await asyncio.gather(http.post("/v1/chat/completions", json=body), serve_one())
            assert response.status_code == 200, response.text
            metrics = (await http.get("/metrics")).text
    assert "metric-me-1234567" not in metrics and 'model="client-model"' in metrics


async def test_a_client_cannot_bring_a_model_under_a_catalog_provider_or_by_a_bare_name(
    server: ServerThread, engine: InferenceEngine
) -> None:
    """`openai/gpt-4o` with the alias `gpt-4` took other clients' prompts that meant OpenAI (HTTP
    ones too), answered as if OpenAI had; `app/gpt-4` took the bare `gpt-4`."""
    async with connect(server.ws_url) as runner:
        for model, param in (
            ({"id": "openai/gpt-4o"}, "models.0.id"),
            ({"id": "app/gpt-4o", "aliases": ["gpt-4"]}, "models.0"),
            ({"id": "app/gpt-4o", "name": "gpt-4"}, "models.0"),
        ):
            reply = await _register(runner, models=[model])
            assert reply["error"]["data"]["param"] == param, reply
        assert (await _register(runner, models=[{"id": "app/gpt-4"}]))["result"]["models"] == ["app/gpt-4"]
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            body = {"model": "gpt-4", "messages": [{"role": "user", "content": "meant for someone else"}]}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 404
        assert engine.registry.find("gpt-4") is None and engine.registry.find("app/gpt-4") is not None


async def test_what_a_clients_runner_says_it_cost_is_not_the_servers_spend(tmp_path: Path) -> None:
    """A runner answering with `usage.cost_usd: 10` put $10 in the server's ledger against its $5
    daily limit: every client's paid calls, and free models' too, were then refused. A client's
    runner neither reserves against the limits nor adds to them; its caller still sees the cost."""
    (tmp_path / "config.toml").write_text("[spend]\ndaily_usd = 5.0\n")
    engine = InferenceEngine(home=tmp_path)
    try:
        with ServerThread(create_app(engine, ServerSettings(request_timeout_s=30))) as thread:
            async with connect(thread.ws_url) as runner, connect(thread.ws_url) as caller:
                await _register(runner, models=[{"id": "ws/dear"}])
                for rid in (1, 2):
                    await caller.send(_rpc("infer", {"prompt": "x", "model": "ws/dear"}, rid=rid))
                    call = await _recv(runner)
                    usage = {"prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 10.0}
                    answer = {"text": "ok", "usage": usage}
                    await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": answer}))
                    result = (await _recv(caller))["result"]
                    assert result["text"] == "ok" and result["usage"]["cost_usd"] == 10.0
        engine.flush()
        assert engine.spend.status().by_provider_today == {}
        assert engine.store.spend_by_provider(0.0) == {}
    finally:
        engine.close()


async def test_negative_token_counts_from_a_runner_are_its_invalid_answer_not_a_500(
    server: ServerThread,
) -> None:
    """`prompt_tokens: -5` reached the metrics' counters, which raised: the caller got -32603
    internal_error (a 500 over HTTP). It is the runner's invalid answer, named, as a 502."""
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=[{"id": "ws/negative"}])
        await caller.send(_rpc("infer", {"prompt": "x", "model": "ws/negative"}, rid=1))
        call = await _recv(runner)
        answer = {"text": "ok", "usage": {"prompt_tokens": -5, "completion_tokens": 2}}
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": answer}))
        error = (await _recv(caller))["error"]
        assert error["data"]["status"] == 502 and "invalid result" in error["message"], error

        await caller.send(_rpc("infer", {"prompt": "x", "model": "ws/negative", "stream": True}, rid=2))
        call = await _recv(runner)
        event = {"type": "usage", "usage": {"prompt_tokens": 1, "completion_tokens": -3}}
        await runner.send(_rpc("runner.event", {"id": call["id"], "event": event}))
        reply = await _recv(caller)
        while "error" not in reply:
            reply = await _recv(caller)
        assert reply["error"]["data"]["status"] == 502 and "invalid event" in reply["error"]["message"]


async def test_a_runner_that_writes_past_max_tokens_is_cut_as_an_upstream_would_be(
    server: ServerThread,
) -> None:
    """A runner streaming 150 pieces of 2 MB to a caller asking for 5 tokens sent it a 315 MB
    result. What passes the answer's budget (``remote.answer_budget``) is cut: the caller gets
    the head, finished as "length", and the runner is told to cancel."""
    budget = answer_budget(5)
    async with connect(server.ws_url, max_size=None) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=[{"id": "ws/verbose"}])
        params = {"prompt": "x", "model": "ws/verbose", "stream": True, "params": {"max_tokens": 5}}
        await caller.send(_rpc("infer", params, rid=1))
        call = await _recv(runner)
        for _ in range(20):
            event = {"type": "text_delta", "text": "y" * 1000}
            await runner.send(_rpc("runner.event", {"id": call["id"], "event": event}))
        reply = await _recv(caller)
        while "result" not in reply and "error" not in reply:
            reply = await _recv(caller)
        result = reply["result"]
        assert result["finish_reason"] == "length" and result["text"] == "y" * budget
        assert await _recv(runner) == {"jsonrpc": "2.0", "method": "cancel", "params": {"id": call["id"]}}

        # A result (not streamed) of more than the budget keeps its head, as "length".
        await caller.send(_rpc("infer", {**params, "stream": False}, rid=2))
        call = await _recv(runner)
        answer = {"text": "z" * (budget * 3)}
        await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": answer}))
        result = (await _recv(caller))["result"]
        assert result["finish_reason"] == "length" and result["text"] == "z" * budget


async def test_a_refused_second_registration_keeps_the_first(
    server: ServerThread, engine: InferenceEngine
) -> None:
    """Registering again with a model no runner may take (a GGUF id) failed, and the socket's
    first registration was gone too: its model a 404 for everyone."""
    async with connect(server.ws_url) as runner:
        await _register(runner, models=[{"id": "ws/keep"}], timeout_s=9)
        refused = await _register(runner, models=[SMOL])
        assert "error" in refused
        assert _available(engine, "ws/keep") and len(engine.runners.list()) == 1
        assert engine.runners.list()[0].timeout_s == 9
        # ... and its calls in flight: they failed ("the runner unregistered") though it had not.
        async with connect(server.ws_url) as owner, connect(server.ws_url) as caller:
            await _register(owner, models=[{"id": "ws/theirs"}])
            await caller.send(_rpc("infer", {"prompt": "x", "model": "ws/keep"}, rid=1))
            call = await _recv(runner)
            for models in ([SMOL], ["ws/theirs"], [{"id": "ws/keep"}, "ws/theirs"]):
                await runner.send(_rpc("runner.register", {"models": models}, rid="again"))
                assert "error" in await _recv(runner)  # no `cancel` before it
            await runner.send(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"text": "kept"}}))
            assert (await _recv(caller))["result"]["text"] == "kept"


async def test_unregistering_with_a_call_in_flight_says_so_and_cancels_it(server: ServerThread) -> None:
    """The caller was told "the runner disconnected" though its socket was open, and the runner
    never got `cancel` for the call it was working on."""
    async with connect(server.ws_url) as runner, connect(server.ws_url) as caller:
        await _register(runner, models=[{"id": "ws/leaving"}])
        await caller.send(_rpc("infer", {"prompt": "x", "model": "ws/leaving"}, rid=1))
        call = await _recv(runner)
        await runner.send(_rpc("runner.unregister", rid="bye"))
        got = [await _recv(runner), await _recv(runner)]
        assert {"jsonrpc": "2.0", "method": "cancel", "params": {"id": call["id"]}} in got
        assert {"jsonrpc": "2.0", "id": "bye", "result": {"unregistered": True}} in got
        error = (await _recv(caller))["error"]
        assert "unregistered before answering" in error["message"], error


async def test_a_runner_socket_calling_its_own_model_in_batches_gets_its_answers_read(
    server: ServerThread,
) -> None:
    """48 one-call batches on the runner's own model: the server stopped reading the socket at
    48 unanswered messages, the runner's answers to our calls went unread, every call timed out
    and the model's breaker opened for everyone."""
    calls = 48
    async with connect(server.ws_url) as ws:
        await _register(ws, models=[{"id": "ws/loop"}], timeout_s=10)
        for i in range(calls):
            await ws.send(json.dumps([{"jsonrpc": "2.0", "id": i, "method": "infer",
                                       "params": {"model": "ws/loop", "prompt": f"n{i}"}}]))  # fmt: skip
        results: dict[int, Any] = {}
        pending = [await _recv(ws, timeout=8) for _ in range(16)]  # the server's calls to us
        assert all(m["method"] == "infer" for m in pending)
        # Past the bound, only answers to those calls are read: anything else is busy, at once
        # (a list as `method` closed the socket; cancels with 500 KB ids grew the server unbounded).
        for odd in ({"id": "bad", "method": ["x"]}, {"id": "c", "method": "cancel", "params": {"id": 1}}):
            await ws.send(json.dumps({"jsonrpc": "2.0", **odd}))
            busy = await _recv(ws, timeout=8)
            assert busy["id"] == odd["id"] and busy["error"]["data"]["code"] == "server_busy", busy
        for message in pending:
            answer = {"text": "ok " + message["params"]["prompt"]}
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": answer}))
        while len(results) < calls:
            message = await _recv(ws, timeout=8)
            if isinstance(message, list):  # our batches' answers
                results.update((m["id"], m) for m in message)
            elif message.get("method") == "infer":  # the server's call to us: answered at once
                answer = {"text": "ok " + message["params"]["prompt"]}
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": answer}))
        assert all(r.get("result", {}).get("text") == f"ok n{i}" for i, r in results.items()), [
            r for r in results.values() if "error" in r
        ][:2]
