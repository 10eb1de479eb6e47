"""The fleet link through a real Redis: key cooldowns and disabled keys shared by every replica, the
notice that makes other replicas reload learned router state, degrading to local-only and back.
Two Fleets in one process are two replicas; each KeyPool has a state.db of its own, so only Redis
can carry what one replica learned to the other."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from car_inference.config import CarConfig, CoordinationSettings, RemoteSettings, load_config
from car_inference.errors import ConfigError
from car_inference.keys import KeyPool, fingerprint
from car_inference.routing import OutcomeTracker
from car_inference.routing.coord import Fleet
from car_inference.routing.store import OutcomeStore
from fakes.redis_service import RedisServer, closed_port, redis_prefix, redis_url

K1 = "sk-test-key-aaaaaaaa0001"
K2 = "sk-test-key-bbbbbbbb0002"
VAR = "OPENAI_API_KEY"
FRESH = 0.3  # a refresh (50 ms) or a few, with room for a busy machine


def _wait(check: Callable[[], bool], limit: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit:
            pytest.fail(f"not within {limit} s")
        time.sleep(0.005)
    return time.monotonic() - started


def _settings(url: str | None = None, **kw: object) -> CoordinationSettings:
    return CoordinationSettings(redis_url=url or redis_url(), key_prefix=redis_prefix(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def fleets() -> Iterator[tuple[Fleet, Fleet]]:
    settings = _settings()
    a, b = Fleet(settings), Fleet(settings)
    yield a, b
    a.close()
    b.close()


def _pool(home: Path, fleet: Fleet | None) -> KeyPool:
    config = CarConfig(home=home, remote=RemoteSettings(rate_limit_cooldown_s=30))
    return KeyPool(config, None, env={VAR + "S": f"{K1},{K2}"}, store=None, fleet=fleet)


def test_a_429_on_one_replica_rests_the_key_on_every_replica(
    fleets: tuple[Fleet, Fleet], tmp_path: Path
) -> None:
    a, b = fleets
    pa, pb = _pool(tmp_path / "a", a), _pool(tmp_path / "b", b)
    assert {pb.acquire(VAR) for _ in range(4)} == {K1, K2}  # both keys in turn
    pa.report(VAR, K1, status=429, retry_after=20)
    took = _wait(lambda: fingerprint(K1) in b.key_health(), limit=FRESH)
    assert [pb.acquire(VAR) for _ in range(6)] == [K2] * 6  # B skips the key A was refused with
    row = next(r for r in pb.stats([VAR])[VAR] if r.fingerprint == fingerprint(K1))
    assert row.state == "cooling" and row.cooling_until is not None
    assert row.rate_limits == 0  # B's own counts: the 429 was A's
    # A success elsewhere does not end the fleet's cooldown early (it may have started before the 429).
    pb.report(VAR, K1, status=200, retry_after=None)
    assert pb.acquire(VAR) == K2 and pb.acquire(VAR) == K2
    print(f"B skipped the key {took * 1000:.0f} ms after A's 429")


def test_a_refused_key_is_disabled_for_all_and_reset_for_all(
    fleets: tuple[Fleet, Fleet], tmp_path: Path
) -> None:
    a, b = fleets
    pa, pb = _pool(tmp_path / "a", a), _pool(tmp_path / "b", b)
    pa.report(VAR, K2, status=401, retry_after=None)
    _wait(lambda: fingerprint(K2) in b.key_health(), limit=FRESH)
    assert {pb.acquire(VAR) for _ in range(4)} == {K1}
    pa.report(VAR, K1, status=403, retry_after=None)
    _wait(lambda: b.key_health().get(fingerprint(K1)) is not None, limit=FRESH)
    assert pb.acquire(VAR) is None and not pb.has_key(VAR)  # every key refused somewhere
    assert [r.state for r in pb.stats([VAR])[VAR]] == ["disabled", "disabled"]
    fresh = _pool(tmp_path / "c", b)  # `car keys reset` on B: a pool that has used no key yet
    assert fresh.reset(VAR) == 2  # A's refusals are lifted, for every replica
    _wait(lambda: not a.key_health(), limit=FRESH)
    assert {pa.acquire(VAR) for _ in range(4)} == {K1, K2}


def test_a_cooldown_is_never_shortened_and_ends_by_itself(fleets: tuple[Fleet, Fleet]) -> None:
    a, b = fleets
    a.put_key("fp", cooling_s=0.4)
    b.put_key("fp", cooling_s=0.05)  # a shorter one does not replace the longer
    _wait(lambda: "fp" in b.key_health(), limit=FRESH)
    until = b.key_health()["fp"].cooling_until
    assert until is not None and until - time.monotonic() > 0.2
    _wait(lambda: "fp" not in a.key_health() and "fp" not in b.key_health(), limit=1.0)


def test_a_change_on_one_replica_reloads_the_others_within_a_second(tmp_path: Path) -> None:
    """Two trackers on one shared store (what [state] url gives replicas): outcomes recorded on A
    reach B's routing view through the notice, not through B asking."""
    settings = _settings()
    store_a, store_b = OutcomeStore(tmp_path / "state.db"), OutcomeStore(tmp_path / "state.db")
    a, b = Fleet(settings), Fleet(settings)
    ta, tb = OutcomeTracker(store_a), OutcomeTracker(store_b)
    a.share_learning(ta)
    b.share_learning(tb)
    try:
        _wait(lambda: a.subscribed.is_set() and b.subscribed.is_set(), limit=2.0)
        own = a.reloads
        for i in range(3):
            ta.record_attempt(
                "p/m", family="chat", trace_id=f"t{i}", started_at=time.time(), success=True, latency_ms=10.0
            )
        started = time.monotonic()
        assert tb.profile("p/m") is None  # B has not read the store since
        _wait(lambda: tb.profile("p/m") is not None, limit=1.0)
        took = time.monotonic() - started
        profile = tb.profile("p/m")
        assert profile is not None and profile.total_calls == 3
        time.sleep(0.4)
        assert a.reloads == own  # a replica does not reload on its own notice
        print(f"B reloaded {took * 1000:.0f} ms after A's outcomes")
    finally:
        a.close()
        b.close()
        store_a.close()
        store_b.close()


