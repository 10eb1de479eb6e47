"""A PostgreSQL that hangs without closing its connections: every use of one is cut at
``answer_timeout_s`` and the database counted as unreachable, as for an outage.

The real PostgreSQL on 127.0.0.1:5432 is reached through a TCP proxy the test freezes
(``fakes.tcp_proxy``): it holds every byte with the connections left open, which is what a
stopped server process looks like from a client whose kernel still gets its TCP acknowledgements.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.errors import StateUnavailable
from car_inference.routing.store import TraceRow
from car_inference.routing.store_pg import PgOutcomeStore
from fakes.services import postgres_schema_url
from fakes.tcp_proxy import TcpProxy

from .pg_outage import proxy_in_front_of, trace_ids, wait_until


def _row(trace_id: str) -> TraceRow:
    return TraceRow(trace_id, "p/m", "generate", "code", None, "test", None, 1.0)


@pytest.fixture
def url() -> str:
    return postgres_schema_url()


@pytest.fixture
def proxy(url: str) -> Iterator[TcpProxy]:
    with proxy_in_front_of(url) as p:
        yield p


_wait, _traces = wait_until, trace_ids


def test_a_batch_the_database_stops_answering_is_buffered_not_held_for_ever(
    url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The records' writer thread sent a batch to a database that then hung: it waited for as
    long as the database did (the kernel acknowledged every byte, so neither keepalives nor
    ``tcp_user_timeout`` ended it), and every later record queued behind it. The connection is
    now cut at the deadline, the batch's writes wait in memory and reach the database later."""
    store = PgOutcomeStore(
        proxy.through(url), buffer_limit=100, retry_s=0.2, connect_timeout_s=1, answer_timeout_s=1
    )
    caplog.set_level(logging.WARNING, logger="car_inference.state")
    try:
        store.record_trace(_row("a"), success=True, now=1.0)
        proxy.freeze()

        def write() -> None:
            with store.batch():
                store.record_trace(_row("b"), success=True, now=2.0)

        writer = threading.Thread(target=write, daemon=True)
        started = time.monotonic()
        writer.start()
        writer.join(8.0)
        assert not writer.is_alive(), "the batch waited on the hung database past its deadline"
        assert time.monotonic() - started < 5.0
        assert store.down_since is not None and store.buffered == 1
        assert "did not answer within 1 s" in caplog.text
        proxy.thaw()
        assert _wait(lambda: store.buffered == 0)
    finally:
        proxy.thaw()
        store.close()
    assert _traces(url) == ["a", "b"]


def test_a_read_the_database_does_not_answer_fails_within_the_deadline(url: str, proxy: TcpProxy) -> None:
    """A read on a request's path (a trace, the profiles) gets a 503-shaped error, not a wait."""
    store = PgOutcomeStore(
        proxy.through(url), buffer_limit=100, retry_s=0.2, connect_timeout_s=1, answer_timeout_s=1
    )
    try:
        store.record_trace(_row("a"), success=True, now=1.0)
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="unreachable"):
            store.profiles()
        assert time.monotonic() - started < 5.0
        proxy.thaw()
        assert _wait(lambda: _profiles_or_none(store) is not None)
    finally:
        proxy.thaw()
        store.close()


def _profiles_or_none(store: PgOutcomeStore) -> object:
    try:
        return store.profiles()
    except StateUnavailable:
        return None


def test_a_slow_answer_within_the_deadline_is_not_cut(url: str) -> None:
    """The deadline is on the database's silence, not on normal work: a statement that takes
    most of it (pg_sleep) still answers, and nothing is counted as an outage."""
    store = PgOutcomeStore(url, answer_timeout_s=2)
    try:
        with store._connection() as conn:
            row = conn.execute("SELECT pg_sleep(1.2), 7 AS n").fetchone()
            assert row is not None and row["n"] == 7
        assert store.down_since is None and store._watch.cuts == 0
    finally:
        store.close()


def test_the_deadline_is_the_state_sections_answer_timeout(url: str, tmp_path: Path) -> None:
    from car_inference.config import StateSettings
    from car_inference.engine import InferenceEngine

    (tmp_path / "config.toml").write_text(f'[state]\nurl = "{url}"\nanswer_timeout_s = 7.5\n')
    engine = InferenceEngine(home=tmp_path)
    try:
        assert isinstance(engine.store, PgOutcomeStore) and engine.store._watch.limit_s == 7.5
    finally:
        engine.close()
    with pytest.raises(ValueError, match="answer_timeout_s"):
        StateSettings(answer_timeout_s=0)
