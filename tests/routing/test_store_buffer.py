"""PostgreSQL unreachable -> writes buffered in memory up to a bound, written when it returns.

The real PostgreSQL on 127.0.0.1:5432 is reached through a TCP proxy the test cuts and restores
(``fakes.tcp_proxy``): cutting it drops the store's live connections and refuses new ones, as a
stopped server or a network partition does, in milliseconds, while the shared server and the
other tests' databases stay up. (A second ``postgres`` started from the Debian binaries would do
the same at the cost of an ``initdb`` per run and binaries CI may not have.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.config import CarConfig, SpendSettings, StateSettings
from car_inference.errors import StateUnavailable
from car_inference.routing.spend import SpendControl
from car_inference.routing.store import TraceRow
from car_inference.routing.store_api import open_store, state_health
from car_inference.routing.store_pg import PgOutcomeStore
from fakes.services import postgres_schema_url
from fakes.tcp_proxy import TcpProxy

from .pg_outage import proxy_in_front_of, trace_ids, wait_until


def _row(trace_id: str, model: str = "p/m") -> TraceRow:
    return TraceRow(trace_id, model, "generate", "code", None, "test", None, 1.0)


@pytest.fixture
def url() -> str:
    return postgres_schema_url()


@pytest.fixture
def proxy(url: str) -> Iterator[TcpProxy]:
    with proxy_in_front_of(url) as p:
        yield p


_wait, _traces = wait_until, trace_ids


def test_writes_wait_in_memory_up_to_the_bound_and_reach_the_database_when_it_returns(
    url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="car_inference.state")
    store = PgOutcomeStore(proxy.through(url), buffer_limit=5, retry_s=0.2, connect_timeout_s=1)
    try:
        store.record_trace(_row("t0"), success=True, latency_ms=5.0, now=100.0)
        proxy.stop()
        started = time.monotonic()
        results = [
            store.record_trace(_row(f"t{i}"), success=i % 2 == 1, latency_ms=5.0, now=100.0 + i)
            for i in range(1, 8)
        ]
        store.add_spend("acme", "p/m", 0.5, ts=200.0)  # beyond the bound too: dropped
        assert time.monotonic() - started < 10  # the first write notices; the others do not wait
        assert results[0] == (None, 1.0) and results[1] == (None, 0.0)  # what it knew without the database
        assert (store.buffered, store.dropped) == (5, 3)
        with pytest.raises(StateUnavailable, match="unreachable") as refused:
            store.profiles()  # reads fail at once, saying when to try again
        assert refused.value.retry_after == 0.2
        health = state_health(store, url)
        assert (health.buffered, health.dropped) == (5, 3) and health.error is not None
        assert "records are kept in memory" in caplog.text and "dropped" in caplog.text
        proxy.start()
        assert _wait(lambda: store.buffered == 0)  # the retry timer writes them, unasked
        assert store.profiles()[0]["total_calls"] == 6
        health = state_health(store, url)
        assert (health.buffered, health.dropped, health.error) == (0, 3, None)
        assert "reachable again" in caplog.text and "5 buffered records written, 3 dropped" in caplog.text
    finally:
        store.close()
    assert _traces(url) == [f"t{i}" for i in range(6)]  # in order; t6, t7 and the spend were lost


def test_reads_work_again_within_a_retry_of_the_database_returning(url: str, proxy: TcpProxy) -> None:
    """The pool's own reconnect backs off (1, 2, 4 ... s): after a 36 s outage a replica answered
    503 for 19 s more, after 138 s for 110 s. Once the store's retry connects, it reads and writes
    through a new pool at once."""
    store = PgOutcomeStore(proxy.through(url), buffer_limit=100, retry_s=0.2, connect_timeout_s=1)
    try:
        store.record_trace(_row("before"), success=True, now=1.0)
        proxy.stop()
        store.record_trace(_row("during"), success=True, now=2.0)
        assert store.buffered == 1
        time.sleep(8)  # the pool's reconnect attempts back off meanwhile: its next one is ~8 s away
        proxy.start()
        returned = time.monotonic()
        assert _wait(lambda: store.buffered == 0, timeout_s=4.0), "the buffer waited for the pool"
        assert store.trace("during") is not None  # a read through the pool, at once
        assert time.monotonic() - returned < 4.0
    finally:
        store.close()
    assert _traces(url) == ["before", "during"]


def test_the_health_read_is_given_up_on_when_the_database_hangs(url: str, proxy: TcpProxy) -> None:
    """A database that stops answering without closing the connection held /v1/health for the
    whole 36 s it was frozen, later reports queued behind; the report now says so within its
    bound, a second one at once, and the next one after the database answers is whole again."""
    store = PgOutcomeStore(proxy.through(url), buffer_limit=100, retry_s=0.2, connect_timeout_s=1)
    try:
        assert state_health(store, url).error is None
        proxy.freeze()
        started = time.monotonic()
        health = state_health(store, url, timeout_s=1.0)
        assert health.error is not None and "no answer within 1 s" in health.error
        again = state_health(store, url, timeout_s=1.0)
        assert again.error is not None and "no answer to the read sent" in again.error
        assert time.monotonic() - started < 3.0
        proxy.thaw()
        assert _wait(lambda: state_health(store, url).error is None, timeout_s=5.0)
    finally:
        proxy.thaw()
        store.close()


def test_a_spend_read_the_database_does_not_answer_holds_no_paid_request(url: str, proxy: TcpProxy) -> None:
    """The health report read the spend totals under the spend lock: with the database hung,
    every paid request (``reserve``, on the server's event loop) waited on that lock as long, and
    the whole replica stopped answering. The store is read before the lock is taken."""
    store = PgOutcomeStore(proxy.through(url), buffer_limit=100, retry_s=0.2, connect_timeout_s=1)
    spend = SpendControl(SpendSettings(daily_usd=5.0), store)
    reader = threading.Thread(target=spend.status, daemon=True)
    try:
        proxy.freeze()
        reader.start()
        time.sleep(0.5)  # the status read is out, waiting on the database
        assert reader.is_alive()
        taken: list[object] = []
        request = threading.Thread(target=lambda: taken.append(spend.reserve("openai", 0.01)), daemon=True)
        request.start()
        request.join(2.0)
        assert taken and taken[0] is not None, "a paid request waited on the hung database's read"
    finally:
        proxy.thaw()
        reader.join(15)
        store.close()


def test_v1_health_answers_within_its_bound_while_the_database_hangs(
    url: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    """With spend limits set, /v1/health read the spend totals after the bounded schema read gave
    up, and waited on the hung database without bound (6.5 minutes in one run)."""
    import httpx

    from car_inference.engine import InferenceEngine
    from car_inference.server import ServerThread, create_app

    config = f'[state]\nurl = "{proxy.through(url)}"\n[spend]\ndaily_usd = 5.0\n'
    (tmp_path / "config.toml").write_text(config)
    engine = InferenceEngine(home=tmp_path)
    try:
        with ServerThread(create_app(engine)) as server:
            assert httpx.get(f"{server.url}/v1/health", timeout=30).json()["spend"] is not None
            proxy.freeze()
            started = time.monotonic()
            report = httpx.get(f"{server.url}/v1/health", timeout=30).json()
            assert time.monotonic() - started < 8.0
            assert report["spend"] is None and "no answer within" in report["state"]["error"]
            proxy.thaw()
    finally:
        proxy.thaw()
        engine.close()


def test_a_batch_cut_before_its_commit_is_written_in_order_later(url: str, proxy: TcpProxy) -> None:
    store = PgOutcomeStore(proxy.through(url), buffer_limit=100, retry_s=0.2, connect_timeout_s=1)
    try:
        with store.batch():
            store.record_trace(_row("a"), success=True, now=1.0)
            store.adjust_quality("a", "explicit", 0.25, explicit=True, now=2.0)  # went through, uncommitted
            proxy.stop()
            store.record_trace(_row("b"), success=True, now=3.0)  # the connection is gone: buffered
            store.add_spend("acme", "p/m", 1.0, ts=4.0)
        assert store.buffered == 4  # the batch's own writes went back in front
        proxy.start()
        assert _wait(lambda: store.buffered == 0)
        (profile,) = store.profiles()
        assert profile["total_calls"] == 2 and profile["quality_sum"] == pytest.approx(1.25)
        assert store.spend_by_provider(0.0) == {"acme": 1.0}
        assert [f["kind"] for f in store.feedback_for("a")] == ["explicit"]
    finally:
        store.close()
    assert _traces(url) == ["a", "b"]


def test_the_bookkeepers_batches_survive_an_outage(url: str, proxy: TcpProxy) -> None:
    """`car serve`'s writer thread: records keep being queued through the outage, none is lost."""
    from car_inference.engine.bookkeeping import Bookkeeper

    store = PgOutcomeStore(proxy.through(url), buffer_limit=1000, retry_s=0.2, connect_timeout_s=1)
    keeper = Bookkeeper(store.batch, delay_s=0.005)
    keeper.start_writer()
    try:
        for i in range(60):
            if i == 20:
                proxy.stop()
            if i == 40:
                proxy.start()
            keeper.submit(store.record_trace, _row(f"k{i:02d}"), success=True, latency_ms=1.0, now=float(i))
            time.sleep(0.01)
        keeper.flush()
        assert _wait(lambda: store.buffered == 0)
        assert store.dropped == 0 and store.profiles()[0]["total_calls"] == 60
    finally:
        keeper.close()
        store.close()
    assert _traces(url) == [f"k{i:02d}" for i in range(60)]


def test_the_bound_is_the_state_sections_buffer_records(url: str, tmp_path: Path) -> None:
    config = CarConfig(home=tmp_path, state=StateSettings(url=url, buffer_records=3))
    store = open_store(config.state.url, config.paths.state_db, buffer_records=config.state.buffer_records)
    with contextlib.closing(store):
        assert isinstance(store, PgOutcomeStore) and store.buffer_limit == 3
    assert CarConfig(home=tmp_path).state.buffer_records == 10_000
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        CarConfig.model_validate({"home": tmp_path, "state": {"buffer_records": -1}})


def test_v1_health_shows_what_waits_and_what_was_lost(url: str, proxy: TcpProxy, tmp_path: Path) -> None:
    """Through the real server: /v1/health's state section counts the buffered and dropped records."""
    import httpx

    from car_inference.engine import InferenceEngine
    from car_inference.server import ServerThread, create_app

    (tmp_path / "config.toml").write_text(f'[state]\nurl = "{proxy.through(url)}"\nbuffer_records = 3\n')
    engine = InferenceEngine(home=tmp_path)
    try:
        with ServerThread(create_app(engine)) as server:
            proxy.stop()
            for i in range(4):  # the fourth is beyond [state] buffer_records
                engine.store.add_spend("acme", "p/m", 0.1, ts=float(i))
            # spend totals still answer (the last ones read plus the buffered spend): limits hold
            assert engine.store.spend_by_provider(0.0) == {"acme": pytest.approx(0.3)}
            assert engine.store.spend_by_provider(0.0, 1.5) == {"acme": pytest.approx(0.2)}
            state = httpx.get(f"{server.url}/v1/health", timeout=30).json()["state"]
            assert state["backend"] == "postgresql" and state["buffered"] == 3 and state["dropped"] == 1
            assert "unreachable" in state["error"]
            metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
            assert "car_state_buffered_records 3.0" in metrics and "car_state_dropped_records 1.0" in metrics
            proxy.start()
            assert _wait(lambda: getattr(engine.store, "buffered", None) == 0)
            state = httpx.get(f"{server.url}/v1/health", timeout=30).json()["state"]
            assert state["buffered"] == 0 and state["dropped"] == 1
            assert state["error"] is None and state["round_trip_ms"] > 0
            assert engine.store.spend_by_provider(0.0) == {"acme": pytest.approx(0.3)}
    finally:
        engine.close()


def test_feedback_while_the_store_is_away_is_a_503_saying_so_and_works_once_it_returns(
    url: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Feedback reads the answer's trace: with PostgreSQL away that is a 503 `state_unavailable`
    with Retry-After (it was a 500 with a traceback in the log), and the same call succeeds once
    the store is back."""
    import httpx

    from car_inference.engine import InferenceEngine
    from car_inference.server import ServerThread, create_app

    (tmp_path / "config.toml").write_text(f'[state]\nurl = "{proxy.through(url)}"\n')
    engine = InferenceEngine(home=tmp_path)
    try:
        with (
            ServerThread(create_app(engine)) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            routed = http.post("/v1/route", json={"messages": [{"role": "user", "content": "Say hi."}]})
            trace_id = routed.json()["trace_id"]
            proxy.stop()
            refused = http.post("/v1/feedback", json={"trace_id": trace_id, "score": 0.5})
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "state_unavailable" and "unreachable" in error["message"]
            assert int(refused.headers["retry-after"]) >= 1
            proxy.start()
            deadline = time.monotonic() + 20
            while (
                answer := http.post("/v1/feedback", json={"trace_id": trace_id, "score": 0.5})
            ).status_code == 503:
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.2)
            assert answer.status_code == 200 and answer.json()["recorded"] is True
            # A trace not in the shared store after the wait may be another replica's, held in
            # its memory while its database is away: the 404 says so (it said only "no such trace").
            unknown = http.post("/v1/feedback", json={"trace_id": "f" * 32, "score": 0.5})
            assert unknown.status_code == 404 and "another replica answered it" in unknown.text
        trace = engine.store.trace(trace_id)
        assert trace is not None and trace["quality"] == 0.5
    finally:
        engine.close()


def test_a_read_in_a_batch_that_could_not_connect_fails_over_to_memory_at_once(
    url: str, proxy: TcpProxy
) -> None:
    """The writer thread's batch whose connection could not be opened: its spend re-read (every
    second, with spend limits set) went to the pool and waited out its timeout, 5 s, while
    holding the lock each request's spend check takes. It answers from memory at once now."""
    store = PgOutcomeStore(proxy.through(url), buffer_limit=100, retry_s=30, connect_timeout_s=3)
    try:
        store.add_spend("acme", "p/m", 0.5, ts=100.0)
        assert store.spend_by_provider(0.0) == {"acme": 0.5}
        proxy.stop()
        with store.batch():  # waits out the pool once: the outage is noticed here
            store.add_spend("acme", "p/m", 0.25, ts=101.0)  # buffered
            started = time.monotonic()
            totals = store.spend_by_provider(0.0)
            waited = time.monotonic() - started
        assert totals == {"acme": 0.75} and waited < 1.0
    finally:
        proxy.start()
        store.close()


def test_a_spend_check_never_waits_for_a_database_that_went_away(url: str, proxy: TcpProxy) -> None:
    """`car serve` with spend limits through a PostgreSQL outage: the writer thread's spend
    re-read (once a second) waited out the pool's timeout under the spend lock, and every paid
    request's limit check (`reserve`) and /health stalled 5 s at a time."""
    store = PgOutcomeStore(proxy.through(url), buffer_limit=100, retry_s=30, connect_timeout_s=3)
    offset = [0.0]
    spend = SpendControl(SpendSettings(daily_usd=100.0), store, clock=lambda: time.time() + offset[0])
    entered, go = threading.Event(), threading.Event()

    def writer() -> None:  # the bookkeeper's writer thread: spend recorded inside its batch
        with store.batch():
            entered.set()
            go.wait()
            spend.record("acme", "p/m", 0.1)

    proxy.stop()
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert entered.wait(10)  # the batch found the database away
        offset[0] = 5.0  # the totals were read more than a second ago: this record re-reads them
        go.set()
        time.sleep(0.2)
        started = time.monotonic()
        spend.release(spend.reserve("acme", 0.1))
        assert time.monotonic() - started < 1.0, "a spend check waited for the database"
        thread.join(10)
        assert spend.status().by_provider_today == {"acme": pytest.approx(0.1)}
    finally:
        go.set()
        proxy.start()
        thread.join(20)
        store.close()