def test_reloads_are_debounced(fleets: tuple[Fleet, Fleet]) -> None:
    a, b = fleets
    calls: list[float] = []
    b.follow(lambda: calls.append(time.monotonic()))
    _wait(b.subscribed.is_set, limit=2.0)
    stop = threading.Event()

    def churn() -> None:  # a busy replica: a change every 5 ms for a second
        while not stop.is_set():
            a.changed()
            time.sleep(0.005)

    thread = threading.Thread(target=churn)
    thread.start()
    time.sleep(1.0)
    stop.set()
    thread.join()
    time.sleep(0.5)
    assert 2 <= len(calls) <= 6, calls  # every 250 ms at most, yet within a second
    assert all(y - x >= 0.2 for x, y in itertools.pairwise(calls))


def test_a_reload_the_state_store_cannot_serve_is_retried_quietly(
    fleets: tuple[Fleet, Fleet], caplog: pytest.LogCaptureFixture
) -> None:
    """While PostgreSQL is away every notice's reload failed with a traceback (108 in 4 minutes
    on one replica) and still counted as a reload; now it logs nothing above debug, is not
    counted, and is tried again a second later, so the replica catches up without a new notice."""
    from car_inference.errors import StateUnavailable

    a, b = fleets
    calls: list[float] = []

    def reload() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise StateUnavailable("the PostgreSQL state store is unreachable", 1.0)

    _wait(b.subscribed.is_set, limit=2.0)
    b.follow(reload)
    before = b.reloads
    with caplog.at_level(logging.INFO, logger="car_inference"):
        a.changed()  # one notice: a failed reload, a failed retry, then one that works
        _wait(lambda: len(calls) >= 3, limit=5.0)
    assert calls[1] - calls[0] >= 0.9 and calls[2] - calls[1] >= 0.9
    assert b.reloads == before + 1
    assert not [r for r in caplog.records if "reloading" in r.getMessage()], caplog.text


