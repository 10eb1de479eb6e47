"""One socket write per loop turn: the coalescing transport under uvicorn's protocol."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

from car_inference.server.transport import CoalescingTransport, coalescing_protocol


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_writes_of_one_turn_leave_together() -> None:
    raw = Recorder()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"")
    transport.writelines([b"hello ", b"world"])
    assert raw.writes == [] and transport.get_write_buffer_size() == 30
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nhello world"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"next"
    assert transport.get_extra_info("peername") == "info:peername"  # the rest is the real transport's


async def test_close_sends_what_is_gathered_and_abort_drops_it() -> None:
    raw = Recorder()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.close()
    assert raw.writes == [b"last words"] and raw.closed
    await asyncio.sleep(0)
    assert raw.writes == [b"last words"], "a closed transport gets nothing more"
    dropped = Recorder()
    transport = CoalescingTransport(dropped, asyncio.get_running_loop())
    transport.write(b"never")
    transport.abort()
    await asyncio.sleep(0)
    assert dropped.writes == [] and dropped.aborted


def test_the_server_runs_on_it_and_answers_whole() -> None:
    from car_inference.config import ServerSettings
    from car_inference.engine import InferenceEngine
    from car_inference.server import create_app
    from car_inference.server.run import ServerThread, uvicorn_config

    protocol = coalescing_protocol(ServerSettings().header_timeout_s)
    assert protocol is not None and uvicorn_config(object(), ServerSettings()).http is protocol
    engine = InferenceEngine()
    with ServerThread(create_app(engine)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
    engine.close()
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b'{"status":"ok"}')


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_headers_that_take_too_long_get_408_and_the_connection_closes() -> None:
    """A connection that sends no headers, or sends them a byte at a time, or starts a second
    request and stalls, is answered 408 and closed once ``header_timeout_s`` has passed; a
    request whose headers arrived in time keeps its connection for a slow body (the guard's
    ``body_timeout_s``) and a WebSocket for as long as it is open."""
    from car_inference.config import ServerSettings
    from car_inference.engine import InferenceEngine
    from car_inference.server import create_app
    from car_inference.server.run import ServerThread

    engine = InferenceEngine()
    settings = ServerSettings(header_timeout_s=0.3)
    try:
        with ServerThread(create_app(engine, settings)) as server:
            address = ("127.0.0.1", server.port)
            with socket.create_connection(address, timeout=10) as silent:
                answer = _read_all(silent)
            assert answer.startswith(b"HTTP/1.1 408") and b"server.header_timeout_s" in answer
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])  # the API's error shape (was plain text)
            assert body["error"]["code"] == "header_timeout" and b"application/json" in answer
            assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", answer), answer  # as every response

            for garbage in (b"HELLO\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):  # TLS to HTTP
                with socket.create_connection(address, timeout=10) as confused:
                    confused.sendall(garbage)
                    answer = _read_all(confused)
                assert answer.startswith(b"HTTP/1.1 400") and b"x-request-id: " in answer, answer
                error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]  # was plain text
                assert error["code"] == "invalid_http" and error["message"], error

            with socket.create_connection(address, timeout=10) as trickle:
                trickle.sendall(b"GET /health HTTP/1.1\r\nHo")
                time.sleep(0.15)
                trickle.sendall(b"st")  # data arriving does not restart the clock
                answer = _read_all(trickle)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]

            with socket.create_connection(address, timeout=10) as kept:
                kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert kept.recv(65536).startswith(b"HTTP/1.1 200")
                kept.sendall(b"GET /health HTTP/1.1\r\n")  # ... and the rest never comes
                assert _read_all(kept).startswith(b"HTTP/1.1 408")

            body = b'{"model": "smollm2", "messages": []}'
            with socket.create_connection(address, timeout=10) as slow_body:
                slow_body.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                )
                time.sleep(0.6)  # twice the header timeout: the body has its own bound
                slow_body.sendall(body)
                answer = _read_all(slow_body)
            assert answer.startswith(b"HTTP/1.1 4") and not answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"non-empty list" in answer  # the body was read and judged

            async def websocket_outlives_it() -> dict[str, object]:
                from websockets.asyncio.client import connect

                async with connect(server.ws_url) as ws:
                    await asyncio.sleep(0.6)
                    await ws.send('{"jsonrpc": "2.0", "id": 1, "method": "health"}')
                    return json.loads(await ws.recv())

            assert asyncio.run(websocket_outlives_it())["id"] == 1
    finally:
        engine.close()
