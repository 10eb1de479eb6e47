"""JSON-RPC 2.0 over WebSocket at /ws, with a real client (``websockets``) against a real server
in front of the embedded models."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread
from car_inference.server.translate import MAX_CLASSIFY_LABELS, MAX_EMBED_INPUTS, MAX_RERANK_DOCUMENTS
from fakes import FakeProviderServer, Fault, Reply

from .conftest import MINILM, SMOL, remote_home, serve

LOCKED_KEYS = {
    "text",
    "tool_calls",
    "trace_id",
    "model_used",
    "latency_ms",
    "time_to_first_token_ms",
    "usage",
}
SHORT = {"max_tokens": 4, "temperature": 0}


def rpc(method: str, params: Any = None, rid: Any = 1) -> str:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
    if params is not None:
        message["params"] = params
    return json.dumps(message)


async def call(ws: ClientConnection, method: str, params: Any = None, rid: Any = 1) -> dict[str, Any]:
    await ws.send(rpc(method, params, rid))
    return json.loads(await ws.recv())


async def test_infer_result_has_exactly_the_locked_keys(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        reply = await call(ws, "infer", {"prompt": "Say hi", "params": SHORT}, rid="a")
    assert reply["jsonrpc"] == "2.0" and reply["id"] == "a"
    result = reply["result"]
    # A cut answer (max_tokens reached) says so; finish_reason is left out when it is "stop".
    assert set(result) == LOCKED_KEYS | {"finish_reason"}, (
        "infer keys drifted: update the test and docs/protocol.md"
    )
    assert result["finish_reason"] == "length"
    assert all(re.fullmatch(r"[a-z_]+", key) for key in result)
    assert result["model_used"] == SMOL and result["text"] and result["usage"]["completion_tokens"] <= 4


async def test_intent_deserializes_from_json_rpc_params(local_server: ServerThread) -> None:
    """The seed's generate_request_deserializes_intent_field_from_json_rpc_params, over the wire."""
    intent = {"task": "chat", "prefer_local": True, "require": ["tool_use"]}
    async with connect(local_server.ws_url) as ws:
        # `require` is honoured: no embedded model has tool_use, so routing says so (not a params error).
        reply = await call(ws, "infer", {"prompt": "summarize this email", "intent": intent, "params": SHORT})
        assert reply["error"]["code"] == -32002
        assert (
            "tool_use" in reply["error"]["message"] and reply["error"]["data"]["error"] == "ModelUnavailable"
        )
        # `task` is honoured: the decision uses the caller's task family.
        decision = (await call(ws, "route", {"prompt": "summarize this email", "intent": {"task": "code"}}))[
            "result"
        ]
        assert decision["task_family"] == "code"
        # Present but empty, and absent, both work.
        for params in ({"prompt": "x", "intent": {}, "params": SHORT}, {"prompt": "x", "params": SHORT}):
            assert set((await call(ws, "infer", params))["result"]) - {"finish_reason"} == LOCKED_KEYS
        bad = await call(ws, "infer", {"prompt": "x", "intent": {"task": "juggling"}})
        assert bad["error"]["code"] == -32602 and bad["error"]["data"]["param"] == "intent.task"


