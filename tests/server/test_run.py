"""The bind check and the background server thread."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect

from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.server import (
    BindRefused,
    PortInUse,
    ServerThread,
    bind,
    check_bind,
    create_app,
    is_loopback,
)
from car_inference.server.run import serve, uvicorn_config


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com", ""):
        assert not is_loopback(host), host


def test_non_loopback_needs_keys() -> None:
    check_bind("127.0.0.1", [])
    check_bind("0.0.0.0", ["k"])
    for keys in ([], ["  "]):
        with pytest.raises(BindRefused) as info:
            check_bind("0.0.0.0", keys)
        message = str(info.value)
        assert "\n" not in message and "CAR_SERVER_API_KEYS" in message and "api_keys" in message


def test_uvicorn_config_follows_the_settings() -> None:
    settings = ServerSettings(host="127.0.0.1", port=9999, max_body_mb=2)
    config = uvicorn_config(object(), settings)
    assert (config.host, config.port) == ("127.0.0.1", 9999)
    assert config.ws_max_size == int(settings.ws_max_message_mb * 1024 * 1024) == 4 * 1024 * 1024


def test_server_thread_serves_and_stops(isolated_home: object) -> None:
    server = ServerThread(create_app()).start()
    url = server.url
    assert httpx.get(url + "/health").status_code == 200
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as info:
            bind("127.0.0.1", port)
    assert (
        str(info.value)
        == f"cannot listen on 127.0.0.1:{port}: the port is in use (choose another with --port)"
    )
    sock = bind("127.0.0.1", 0)
    assert sock.getsockname()[1] > 0
    sock.close()
    with pytest.raises(PortInUse) as info:  # an address not ours: no advice about the port
        bind("192.0.2.1", 0)
    assert "cannot listen on 192.0.2.1:0" in str(info.value) and "--port" not in str(info.value)


def test_stopping_answers_what_is_in_flight(server_engine: InferenceEngine) -> None:
    """A stream ends with an error event and [DONE], a waiting request gets a 503, and the server
    is down within a moment (it waited 5 s, then cut the stream with neither)."""
    server = ServerThread(create_app(server_engine)).start()
    long: dict[str, object] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a long story."}],
    }
    long["max_tokens"] = 2000
    plain: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: plain.append(httpx.post(server.url + "/v1/chat/completions", json=long, timeout=30))
    )
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=long | {"stream": True}, timeout=30
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        waiting.start()
        time.sleep(0.3)
        started = time.monotonic()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        rest = [line for line in lines if line]
    stopper.join()
    waiting.join()
    assert time.monotonic() - started < 2
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutdown" and "shutting down" in error["message"]
    assert plain[0].status_code == 503 and plain[0].headers["retry-after"] == "1"
    assert plain[0].json()["error"]["code"] == "server_shutdown"


async def test_stopping_answers_json_rpc_calls_in_flight(server_engine: InferenceEngine) -> None:
    server = ServerThread(create_app(server_engine)).start()
    params = {"prompt": "Write a long story.", "model": "smollm2", "params": {"max_tokens": 2000}}
    stopper = threading.Thread(target=server.stop)
    async with connect(server.ws_url) as ws:
        await ws.send(
            json.dumps({"jsonrpc": "2.0", "id": "long", "method": "infer.stream", "params": params})
        )
        while json.loads(await ws.recv())["params"]["event"]["type"] != "text_delta":
            pass
        stopper.start()
        while "id" not in (reply := json.loads(await ws.recv())):
            pass
    stopper.join()
    assert reply["id"] == "long" and reply["error"]["code"] == -32016
    assert reply["error"]["data"]["code"] == "server_shutdown" and reply["error"]["data"]["retryable"] is True


def test_a_stop_requested_before_start_ends_the_server_once_started() -> None:
    """``stop_requested``: a Ctrl-C that came before uvicorn's own handlers were in place (car
    serve remembers it) stops the server as soon as it has started, gracefully."""
    asked: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    def stop_requested() -> bool:
        asked.append(True)
        return True

    started = time.monotonic()
    serve(app, ServerSettings(port=0), log_level="warning", stop_requested=stop_requested)
    assert asked and time.monotonic() - started < 10
