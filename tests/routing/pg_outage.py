"""What the PostgreSQL outage tests share (test_store_buffer.py, test_store_pg_watch.py): the
real server reached through a TCP proxy a test cuts or freezes, a wait for a condition, and the
traces that reached the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg

from fakes.tcp_proxy import TcpProxy


@contextmanager
def proxy_in_front_of(url: str) -> Iterator[TcpProxy]:
    target = urlsplit(url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    try:
        yield proxy
    finally:
        proxy.close()


def wait_until(predicate: Callable[[], object], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def trace_ids(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT trace_id FROM traces ORDER BY completed_at, trace_id")]