async def test_checks_across_fields_name_their_field(local_server: ServerThread) -> None:
    """They came back with `param: null` (HTTP named them), and OpenAI's named-function
    tool_choice object was refused as "should be 'auto', 'none' or 'required'"."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    cases = (
        ({"prompt": "x", "params": {"tool_choice": "required"}}, "params.tool_choice"),
        ({"prompt": "x", "tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0]"),
        (
            {"messages": [{"role": "user", "content": "x"}], "params": {"raw_prompt": True}},
            "params.raw_prompt",
        ),
        ({"prompt": "x", "tools": [weather], "params": {"tool_choice": "sometimes"}}, "params.tool_choice"),
    )
    async with connect(local_server.ws_url) as ws:
        for params, param in cases:
            for method in ("infer", "route"):
                error = (await call(ws, method, params))["error"]
                assert error["code"] == -32602 and error["data"]["param"] == param, (method, error)
        named = {"type": "function", "function": {"name": "get_weather"}}
        decision = await call(
            ws, "route", {"prompt": "x", "tools": [weather], "params": {"tool_choice": named}}
        )
        assert "error" not in decision or "should be" not in decision["error"]["message"], decision


async def test_streaming_sends_events_then_the_result(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        for method, params in (
            ("infer", {"prompt": "Count to three.", "params": {"max_tokens": 2}, "stream": True}),
            ("infer.stream", {"prompt": "Count to three.", "params": {"max_tokens": 2}}),
        ):
            await ws.send(rpc(method, params, rid=7))
            events = []
            while True:
                message = json.loads(await ws.recv())
                if "id" in message:
                    break
                assert message["method"] == "infer.event" and message["params"]["request_id"] == 7
                events.append(message["params"]["event"])
            assert events[0]["type"] == "route" and events[0]["model_id"] == SMOL
            text = "".join(e["text"] for e in events if e["type"] == "text_delta")
            assert message["id"] == 7 and set(message["result"]) - {"finish_reason"} == LOCKED_KEYS
            assert (
                message["result"]["text"] == text and message["result"]["trace_id"] == events[0]["trace_id"]
            )
            # Cut at max_tokens: the result says so, as a call without streaming does.
            assert message["result"]["finish_reason"] == "length"
        # A streaming notification runs but sends nothing: no answer, and no events whose
        # request_id (null) would tie them to no call.
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "infer.stream", "params": {
            "prompt": "Count to three.", "params": {"max_tokens": 2}}}))  # fmt: skip
        await asyncio.sleep(0.5)  # the model is warm: the notification's answer is done by now
        after = await call(ws, "health", rid="after")
        assert after["id"] == "after" and "result" in after, after


async def test_a_missing_media_backend_is_the_501_of_its_http_route(local_server: ServerThread) -> None:
    # No image or video model here: /v1/images/generations and /v1/videos answer 501
    # capability_unavailable (tests/server/test_media.py); data.status says the same over /ws.
    async with connect(local_server.ws_url) as ws:
        for method, capability in (
            ("generate_image", "image_generation"),
            ("generate_video", "video_generation"),
        ):
            error = (await call(ws, method, {"prompt": "a red apple"}))["error"]
            assert error["code"] == -32010, error
            assert error["data"]["status"] == 501 and error["data"]["code"] == "capability_unavailable"
            assert error["data"]["capability"] == capability
            assert error["message"].startswith(f"{capability} is not available on this server: ")


def test_plain_http_on_ws_says_to_upgrade(local_server: ServerThread) -> None:
    reply = httpx.get(local_server.url + "/ws")
    assert reply.status_code == 426 and "WebSocket" in reply.json()["error"]["message"]


async def test_embed_rerank_classify_tokenize(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        embedded = (await call(ws, "embed", {"texts": ["red", "blue"], "model": "auto"}))["result"]
        shouted = (await call(ws, "embed", {"texts": ["red"], "model": "AUTO"}))["result"]  # was not found
        assert shouted["model_used"] == embedded["model_used"]
        assert (
            embedded["model_used"] == MINILM
            and embedded["dimensions"] == 384
            and len(embedded["embeddings"]) == 2
        )
        ranked = (await call(ws, "rerank", {"query": "fruit", "documents": ["a car", "an apple"]}))["result"]
        assert [d["index"] for d in ranked["ranked"]] == [1, 0]
        labels = (
            await call(ws, "classify", {"text": "The striker scored", "labels": ["sports", "cooking"]})
        )["result"]
        assert labels["results"][0]["label"] == "sports"
        tokens = (await call(ws, "tokenize", {"model": "smollm2", "text": "Hello world"}))["result"]
        assert tokens["model_used"] == SMOL and tokens["tokens"]
        text = (await call(ws, "detokenize", {"tokens": tokens["tokens"]}))["result"]  # default model
        assert text["text"] == "Hello world"
        many = (await call(ws, "embed", {"texts": ["x"] * (MAX_EMBED_INPUTS + 1)}))["error"]
        assert (
            many["code"] == -32602 and many["data"]["param"] == "texts" and "at most 2048" in many["message"]
        )
        docs = {"query": "q", "documents": ["d"] * (MAX_RERANK_DOCUMENTS + 1)}
        assert (await call(ws, "rerank", docs))["error"]["data"]["param"] == "documents"
        labels = {"text": "t", "labels": ["l"] * (MAX_CLASSIFY_LABELS + 1)}
        assert (await call(ws, "classify", labels))["error"]["data"]["param"] == "labels"


async def test_models_list_health_and_feedback(
    local_server: ServerThread, server_engine: InferenceEngine
) -> None:
    async with connect(local_server.ws_url) as ws:
        models = (await call(ws, "models.list", {"capability": "embed", "available": True}))["result"]
        assert MINILM in {m["id"] for m in models} and all("embed" in m["capabilities"] for m in models)
        stringly = await call(ws, "models.list", {"available": "false"})  # bool("false") was True
        assert stringly["error"]["code"] == -32602 and stringly["error"]["data"]["param"] == "available"
        health = (await call(ws, "health"))["result"]
        assert health["available_models"] >= 2 and {d["capability"] for d in health["defaults"]} >= {
            "generate"
        }
        trace = (await call(ws, "infer", {"prompt": "hi", "params": SHORT}))["result"]["trace_id"]
        assert (await call(ws, "feedback", {"trace_id": trace, "score": 1}))["result"]["recorded"] is True
        # What a caller measured completes a route-only (pending) trace; this one is an answer's.
        late = await call(ws, "feedback", {"trace_id": trace, "score": 1, "latency_ms": 5})
        assert late["error"]["data"]["param"] == "latency_ms" and "already" in late["error"]["message"]
        missing = await call(ws, "feedback", {"trace_id": "nope", "score": 1})
        assert missing["error"]["code"] == -32009 and missing["error"]["data"]["status"] == 404


async def test_protocol_errors(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        await ws.send("{not json")
        parse = json.loads(await ws.recv())
        assert parse["id"] is None and parse["error"]["code"] == -32700
        await ws.send(json.dumps({"id": 3, "method": "infer"}))
        assert json.loads(await ws.recv())["error"]["code"] == -32600
        unknown = await call(ws, "generate", {}, rid=4)
        assert (
            unknown["id"] == 4
            and unknown["error"]["code"] == -32601
            and "infer" in unknown["error"]["message"]
        )
        positional = await call(ws, "infer", ["hi"], rid=5)
        assert positional["error"]["code"] == -32602
        missing = await call(ws, "infer", {"params": SHORT}, rid=6)
        assert missing["error"]["code"] == -32602 and missing["error"]["data"]["error"] == "ValidationError"
        assert missing["error"]["message"] == "a request needs a `prompt` or `messages`"  # no "Value error, "
        assert missing["error"]["data"]["details"][0]["param"] is None  # the request, not a field ""
        wrong = await call(ws, "detokenize", {"tokens": ["a"]}, rid=7)
        assert wrong["error"]["code"] == -32602 and wrong["error"]["data"]["param"] == "tokens"
        not_found = await call(ws, "infer", {"prompt": "x", "model": "qwen3-9b"}, rid=8)
        error = not_found["error"]
        assert (
            error["code"] == -32001 and error["data"]["status"] == 404 and error["data"]["retryable"] is False
        )
        assert (
            error["data"]["error"] == "ModelNotFound"
            and "qwen/qwen3-8b:q4_k_m" in error["data"]["suggestions"]
        )


async def test_methods_refuse_parameters_they_do_not_take(local_server: ServerThread) -> None:
    """The methods that read their parameters one by one refuse a misspelt one as the methods with
    a request model do (a misspelt filter listed every model)."""
    async with connect(local_server.ws_url) as ws:
        typo = await call(ws, "models.list", {"capabilty": "embed"})
        error = typo["error"]
        assert error["code"] == -32602 and error["data"]["param"] == "capabilty"
        assert "did you mean capability?" in error["message"]
        for method, params in (
            ("health", {"verbose": True}),
            ("tokenize", {"text": "hi", "modle": SMOL}),
            ("cancel", {"id": 1, "force": True}),
            ("feedback", {"trace_id": "t", "scor": 1}),
        ):
            refused = await call(ws, method, params)
            assert refused["error"]["code"] == -32602, (method, refused)
        infer = await call(ws, "infer", {"prompt": "x", "max_token": 3})  # a request model's own check
        assert infer["error"]["code"] == -32602 and "max_token" in infer["error"]["message"]
        assert "result" in await call(ws, "tokenize", {"text": "hi", "model": SMOL})


async def test_concurrent_requests_batches_and_notifications(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        await ws.send(
            rpc("infer", {"prompt": "Tell me about rivers.", "params": {"max_tokens": 40}}, rid="slow")
        )
        await ws.send(rpc("health", rid="fast"))
        await ws.send(rpc("models.list", rid="list"))
        replies = [json.loads(await ws.recv()) for _ in range(3)]
        assert {r["id"] for r in replies} == {"slow", "fast", "list"}
        assert replies[-1]["id"] == "slow", "quick calls answer while the generation runs"
        assert all("result" in r for r in replies)
        # A notification gets no answer; a batch gets one array.
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "health"}))
        batch = [
            json.loads(rpc("models.list", rid=1)),
            {"jsonrpc": "2.0", "method": "health"},
            json.loads(rpc("nope", rid=2)),
        ]
        await ws.send(json.dumps(batch))
        answers = json.loads(await ws.recv())
        assert isinstance(answers, list) and [a["id"] for a in sorted(answers, key=lambda a: a["id"])] == [
            1,
            2,
        ]
        assert sorted(answers, key=lambda a: a["id"])[1]["error"]["code"] == -32601


async def test_cancel_stops_a_stream(local_server: ServerThread, server_engine: InferenceEngine) -> None:
    # Loaded first: a cancel that lands before the load would leave nothing to check.
    assert await server_engine.warm_up([SMOL]) == [None]
    async with connect(local_server.ws_url) as ws:
        params = {"prompt": "Write a very long story.", "params": {"max_tokens": 3000, "temperature": 0.9}}
        await ws.send(rpc("infer.stream", params, rid="long"))
        assert json.loads(await ws.recv())["params"]["event"]["type"] == "route"
        await ws.send(rpc("cancel", {"id": "long"}, rid="stop"))
        answers: dict[str, Any] = {}
        while len(answers) < 2:
            message = json.loads(await ws.recv())
            if "id" in message:
                answers[message["id"]] = message
        assert answers["stop"]["result"] == {"id": "long", "cancelled": True}
        assert answers["long"]["error"]["code"] == -32800
        # not a request id (1.0 is refused as a request's id too): a params error, not -32603
        for bad in ([1], {"a": 1}, True, None, 1.0):
            error = (await call(ws, "cancel", {"id": bad}, rid="bad"))["error"]
            assert error["code"] == -32602 and error["data"]["param"] == "id", error
    entry = server_engine.cache.get(f"gguf:{SMOL}")
    assert entry is not None
    for _ in range(300):
        if entry.lock.acquire(blocking=False):
            entry.lock.release()
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the cancelled generation kept the model")


async def test_calls_in_flight_count_in_the_metrics(local_server: ServerThread) -> None:
    """car_requests_in_flight counted HTTP requests only: 16 embed calls over /ws showed as none."""

    def in_flight() -> float:
        text = httpx.get(local_server.url + "/metrics").text
        return float(re.search(r"^car_requests_in_flight (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]

    async with connect(local_server.ws_url) as ws:
        params = {"prompt": "Write a long story.", "params": {"max_tokens": 200, "temperature": 0.9}}
        await ws.send(rpc("infer.stream", params, rid="long"))
        assert json.loads(await ws.recv())["params"]["event"]["type"] == "route"
        assert await asyncio.to_thread(in_flight) == 2, "the stream and this /metrics request"
        await ws.send(rpc("cancel", {"id": "long"}, rid="stop"))
        while json.loads(await ws.recv()).get("id") != "long":
            pass
    assert await asyncio.to_thread(in_flight) == 1


async def test_hostile_messages_get_an_answer(local_server: ServerThread) -> None:
    """The inputs that were a 500 over HTTP got no answer at all over the WebSocket."""
    head = '{"jsonrpc": "2.0", "id": 1, "method": "infer", "params": '
    hostile = {
        "[" * 1000 + "]" * 1000: "nested too deeply",
        head + '{"max_tokens": ' + "9" * 5000 + "}}": "digits",
        head + '{"prompt": "x", "model": "\\ud800"}}': "surrogate",
    }
    async with connect(local_server.ws_url) as ws:
        for message, says in hostile.items():
            await ws.send(message)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["id"] is None and reply["error"]["code"] == -32700, reply
            assert says in reply["error"]["message"]
        for params, param in (
            ({"prompt": "x", "params": {"temperature": True}}, "params.temperature"),
            ({"prompt": "x", "params": {"tool_choice": "sometimes"}}, "params.tool_choice"),
            ({"prompt": "x", "stream": "yes"}, "stream"),  # was silently not streamed
            (
                {"messages": [{"role": "user", "content": "x"}], "params": {"raw_prompt": True}},
                "params.raw_prompt",
            ),
        ):
            reply = await call(ws, "infer", params, rid=2)
            assert reply["error"]["code"] == -32602, reply
            assert reply["error"]["data"].get("param") == param
        odd = await call(ws, "models.list", {"capability": ["embed"]}, rid=3)  # unhashable: was a crash
        assert odd["error"]["code"] == -32602 and odd["error"]["data"]["param"] == "capability"
        # A binary frame's bad bytes were replaced in silence ("a\xffb" tokenized as "a\ufffdb").
        await ws.send(b'{"jsonrpc":"2.0","id":4,"method":"tokenize","params":{"text":"a\xffb"}}')
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["error"]["code"] == -32700 and "not UTF-8 text" in reply["error"]["message"]
        await ws.send(rpc("tokenize", {"text": "ab"}, rid=5).encode())  # binary UTF-8 is fine
        assert "result" in json.loads(await asyncio.wait_for(ws.recv(), 10))
        # Two calls with one id: two replies with it, and cancel reached only one.
        await ws.send(
            rpc("infer", {"prompt": "Tell me about rivers.", "params": {"max_tokens": 24}}, rid="dup")
        )
        await ws.send(rpc("health", rid="dup"))
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert first["error"]["code"] == -32600 and "already in flight" in first["error"]["message"]
        assert "result" in json.loads(await asyncio.wait_for(ws.recv(), 60))
        bad_ids: list[Any] = [{}, [1], 1.5, True]
        for bad_id in bad_ids:  # named, not "expected a JSON-RPC 2.0 request object"
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": bad_id, "method": "health"}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["error"]["code"] == -32600 and "`id` must be" in reply["error"]["message"]
        empty = await call(ws, "embed", {"texts": []}, rid=7)  # as /v1/embeddings; was dimensions 0
        assert empty["error"]["code"] == -32602 and empty["error"]["data"]["param"] == "texts"
        typo = await call(ws, "infr", {}, rid=6)
        assert "did you mean infer or infer.stream?" in typo["error"]["message"]


async def test_batches_are_bounded(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        await ws.send(json.dumps([json.loads(rpc("health", rid=i)) for i in range(101)]))
        refused = json.loads(await ws.recv())
        assert isinstance(refused, dict) and refused["id"] is None and refused["error"]["code"] == -32600
        assert "101 calls (at most 100)" in refused["error"]["message"]
        await ws.send(json.dumps([json.loads(rpc("models.list", rid=i)) for i in range(100)]))
        assert len(json.loads(await ws.recv())) == 100
        # Counted calls past ws_max_in_flight (16) wait their turn: 84 of them were server_busy.
        await ws.send(json.dumps([json.loads(rpc("tokenize", {"text": "x"}, rid=i)) for i in range(40)]))
        answers = json.loads(await ws.recv())
        assert len(answers) == 40 and not [a for a in answers if "error" in a], answers[:3]
        # Two batches sent together share the slots (each sized its turns alone: 24 of 40 busy).
        for first in (0, 20):
            batch = [json.loads(rpc("tokenize", {"text": "x"}, rid=first + i)) for i in range(20)]
            await ws.send(json.dumps(batch))
        answers = json.loads(await ws.recv()) + json.loads(await ws.recv())
        assert len(answers) == 40 and not [a for a in answers if "error" in a], answers[:3]


def test_a_client_that_reads_no_answers_is_not_read_without_bound(server_engine: InferenceEngine) -> None:
    """A client that sent and never read made the server hold every message and its answer until
    the socket closed (11 MB a message, 3 GB in an audit). Past a bound of unanswered messages
    the server stops reading: the client's sends stall in its own socket, and once it reads,
    every message is answered, none lost. (A raw socket with a 4 KB receive buffer: a WebSocket
    library keeps reading into memory for its caller.)"""
    server = serve(server_engine, ws_max_in_flight=1, ws_max_message_mb=1)
    # An unknown method: its -32601 answer repeats the name. 150 of them, 135 MB, are more than
    # the kernel's buffers hold both ways (a loopback socket's grow to 32 MB here).
    n = 150
    payload = [json.dumps({"jsonrpc": "2.0", "id": i, "method": "m" * 900_000}).encode() for i in range(n)]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = 0
    try:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        reader = sock.makefile("rb")
        while reader.readline() not in (b"\r\n", b""):
            pass

        def send_all() -> None:
            nonlocal sent
            for body in payload:  # a client frame, masked with a zero key
                sock.sendall(bytes([0x81, 0xFF]) + struct.pack(">Q", len(body)) + bytes(4) + body)
                sent += 1

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        time.sleep(5)
        assert sent < n, "the server read every message from a client that reads nothing"
        answers = [json.loads(_server_frame(reader)) for _ in range(n)]
        sender.join(30)
        assert sorted(a["id"] for a in answers) == list(range(n))
        assert all(a["error"]["code"] == -32601 for a in answers)
    finally:
        sock.close()
        server.stop()


def _server_frame(reader: Any) -> bytes:
    """One unmasked frame's payload, as a server sends it."""
    head = reader.read(2)
    size = head[1] & 0x7F
    if size == 126:
        size = struct.unpack(">H", reader.read(2))[0]
    elif size == 127:
        size = struct.unpack(">Q", reader.read(8))[0]
    return bytes(reader.read(size))


