"""A deadline on every use of a PostgreSQL connection by the state store.

A database that stops answering without closing its connections (its process stopped or stuck
in I/O on a host whose kernel still acknowledges the bytes) is noticed neither by libpq's
keepalives nor by ``tcp_user_timeout``: the kernel answers both. A statement then waits for ever,
and with it the thread that sent it: the records' writer, or a request reading spend. The
``Watchdog`` ends a connection held past its deadline by shutting its socket down: the blocked
wait returns at once with the connection lost, the store counts the database as unreachable and
keeps writes in memory, as for any outage (``store_buffer``), and the pool replaces the connection.

The shutdown happens under the lock that releasing a connection takes, so a connection is only
ever cut while the use that overran still holds it, never after the pool has handed it on.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg

__all__ = ["Watchdog"]

log = logging.getLogger("car_inference.state")


class Watchdog:
    """Cuts any connection used through ``watch`` for longer than ``limit_s`` seconds. One
    daemon thread, started at the first use, looks ``limit_s / 4`` apart (at most 1 s)."""

    def __init__(self, limit_s: float, location: str) -> None:
        self.limit_s = limit_s
        self.location = location
        self.cuts = 0
        self._lock = threading.Lock()
        self._held: dict[int, tuple[float, psycopg.Connection[Any]]] = {}
        self._tokens = itertools.count()
        self._cut: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """Hold ``conn`` for the block; past the deadline it is cut, and the error the block
        then raises says so (an ``OperationalError`` without SQLSTATE: unreachable)."""
        token = next(self._tokens)
        with self._lock:
            self._held[token] = (time.monotonic() + self.limit_s, conn)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="car-state-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        except psycopg.Error as exc:
            if conn not in self._cut:
                raise
            message = f"no answer within {self.limit_s:g} s ([state] answer_timeout_s)"
            raise psycopg.OperationalError(message) from exc
        finally:
            with self._lock:
                self._held.pop(token, None)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        tick = min(1.0, self.limit_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                for token, (due, conn) in list(self._held.items()):
                    if due <= now:
                        del self._held[token]
                        self._end(conn)

    def _end(self, conn: psycopg.Connection[Any]) -> None:
        """Shut the connection's socket down (a duplicate descriptor: libpq still owns and
        closes its own)."""
        with suppress(psycopg.Error, OSError):
            fd = conn.pgconn.socket
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            self._cut.add(conn)
            self.cuts += 1
            log.warning(
                "PostgreSQL state store %s did not answer within %g s: its connection was closed"
                " ([state] answer_timeout_s)",
                self.location, self.limit_s,
            )  # fmt: skip
