"""One write per response: uvicorn's HTTP protocol with writes gathered per event-loop turn.

uvicorn writes a response's status line and headers in one socket write and its body in another.
On loopback each write wakes the client, which reads the headers, then blocks again for the
body: two wake-ups and two system calls where one would do (about 0.25 ms each on a 2-core
machine, measured by benchmarks/server.py). ``CoalescingHttpTools`` gives the protocol a transport
that gathers every write made in one turn of the event loop and sends them together at the end of
that turn: a plain response goes out in one write, and a stream's chunks leave as soon as the
code producing them yields to the loop, so nothing waits longer than the turn it was made in.
"""

from __future__ import annotations

import asyncio
from functools import cache
from typing import Any, cast

__all__ = ["CoalescingTransport", "coalescing_protocol"]


class CoalescingTransport:
    """Wraps an ``asyncio.Transport``: ``write`` gathers, the loop's next turn sends."""

    __slots__ = ("_buffer", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._buffer:
            self._loop.call_soon(self.flush)
        self._buffer.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._buffer))

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


@cache
def coalescing_protocol() -> type | None:
    """uvicorn's httptools protocol over a ``CoalescingTransport``; None when httptools is not
    installed (uvicorn then picks its default protocol)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class CoalescingHttpTools(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            # It stands in for the transport it wraps (every other attribute is delegated).
            super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport, self.loop)))

    return CoalescingHttpTools