async def test_a_message_over_4_mb_closes_the_socket(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url, max_size=None) as ws:
        await ws.send(rpc("infer", {"prompt": "x" * (4 * 1024 * 1024)}))
        with pytest.raises(ConnectionClosedError) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # message too big


async def test_a_big_batch_takes_turns_with_other_clients(local_server: ServerThread) -> None:
    """100 `health` calls (~1 ms each, all synchronous) used to run as one block: another
    client's call waited for the whole batch. Now the batch starts one call per loop turn."""
    async with connect(local_server.ws_url, max_size=None) as big, connect(local_server.ws_url) as other:
        await call(big, "health")  # warm
        arrivals: list[str] = []

        async def answer(ws: ClientConnection, name: str) -> None:
            await ws.recv()
            arrivals.append(name)

        await big.send(json.dumps([json.loads(rpc("health", rid=i)) for i in range(100)]))
        await asyncio.sleep(0.005)  # the batch has started
        await other.send(rpc("models.list", rid="other"))
        await asyncio.gather(answer(big, "batch"), answer(other, "other"))
    assert arrivals == ["other", "batch"]


async def test_a_busy_answer_is_retryable(server_engine: InferenceEngine) -> None:
    server = serve(server_engine, max_concurrency=1)
    try:
        async with connect(server.ws_url) as ws:
            await ws.send(
                rpc("infer", {"prompt": "Tell me about rivers.", "params": {"max_tokens": 30}}, rid=1)
            )
            await asyncio.sleep(0.05)
            busy = await call(ws, "health", rid=2)
            while busy.get("id") != 2:
                busy = json.loads(await ws.recv())
            data = busy["error"]["data"]
            assert data["code"] == "server_busy" and data["retry_after"] == 1 and data["retryable"] is True
            await ws.recv()
    finally:
        server.stop()


