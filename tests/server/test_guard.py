"""The guard in front of every route: API keys (401), body size (413), the concurrency bound (429),
through the official SDK against a real server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from car_inference.engine import InferenceEngine
from car_inference.engine.bookkeeping import Bookkeeper
from car_inference.server import ServerThread
from car_inference.server.guard import authorized
from fakes import FakeProviderServer, Reply
from fakes.redis_service import RedisServer, redis_prefix, redis_url

from .conftest import SMOL, remote_home, serve

KEYS = ["key-one", "key-two"]
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(
    fake_provider: FakeProviderServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InferenceEngine]:
    engine = InferenceEngine(home=remote_home(tmp_path_factory.mktemp("guard-home"), fake_provider, "echo"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine: InferenceEngine) -> Iterator[ServerThread]:
    server = serve(engine, api_keys=KEYS, max_body_mb=0.01, max_concurrency=1)
    yield server
    server.stop()


def sdk(server: ServerThread, key: str = KEYS[1]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_authorized_compares_every_key() -> None:
    keys = [k.encode() for k in KEYS]
    assert authorized([(b"authorization", b"Bearer key-two")], keys)
    assert authorized([(b"authorization", b"bearer  key-one ")], keys)
    assert not authorized([(b"authorization", b"Bearer key-thr")], keys)
    assert not authorized([(b"authorization", b"Basic key-one")], keys)
    assert not authorized([], keys)
    assert not authorized([(b"authorization", b"Bearer ")], [b""])


def test_api_keys_are_required_except_for_health(server: ServerThread) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(server, "wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert "Authorization: Bearer" in info.value.message
    assert any(m.id == "fake/echo" for m in sdk(server).models.list())
    assert (
        sdk(server).chat.completions.create(model="fake/echo", messages=HI).choices[0].message.content
        == "echo: hi"
    )
    bare = httpx.get(server.url + "/metrics")
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


async def test_websocket_handshake_needs_a_key(server: ServerThread) -> None:
    ws_url = server.ws_url
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url):
            pass
    assert info.value.response.status_code == 403
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {KEYS[0]}"}) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "models.list"}))
        assert "result" in json.loads(await ws.recv())


def test_bodies_over_the_limit_are_413(server: ServerThread) -> None:
    big: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x" * 20_000}]
    with pytest.raises(openai.APIStatusError) as info:
        sdk(server).chat.completions.create(model="fake/echo", messages=big)
    assert info.value.status_code == 413 and info.value.code == "request_too_large"
    assert "0.01 MB" in info.value.message

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "fake/echo", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}]}'

    headers = {"Authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"}
    response = httpx.post(server.url + "/v1/chat/completions", content=chunked(), headers=headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def small() -> Iterator[bytes]:
        yield json.dumps({"model": "fake/echo", "messages": HI}).encode()

    assert (
        httpx.post(server.url + "/v1/chat/completions", content=small(), headers=headers).status_code == 200
    )


def test_a_chunked_body_over_the_limit_that_arrived_whole_is_answered_at_once(server: ServerThread) -> None:
    """Headers and all of a 20 KB chunked body in one write: the guard's first read holds the whole
    body, past the limit. It was answered only after body_timeout_s (30 s): the guard waited to
    drain more body that would never come."""
    body = json.dumps({"model": "fake/echo", "messages": [{"role": "user", "content": "x" * 20_000}]})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + _chunked(body.encode(), 4096))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


async def test_requests_over_the_concurrency_bound_are_429(
    server: ServerThread, fake_provider: FakeProviderServer
) -> None:
    fake_provider.queue(Reply(text="slow answer", delay_s=1.0))
    results: list[str] = []
    first: list[ChatCompletionMessageParam] = [{"role": "user", "content": "take your time"}]
    slow = threading.Thread(
        target=lambda: results.append(
            sdk(server).chat.completions.create(model="fake/echo", messages=first).choices[0].message.content
            or ""
        )
    )
    slow.start()
    deadline = time.monotonic() + 5
    while not any(r.json and r.json.get("messages") == first for r in fake_provider.requests):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            sdk(server).chat.completions.create(model="fake/echo", messages=HI)
        assert info.value.code == "server_busy" and info.value.response.headers["retry-after"] == "1"
        assert httpx.get(server.url + "/health").status_code == 200  # probes are never refused
        async with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {KEYS[0]}"}) as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 9, "method": "health"}))
            busy = json.loads(await ws.recv())["error"]
        assert busy["code"] == -32008 and busy["data"]["status"] == 429 and busy["data"]["retry_after"] == 1
    finally:
        slow.join()
    assert results == ["slow answer"]
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}).text
    assert 'car_requests_total{model="-",route="/v1/chat/completions",status="429"} 1.0' in metrics


async def test_one_client_cannot_take_every_slot(
    engine: InferenceEngine, fake_provider: FakeProviderServer
) -> None:
    """With max_in_flight_per_client, a client (here: an API key) over its share is refused with
    429 client_busy, over HTTP and JSON-RPC alike, while another client is served at once."""
    server = serve(engine, api_keys=KEYS, max_concurrency=8, max_in_flight_per_client=1)
    fake_provider.queue(Reply(text="slow answer", delay_s=1.0))
    first: list[ChatCompletionMessageParam] = [{"role": "user", "content": "mine, slowly"}]
    slow = threading.Thread(
        target=lambda: sdk(server, KEYS[0]).chat.completions.create(model="fake/echo", messages=first)
    )
    slow.start()
    try:
        deadline = time.monotonic() + 5
        while not any(r.json and r.json.get("messages") == first for r in fake_provider.requests):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:
            sdk(server, KEYS[0]).chat.completions.create(model="fake/echo", messages=HI)
        assert info.value.code == "client_busy" and "max_in_flight_per_client" in info.value.message
        other = sdk(server, KEYS[1]).chat.completions.create(model="fake/echo", messages=HI)
        assert other.choices[0].message.content
        async with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {KEYS[0]}"}) as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "health"}))
            busy = json.loads(await ws.recv())["error"]
        assert busy["code"] == -32008 and busy["data"]["code"] == "client_busy"  # as over HTTP
        assert busy["data"]["status"] == 429 and "max_in_flight_per_client" in busy["message"]
    finally:
        slow.join()
        server.stop()


async def test_one_client_cannot_hold_every_socket(engine: InferenceEngine) -> None:
    """Past ws_max_sockets_per_client, a client's new WebSocket is closed with 1013 (try again
    later) and says why; another client connects, and a closed socket frees its place. Without
    the bound, one client's 1,003 idle sockets (ulimit -n 1024) left `car serve` unable to answer
    anyone."""
    server = serve(engine, api_keys=KEYS, ws_max_sockets_per_client=2)

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def health(ws: ClientConnection) -> dict[str, object]:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "health"}))
        return json.loads(await ws.recv())

    try:
        first = await connect(server.ws_url, additional_headers=auth(KEYS[0]))
        second = await connect(server.ws_url, additional_headers=auth(KEYS[0]))
        third = await connect(server.ws_url, additional_headers=auth(KEYS[0]))
        with pytest.raises(ConnectionClosed):
            await health(third)
        assert third.close_code == 1013 and "ws_max_sockets_per_client" in (third.close_reason or "")
        async with connect(server.ws_url, additional_headers=auth(KEYS[1])) as other:
            assert "result" in await health(other)
        await first.close()
        await asyncio.sleep(0.1)  # the server notices the close
        async with connect(server.ws_url, additional_headers=auth(KEYS[0])) as again:
            assert "result" in await health(again)
        assert "result" in await health(second)
        await second.close()
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["http", "json-rpc"])
async def test_a_local_model_takes_turns_between_clients(
    server_engine: InferenceEngine, transport: str
) -> None:
    """One client's four generations queue behind its first on the local model; another client's
    one runs after that first, not fifth (backends.fair: turns by API key, else address; over
    HTTP the guard says who the client is, over JSON-RPC the socket's session)."""
    server = serve(server_engine, api_keys=KEYS, max_concurrency=16)
    finished: list[str] = []
    prompt = "Count from 1 to 300, separated by commas."

    async def chats(key: str, names: list[str]) -> None:
        sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)

        async def one(name: str) -> None:
            await sdk.chat.completions.create(
                model=SMOL, messages=[{"role": "user", "content": prompt}], max_tokens=96, temperature=0
            )
            finished.append(name)

        await asyncio.gather(*(one(name) for name in names))

    async def calls(key: str, names: list[str]) -> None:
        async with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            params = {"prompt": prompt, "model": SMOL, "params": {"max_tokens": 96, "temperature": 0}}
            for name in names:
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": name, "method": "infer", "params": params}))
            for _ in names:
                reply = json.loads(await ws.recv())
                assert "result" in reply, reply
                finished.append(reply["id"])

    send = chats if transport == "http" else calls
    try:
        await asyncio.to_thread(sdk(server).models.list)
        await send(KEYS[0], ["warm"])  # the model is loaded (by the client with the backlog)
        finished.clear()
        entry = server_engine.cache.get(f"gguf:{SMOL}")
        assert entry is not None
        first = asyncio.create_task(send(KEYS[0], [f"one-{i}" for i in range(4)]))
        while not entry.lock.locked():  # one of them holds the model
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)  # ... and the other three are queued for its thread
        await asyncio.wait_for(asyncio.gather(first, send(KEYS[1], ["two"])), 120)
    finally:
        server.stop()
    assert finished.index("two") <= 2, finished  # in arrival order it was last


