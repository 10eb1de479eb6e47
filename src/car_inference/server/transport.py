"""One write per response: uvicorn's HTTP protocol with writes gathered per event-loop turn.

uvicorn writes a response's status line and headers in one socket write and its body in another.
On loopback each write wakes the client, which reads the headers, then blocks again for the
body: two wake-ups and two system calls where one would do (about 0.25 ms each on a 2-core
machine, measured by benchmarks/server.py). ``CoalescingHttpTools`` gives the protocol a transport
that gathers every write made in one turn of the event loop and sends them together at the end of
that turn: a plain response goes out in one write, and a stream's chunks leave as soon as the
code producing them yields to the loop, so nothing waits longer than the turn it was made in.

The same protocol bounds how long a request's headers may take (``server.header_timeout_s``):
uvicorn has no such bound, and a client that sends its headers a byte at a time (or opens a
connection and sends part of them) held its connection, and a file descriptor, for ever; tens of
thousands of them exhausted the server's descriptors. The clock starts when the connection opens
and again when a response ends (a kept-alive connection idles for uvicorn's 5 s keep-alive first);
headers not complete when it runs out get a 408 and the connection is closed. Bodies have their
own bound (``server.body_timeout_s``, in the guard). Bytes that are no HTTP request get a 400 in
the API's error shape (uvicorn's own was plain text), each with an ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
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


def headers_too_slow() -> bytes:
    """The 408 for headers that took too long: in the API's error shape (it was plain text)."""
    message = "request headers not complete within server.header_timeout_s"
    return _canned(b"408 Request Timeout", message, "timeout_error", "header_timeout")


def not_http(message: str) -> bytes:
    """The 400 for bytes that are no HTTP request (a garbage request line, TLS to a plain port):
    uvicorn's own answer was plain text without a request id."""
    return _canned(b"400 Bad Request", message, "invalid_request_error", "invalid_http")


def _canned(status: bytes, message: str, kind: str, code: str) -> bytes:
    """A response written before any request reached the app, closing the connection; with an
    ``x-request-id`` as every other response has (the README promises one on each)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return b"HTTP/1.1 %b\r\ncontent-type: application/json\r\nx-request-id: %b\r\n" % (
        status,
        uuid.uuid4().hex.encode(),
    ) + b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body)


@cache
def coalescing_protocol(header_timeout_s: float) -> type | None:
    """uvicorn's httptools protocol over a ``CoalescingTransport``, closing connections whose
    request headers take over ``header_timeout_s``; None when httptools is not installed (uvicorn
    then picks its default protocol)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class CoalescingHttpTools(HttpToolsProtocol):
        _headers_due: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            # It stands in for the transport it wraps (every other attribute is delegated).
            super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport, self.loop)))
            self._await_headers()

        def _await_headers(self) -> None:
            self._headers_arrived()
            self._headers_due = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_arrived(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None

        def _headers_too_slow(self) -> None:
            self._headers_due = None
            if not self.transport.is_closing():
                self.transport.write(headers_too_slow())
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(not_http(msg))
            self.transport.close()

        def on_headers_complete(self) -> None:
            self._headers_arrived()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            waiting = not self.pipeline  # a pipelined request's headers have arrived already
            super().on_response_complete()
            if waiting and not self.transport.is_closing():
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_arrived()
            super().connection_lost(exc)

    return CoalescingHttpTools