async def test_a_cut_stream_stays_retryable_over_json_rpc(
    tmp_path: Path, fake_provider: FakeProviderServer
) -> None:
    """SSE passes the stream's ``retryable`` on; JSON-RPC said ``retryable: false`` for the same
    cut (docs/protocol.md: passed on)."""
    engine = InferenceEngine(home=remote_home(tmp_path / "home", fake_provider, "alpha"))
    server = serve(engine)
    try:
        fake_provider.queue(Fault.cut_stream(2, Reply(text="a longer answer that is cut short")))
        async with connect(server.ws_url) as ws:
            await ws.send(rpc("infer", {"prompt": "hi", "model": "fake/alpha", "stream": True}, rid=3))
            while "id" not in (cut := json.loads(await ws.recv())):
                pass  # the stream's events, then the reply
        assert cut["error"]["data"]["code"] == "stream_failed", cut
        assert cut["error"]["data"]["retryable"] is True
    finally:
        server.stop()
        engine.close()


async def test_calls_cut_by_a_closing_socket_are_counted_as_client_gone(local_server: ServerThread) -> None:
    """They were counted under no status at all (a `cancel` was a 499, as a client gone over HTTP)."""

    def gone() -> float:
        text = httpx.get(local_server.url + "/metrics").text
        line = re.search(
            r'car_requests_total\{[^}]*model="-",route="ws:infer.stream",status="499"\} (\S+)', text
        )
        return float(line.group(1)) if line else 0.0

    before = gone()
    async with connect(local_server.ws_url) as ws:
        params = {"prompt": "Count to fifty.", "model": "smollm2", "params": {"max_tokens": 200}}
        await ws.send(rpc("infer.stream", params, rid="s"))
        await ws.recv()  # under way
    for _ in range(100):
        if gone() > before:
            break
        await asyncio.sleep(0.05)
    assert gone() == before + 1