def _stalled(port: int, key: str = KEYS[0]) -> socket.socket:
    """A client that sends its headers and 10 of the 200 body bytes it announced, then waits."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: 200\r\n\r\n".encode()
        + b'{"model": '
    )
    return sock


def _chunked(body: bytes, size: int = 65536) -> bytes:
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_body_sent_in_full_still_reads_its_413(server: ServerThread, framing: str) -> None:
    """Most clients send the whole body without waiting (no ``Expect: 100-continue``): the server
    reads and drops the rest of it before answering, since closing a connection with unread data
    resets it and the client saw the reset instead of the 413."""
    body = b"x" * 8_000_000
    length = f"Content-Length: {len(body)}" if framing == "content-length" else "Transfer-Encoding: chunked"
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        f"Content-Type: application/json\r\n{length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + (body if framing == "content-length" else _chunked(body)))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer


def test_a_client_waiting_for_100_continue_gets_its_413_without_sending(server: ServerThread) -> None:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        "Content-Type: application/json\r\nContent-Length: 8000000\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):  # the server answers and closes: no body was read
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer


def test_a_stalled_body_holds_no_slot_and_gets_a_408(engine: InferenceEngine) -> None:
    server = serve(engine, api_keys=KEYS, max_concurrency=1, body_timeout_s=1.5)
    stalled = [_stalled(server.port) for _ in range(4)]
    try:
        # With every stalled client holding a slot, this was a 429 (for as long as they stalled).
        started = time.monotonic()
        assert sdk(server).chat.completions.create(model="fake/echo", messages=HI).choices[0].message.content
        assert time.monotonic() - started < 1.0
        for sock in stalled:
            sock.settimeout(5)
            answer = b""
            while chunk := sock.recv(4096):  # until the server closes the connection
                answer += chunk
            head, _, body = answer.decode().partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 408"), answer
            assert "connection: close" in head.lower()
            error = json.loads(body[body.index("{") : body.rindex("}") + 1])["error"]  # one chunk
            assert error["code"] == "request_timeout" and "server.body_timeout_s" in error["message"]
        elapsed = time.monotonic() - started
        assert 1.4 < elapsed < 4
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


def _replica(home: Path, fake: FakeProviderServer, prefix: str, url: str | None = None) -> InferenceEngine:
    """An engine of one replica in a fleet bounded to 1 request in flight ([coordination])."""
    remote_home(home, fake, "echo")
    with (home / "config.toml").open("a") as config:
        config.write(
            f'[coordination]\nredis_url = "{url or redis_url()}"\nkey_prefix = "{prefix}"\n'
            "global_concurrency = 1\nlease_s = 1.0\ntimeout_ms = 200\n"
        )
    return InferenceEngine(home=home)


def test_the_fleets_concurrency_bound_holds_across_replicas(
    fake_provider: FakeProviderServer, tmp_path: Path
) -> None:
    prefix = redis_prefix()
    engines = [_replica(tmp_path / name, fake_provider, prefix) for name in ("a", "b")]
    a, b = (serve(e, max_concurrency=4) for e in engines)
    fake_provider.queue(Reply(text="slow answer", delay_s=1.0))
    first: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hold the fleet's one slot"}]
    results: list[str] = []
    slow = threading.Thread(
        target=lambda: results.append(
            sdk(a).chat.completions.create(model="fake/echo", messages=first).choices[0].message.content or ""
        )
    )
    try:
        slow.start()
        deadline = time.monotonic() + 5
        while not any(r.json and r.json.get("messages") == first for r in fake_provider.requests):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:  # B is idle, the fleet is not
            sdk(b).chat.completions.create(model="fake/echo", messages=HI)
        assert info.value.code == "server_busy" and "global_concurrency" in info.value.message
        assert httpx.get(b.url + "/health").status_code == 200
        metrics = httpx.get(b.url + "/metrics").text
        assert "car_coordination_reachable 1.0" in metrics and "car_fleet_concurrency_limit 1.0" in metrics
        assert "car_fleet_requests_in_flight 1.0" in metrics
        slow.join()
        assert results == ["slow answer"]
        time.sleep(0.2)  # A gives its slot back in a task of its own, after the answer
        reply = sdk(b).chat.completions.create(model="fake/echo", messages=HI)
        assert reply.choices[0].message.content
    finally:
        slow.join()
        for server in (a, b):
            server.stop()
        for engine in engines:
            engine.close()


def test_without_redis_each_replica_keeps_its_own_bound(
    fake_provider: FakeProviderServer, tmp_path: Path
) -> None:
    redis = RedisServer()
    redis.start()
    engine = _replica(tmp_path / "a", fake_provider, redis_prefix(), url=redis.url)
    server = serve(engine, max_concurrency=4)
    try:
        assert sdk(server).chat.completions.create(model="fake/echo", messages=HI).choices[0].message.content
        redis.stop()
        for _ in range(3):  # Redis is gone: requests keep succeeding (local bound only)
            assert sdk(server).chat.completions.create(model="fake/echo", messages=HI).choices
        health = httpx.get(server.url + "/v1/health").json()["coordination"]
        assert health["reachable"] is False and health["error"]
        assert "car_coordination_reachable 0.0" in httpx.get(server.url + "/metrics").text
        redis.start()
        deadline = time.monotonic() + 5
        while "car_coordination_reachable 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "coordination did not resume"
            time.sleep(0.05)
        assert sdk(server).chat.completions.create(model="fake/echo", messages=HI).choices
        # A connection pooled before the restart may fail once more (one more "unreachable" and
        # a retry a second later): what must hold is that the link comes back and stays.
        fleet = engine.fleet
        assert fleet is not None
        deadline = time.monotonic() + 5
        while not fleet.reachable:
            assert time.monotonic() < deadline, "coordination did not stay back"
            time.sleep(0.05)
    finally:
        server.stop()
        engine.close()
        redis.stop()


def test_json_rpc_calls_take_the_fleets_slots_too(fake_provider: FakeProviderServer, tmp_path: Path) -> None:
    """A JSON-RPC call over /ws on an idle replica is refused while the fleet's one slot is held
    elsewhere, and served once it is given back."""
    from websockets.sync.client import connect

    prefix = redis_prefix()
    engines = [_replica(tmp_path / name, fake_provider, prefix) for name in ("a", "b")]
    a, b = (serve(e, max_concurrency=4) for e in engines)
    fake_provider.queue(Reply(text="slow answer", delay_s=1.0))
    first: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "hold the fleet's one slot from JSON-RPC"}
    ]
    slow = threading.Thread(target=lambda: sdk(a).chat.completions.create(model="fake/echo", messages=first))
    call = {"jsonrpc": "2.0", "id": 1, "method": "infer", "params": {"model": "fake/echo", "prompt": "hi"}}
    try:
        slow.start()
        deadline = time.monotonic() + 5
        while not any(r.json and r.json.get("messages") == first for r in fake_provider.requests):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with connect(b.url.replace("http", "ws") + "/ws") as ws:
            ws.send(json.dumps(call))
            answer = json.loads(ws.recv())
            assert "error" in answer, answer
            error = answer["error"]
            assert "global_concurrency" in error["message"]
            slow.join()
            time.sleep(0.2)  # A gives its slot back in a task of its own
            ws.send(json.dumps(call))
            assert json.loads(ws.recv())["result"]["text"]
    finally:
        slow.join()
        for server in (a, b):
            server.stop()
        for engine in engines:
            engine.close()


def test_a_store_far_behind_sheds_requests_with_a_503(
    fake_provider: FakeProviderServer, tmp_path: Path
) -> None:
    """With server.max_pending_records records not yet written (each holds its request in
    memory), HTTP requests and JSON-RPC calls get 503 state_store_behind with Retry-After until the
    writer catches up; /health, /metrics and the health report still answer."""
    from websockets.sync.client import connect

    engine = InferenceEngine(home=remote_home(tmp_path / "home", fake_provider, "echo"))
    server = serve(engine, max_pending_records=3)
    stuck = threading.Event()
    # Writes that stall outside the store's own batch (SQLite's one connection would hold the
    # health report's read until the batch ends; a PostgreSQL store's reads take other connections).
    keeper = engine.bookkeeper = Bookkeeper()
    keeper.start_writer()
    try:
        keeper.submit(stuck.wait, 20)  # the store hangs: what follows waits behind it
        deadline = time.monotonic() + 5
        while keeper.pending:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert sdk(server, "x").chat.completions.create(model="fake/echo", messages=HI).choices
        for _ in range(2):
            keeper.submit(print, end="")
        assert keeper.pending == 3
        http = httpx.Client(base_url=server.url, timeout=10)
        refused = http.post("/v1/chat/completions", json={"model": "fake/echo", "messages": HI})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "state_store_behind" and "max_pending_records" in error["message"]
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        assert http.get("/v1/health").json()["state"]["pending"] == 3  # it says why
        assert http.get("/v1/models").status_code == 200  # a read writes no record: served
        params = {"model": "fake/echo", "prompt": "hi"}
        call = {"jsonrpc": "2.0", "id": 1, "method": "infer", "params": params}
        with connect(server.url.replace("http", "ws") + "/ws") as ws:
            ws.send(json.dumps(call))
            answer = json.loads(ws.recv())
            assert answer["error"]["code"] == -32017 and answer["error"]["data"]["retryable"] is True
            for read in ("health", "models.list"):  # as over HTTP, a call that writes no record
                ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": read}))
                assert "result" in json.loads(ws.recv()), read
            stuck.set()
            while keeper.pending:
                assert time.monotonic() < deadline + 10
                time.sleep(0.01)
            ws.send(json.dumps(call))
            assert json.loads(ws.recv())["result"]["text"]
        again = http.post("/v1/chat/completions", json={"model": "fake/echo", "messages": HI})
        assert again.status_code == 200
    finally:
        stuck.set()
        server.stop()
        engine.close()