def test_unreachable_redis_degrades_to_local_keys_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(f"redis://127.0.0.1:{closed_port()}/0", timeout_ms=200)
    with caplog.at_level(logging.WARNING, logger="car_inference.routing.coord"):
        fleet = Fleet(settings)
        try:
            keys = _pool(tmp_path, fleet)
            keys.report(VAR, K1, status=429, retry_after=30)  # local, still works
            assert [keys.acquire(VAR) for _ in range(3)] == [K2] * 3
            health = fleet.health()
            time.sleep(1.2)  # the thread tries again, and fails again: still one warning
        finally:
            fleet.close()
    assert not health.reachable and health.error and "Connection" in health.error
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_sharing_resumes_when_redis_returns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer()
    server.start()
    settings = _settings(server.url, timeout_ms=200)
    a, b = Fleet(settings), Fleet(settings)
    pa, pb = _pool(tmp_path / "a", a), _pool(tmp_path / "b", b)
    calls: list[float] = []
    b.follow(lambda: calls.append(time.monotonic()))
    try:
        _wait(lambda: a.subscribed.is_set() and b.subscribed.is_set(), limit=2.0)
        caught_up = b.reloads
        server.stop()
        with caplog.at_level(logging.WARNING, logger="car_inference.routing.coord"):
            _wait(lambda: not a.reachable and not b.reachable, limit=2.0)
            pa.report(VAR, K1, status=429, retry_after=30)  # Redis is away: A alone knows
            assert pa.acquire(VAR) == K2
            assert {pb.acquire(VAR) for _ in range(4)} == {K1, K2}  # B keeps serving, with both keys
            server.start()
            _wait(lambda: a.reachable and b.reachable, limit=3.0)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        pa.report(VAR, K2, status=429, retry_after=30)
        _wait(lambda: fingerprint(K2) in b.key_health(), limit=FRESH)
        assert pb.acquire(VAR) == K1
        _wait(lambda: b.reloads > caught_up, limit=3.0)  # subscribed again: a catch-up reload
        _wait(lambda: a.subscribed.is_set() and b.subscribed.is_set(), limit=3.0)
        a.changed()
        n = len(calls)
        _wait(lambda: len(calls) > n, limit=1.0)  # and notices flow again
    finally:
        a.close()
        b.close()
        server.stop()


def test_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        f'[coordination]\nredis_url = "{redis_url()}"\nglobal_concurrency = 40\nlease_s = 2.5\n'
    )
    config = load_config(tmp_path, env={"CAR_COORDINATION__GLOBAL_CONCURRENCY": "12"})
    assert config.coordination.global_concurrency == 12 and config.coordination.lease_s == 2.5
    assert Fleet.for_settings(CoordinationSettings()) is None  # no redis_url: local only
    with pytest.raises(ConfigError, match="global_concurrency"):
        load_config(tmp_path, env={"CAR_COORDINATION__GLOBAL_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match="lease_s"):
        load_config(tmp_path, env={"CAR_COORDINATION__LEASE_S": "0.1"})


def test_a_url_redis_refuses_is_a_configuration_error_not_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    """A database index Redis does not have started the replica "unreachable" for good (exit 0),
    its spend limits, breakers and concurrency bound its own, waiting for a return never to come."""
    base = redis_url().rsplit("/", 1)[0]
    with pytest.raises(ConfigError, match=r"refused it .*DB index is out of range.*not an outage.*redis_url"):
        Fleet(CoordinationSettings(redis_url=f"{base}/99", key_prefix=redis_prefix()))
    # An option redis-py cannot read was its ValueError's traceback from every command.
    with pytest.raises(ConfigError, match=r"\[coordination\] redis_url .*Invalid value for 'socket_timeout'"):
        Fleet(CoordinationSettings(redis_url=f"{base}/0?socket_timeout=x", key_prefix=redis_prefix()))
    assert "unreachable" not in caplog.text  # an outage's warning came first, contradicting it
    # A Redis that does not answer is an outage still: the replica starts and shares when it can.
    away = Fleet(CoordinationSettings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", timeout_ms=200))
    try:
        assert not away.reachable
    finally:
        away.close()
