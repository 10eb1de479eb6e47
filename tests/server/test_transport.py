"""One socket write per loop turn: the coalescing transport under uvicorn's protocol."""

from __future__ import annotations

import asyncio
import socket

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

    protocol = coalescing_protocol()
    assert protocol is not None and uvicorn_config(object(), ServerSettings()).http is protocol
    engine = InferenceEngine()
    with ServerThread(create_app(engine)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
    engine.close()
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b'{"status":"ok"}')
