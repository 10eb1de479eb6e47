"""A small HTTP server on loopback whose GET and POST answers come from a function: for the odd
server a test needs (one that redirects, answers half its API, answers late, or answers a body no
real provider should) beside the full fakes. A POST's body is read and not looked at."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["Answer", "Answering", "answering"]

# (status, headers, body) for a request's path.
Answer = Callable[[str], tuple[int, dict[str, str], bytes]]


@dataclass
class Answering:
    port: int
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, headers) in order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def answering(answer: Answer, port: int = 0) -> Iterator[Answering]:
    """Serve ``answer`` on 127.0.0.1 (``port`` 0: a free one) until the block ends."""
    state = Answering(port)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append((self.path, dict(self.headers)))
            status, headers, body = answer(self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    state.port = int(server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
