"""KeyPool: resolution, spreading, cooldowns, disabling, statistics in state.db (across processes),
thread safety, secrecy."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from car_inference import keys as keys_module
from car_inference.config import CarConfig, RemoteSettings, StateSettings
from car_inference.keys import KeyPool, fingerprint, legacy_stats_path
from car_inference.secrets import SERVICE, SecretStore, no_usable_key
from fakes.keyring import MemoryKeyring
from fakes.services import postgres_schema_url
from fakes.tcp_proxy import TcpProxy

A = "sk-test-key-aaaaaaaa0001"
B = "sk-test-key-bbbbbbbb0002"
C = "sk-test-key-cccccccc0003"
VAR = "OPENAI_API_KEY"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def pool(tmp_path: Path, clock: Clock, env: dict[str, str] | None = None, **config: object) -> KeyPool:
    settings = CarConfig(home=tmp_path, remote=RemoteSettings(rate_limit_cooldown_s=30), **config)  # type: ignore[arg-type]
    return KeyPool(
        settings, tmp_path / "stats.json", env=env if env is not None else {}, store=None, clock=clock
    )


def test_resolution_order_and_sources(tmp_path: Path, clock: Clock, memory_keyring: MemoryKeyring) -> None:
    store = SecretStore(tmp_path)
    store.put(VAR, f"{C},{A}")
    config = CarConfig(home=tmp_path, keys={VAR: [B, A]})
    keys = KeyPool(
        config, tmp_path / "s.json", env={VAR: A, VAR + "S": f"{B}, {A}"}, store=store, clock=clock
    )
    rows = keys.stats([VAR])[VAR]
    assert [(r.masked, r.source) for r in rows] == [
        ("sk-…0001", "env"),
        ("sk-…0002", f"env:{VAR}S"),
        ("sk-…0003", "keyring"),
    ]
    assert keys.has_key(VAR) and not keys.has_key("GROQ_API_KEY")
    assert keys.acquire("GROQ_API_KEY") is None


def test_keyring_lookups_only_for_indexed_names(
    tmp_path: Path, clock: Clock, memory_keyring: MemoryKeyring
) -> None:
    memory_keyring.data[(SERVICE, VAR)] = A  # put there by another tool, not `car secrets put`
    keys = KeyPool(
        CarConfig(home=tmp_path), tmp_path / "s.json", env={}, store=SecretStore(tmp_path), clock=clock
    )
    assert keys.acquire(VAR) is None
    SecretStore(tmp_path).put(VAR, B)
    assert keys.acquire(VAR) is None  # names and values are cached for keyring_ttl_s
    clock.now += 61
    assert keys.acquire(VAR) == B


def test_acquire_spreads_load_least_recently_used(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {VAR + "S": f"{A},{B},{C}"})
    picked = []
    for _ in range(6):
        clock.now += 1
        picked.append(keys.acquire(VAR))
    assert picked == [A, B, C, A, B, C]


def test_rate_limited_key_cools_down(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    assert keys.acquire(VAR) == A
    keys.report(VAR, A, status=429, retry_after=10)
    clock.now += 1
    assert [keys.acquire(VAR) for _ in range(3)] == [B, B, B]
    clock.now += 10  # Retry-After has passed
    assert keys.acquire(VAR) == A
    # without Retry-After: the configured cooldown (30 s)
    keys.report(VAR, A, status=429, retry_after=None)
    clock.now += 29
    assert keys.acquire(VAR) == B
    clock.now += 2
    assert keys.acquire(VAR) == A
    row = keys.stats([VAR])[VAR][0]
    assert (row.rate_limits, row.failures, row.requests, row.last_status) == (2, 2, 2, 429)


def test_all_cooling_returns_the_one_free_first(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    keys.report(VAR, A, status=429, retry_after=50)
    keys.report(VAR, B, status=429, retry_after=20)
    assert keys.acquire(VAR) == B and keys.has_key(VAR)
    assert {r.state for r in keys.stats([VAR])[VAR]} == {"cooling"}


def test_rest_left_is_the_soonest_wait_while_every_usable_key_rests(tmp_path: Path, clock: Clock) -> None:
    """What a request is told while every key rests after a 429 (answered without a call)."""
    keys = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    assert keys.rest_left(VAR) == 0.0
    keys.report(VAR, A, status=429, retry_after=50)
    assert keys.rest_left(VAR) == 0.0  # B is free
    keys.report(VAR, B, status=429, retry_after=20)
    assert keys.rest_left(VAR) == pytest.approx(20.0)
    clock.now += 15
    assert keys.rest_left(VAR) == pytest.approx(5.0)
    keys.report(VAR, B, status=401, retry_after=None)  # B refused: A's wait is what is left
    assert keys.rest_left(VAR) == pytest.approx(35.0)
    assert keys.rest_left("NO_SUCH_KEY") == 0.0


def test_success_ends_a_cooldown(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {VAR: A})
    keys.report(VAR, A, status=429, retry_after=100)
    keys.report(VAR, A, status=200, retry_after=None)
    row = keys.stats([VAR])[VAR][0]
    assert row.state == "ok" and row.cooling_until is None and row.failures == 1 and row.requests == 2


def test_refused_key_is_disabled_until_replaced_or_reset(tmp_path: Path, clock: Clock) -> None:
    env = {VAR + "S": f"{A},{B}"}
    keys = pool(tmp_path, clock, env)
    keys.report(VAR, A, status=401, retry_after=None)
    assert [keys.acquire(VAR) for _ in range(3)] == [B, B, B]
    keys.report(VAR, B, status=403, retry_after=None)
    assert keys.acquire(VAR) is None and not keys.has_key(VAR)
    env[VAR + "S"] = f"{A},{C}"  # B replaced by a new key: healthy at once
    assert keys.acquire(VAR) == C and keys.has_key(VAR)
    assert keys.reset(VAR) == 2
    assert keys.stats([VAR])[VAR][0].state == "ok"


def test_transport_failures_only_count(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {VAR: A})
    keys.report(VAR, A, status=None, retry_after=None)
    keys.report(VAR, A, status=500, retry_after=None)
    row = keys.stats([VAR])[VAR][0]
    assert (row.state, row.failures, row.requests, row.last_status) == ("ok", 2, 2, 500)


def _db_text(home: Path) -> str:
    """Everything written under ``home`` (state.db and its WAL), as text, to look for keys in."""
    return "".join(p.read_bytes().decode("latin-1") for p in sorted(home.iterdir()) if p.is_file())


def test_stats_persist_round_trip_without_keys(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    keys.acquire(VAR)
    keys.report(VAR, A, status=429, retry_after=60)
    keys.report(VAR, B, status=401, retry_after=None)
    keys.report(VAR, A, status=200, retry_after=None)
    keys.flush()
    assert (tmp_path / "state.db").is_file() and not (tmp_path / "stats.json").exists()
    text = _db_text(tmp_path)
    assert A not in text and B not in text
    with sqlite3.connect(tmp_path / "state.db") as conn:
        saved = dict(conn.execute("SELECT fingerprint, requests FROM key_stats").fetchall())
    assert saved == {fingerprint(A): 2, fingerprint(B): 1}
    again = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    before = {r.fingerprint: r.model_dump() for r in keys.stats([VAR])[VAR]}
    after = {r.fingerprint: r.model_dump() for r in again.stats([VAR])[VAR]}
    assert before == after
    assert again.acquire(VAR) == A  # B stays disabled across restarts
    # a key no longer configured still shows, without a source
    gone = pool(tmp_path, clock, {VAR: A})
    assert [(r.masked, r.source, r.state) for r in gone.stats()[VAR]] == [
        ("sk-…0001", "env", "ok"),
        ("sk-…0002", None, "disabled"),
    ]


def test_health_is_shared_between_pools(tmp_path: Path, clock: Clock) -> None:
    """A key refused in one process (a server) is skipped by another (the CLI) and reset for all."""
    server = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    cli = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    server.report(VAR, A, status=401, retry_after=None)
    server.flush()  # written on the pool's own thread: the CLI comes later (it failed under load)
    assert {r.masked: r.state for r in cli.stats([VAR])[VAR]} == {"sk-…0001": "disabled", "sk-…0002": "ok"}
    assert cli.reset(VAR) == 1
    assert server.stats([VAR])[VAR][0].state == "ok"


def test_a_reset_elsewhere_reaches_a_process_whose_keys_are_all_refused(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server whose only key was refused made no more requests, so it never wrote nor re-read
    the keys' health: `car keys reset` (another process) said "reset 1 key(s)" and the server kept
    answering "no usable key" until it was restarted."""
    server = pool(tmp_path, clock, {VAR: A})
    cli = pool(tmp_path, clock, {VAR: A})
    server.report(VAR, A, status=401, retry_after=None)
    server.flush()
    assert server.acquire(VAR) is None and not server.has_key(VAR) and server.refused(VAR)
    assert cli.reset(VAR) == 1
    assert server.acquire(VAR) is None, "re-read at most every _RECHECK_S, not on every request"
    monkeypatch.setattr(keys_module, "_RECHECK_S", 0.0)
    assert server.acquire(VAR) == A and server.has_key(VAR) and not server.refused(VAR)


def test_refused_keys_are_said_so_not_unset(tmp_path: Path, clock: Clock) -> None:
    """A model whose key was refused was "not available: set OPENAI_API_KEY" with the variable set."""
    keys = pool(tmp_path, clock, {VAR: A})
    assert not keys.refused(VAR) and not keys.refused("NOT_SET_KEY")
    keys.report(VAR, A, status=401, retry_after=None)
    assert keys.refused(VAR)
    assert no_usable_key(VAR, refused=True) == (
        f"every key in {VAR} was refused by the provider (401/403) and is skipped: replace it, or run"
        f" `car keys reset {VAR}` once it is valid again"
    )
    assert no_usable_key(VAR, refused=False).startswith(f"set {VAR} (or store it")


_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from car_inference.config import CarConfig
    from car_inference.keys import KeyPool

    home, n = Path(sys.argv[1]), int(sys.argv[2])
    keys = KeyPool(CarConfig(home=home), env={"OPENAI_API_KEY": "sk-test-key-aaaaaaaa0001"}, store=None)
    print("ready", flush=True)
    sys.stdin.readline()  # both start counting together
    for i in range(n):
        keys.report("OPENAI_API_KEY", "sk-test-key-aaaaaaaa0001", status=500 if i % 5 == 0 else 200,
                    retry_after=None)
        keys.flush()  # a write per request: the most chances to lose one
    """
)


def test_two_processes_lose_no_update(tmp_path: Path) -> None:
    n = 150
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for w in workers:
        assert w.stdout is not None and w.stdout.readline().strip() == "ready"
    for w in workers:
        assert w.stdin is not None
        w.stdin.write("go\n")
        w.stdin.flush()
    for w in workers:
        assert w.wait(timeout=60) == 0
    row = KeyPool(CarConfig(home=tmp_path), env={VAR: A}, store=None).stats([VAR])[VAR][0]
    assert (row.requests, row.failures) == (2 * n, 2 * n // 5)


def test_counts_reach_the_database_within_a_second_unasked(tmp_path: Path) -> None:
    """No flush call: what a process killed outright would have left behind."""
    server = KeyPool(CarConfig(home=tmp_path), env={VAR: A}, store=None)
    for _ in range(3):
        server.report(VAR, A, status=200, retry_after=None)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with sqlite3.connect(tmp_path / "state.db") as conn:
            written = conn.execute("SELECT requests FROM key_stats").fetchone()
        if written == (3,):
            break
        time.sleep(0.1)
    assert written == (3,)


def test_legacy_json_is_imported_once(tmp_path: Path, clock: Clock) -> None:
    legacy = legacy_stats_path(CarConfig(home=tmp_path))
    record = {"env_var": VAR, "masked": "sk-…0001", "requests": 7, "failures": 2, "rate_limits": 1,
              "last_used": 999.0, "last_status": 429, "cooling_until": None, "disabled": False}  # fmt: skip
    legacy.write_text(json.dumps({"version": 1, "keys": {fingerprint(A): record}}))
    for _ in range(2):  # two starts: counted once
        keys = KeyPool.for_config(CarConfig(home=tmp_path), env={VAR: A}, store=None, clock=clock)
    row = keys.stats([VAR])[VAR][0]
    assert (row.requests, row.failures, row.rate_limits, row.last_status) == (7, 2, 1, 429)
    keys.report(VAR, A, status=200, retry_after=None)
    assert keys.stats([VAR])[VAR][0].requests == 8


def test_a_legacy_file_with_values_no_key_has_cannot_break_the_pool(tmp_path: Path, clock: Clock) -> None:
    """``"cooling_until": "soon"`` was stored as it was, and every hosted call failed with a
    TypeError (HTTP 500 from the server) until `car keys reset`, the file gone or not; 1e300 as a
    time and 1e400 as a count failed with OverflowError."""
    legacy = legacy_stats_path(CarConfig(home=tmp_path))
    poison = {
        "env_var": VAR, "masked": "sk-…0001", "requests": 1e400, "failures": "2", "rate_limits": -3,
        "last_used": 1e300, "last_status": "429", "cooling_until": "soon", "disabled": "no",
    }  # fmt: skip
    legacy.write_text(json.dumps({"version": 1, "keys": {fingerprint(A): poison}}))  # 1e400: Infinity
    keys = KeyPool.for_config(CarConfig(home=tmp_path), env={VAR: A}, store=None, clock=clock)
    assert keys.acquire(VAR) == A and keys.has_key(VAR)
    row = keys.stats([VAR])[VAR][0]
    assert (row.requests, row.failures, row.rate_limits, row.last_status, row.state) == (0, 0, 0, None, "ok")
    legacy.unlink()
    again = KeyPool.for_config(CarConfig(home=tmp_path), env={VAR: A}, store=None, clock=clock)
    assert again.acquire(VAR) == A


def test_unreadable_stats_file_is_ignored(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "stats.json").write_text("{not json")
    keys = pool(tmp_path, clock, {VAR: A})
    assert keys.acquire(VAR) == A and "ignoring" in caplog.text


def test_short_keys_show_their_last_characters(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {"GROQ_API_KEYS": "abcd1234,xy12,q"})
    masked = [r.masked for r in keys.stats(["GROQ_API_KEY"])["GROQ_API_KEY"]]
    assert masked == ["…1234", "…12", "…"]  # never more than half of a short key


def test_known_variables_for_stats(tmp_path: Path, clock: Clock) -> None:
    keys = pool(
        tmp_path,
        clock,
        {"GROQ_API_KEYS": "g1-abcdefghijk", "HOME": "/x", "CAR_SERVER_API_KEYS": "client-key-12345"},
        keys={"MISTRAL_API_KEY": [C]},
    )
    assert set(keys.stats()) == {"GROQ_API_KEY", "MISTRAL_API_KEY"}  # not car serve's clients' keys
    assert legacy_stats_path(CarConfig(home=tmp_path)) == tmp_path / "key_pool_stats.json"
    stored = KeyPool.for_config(CarConfig(home=tmp_path), store=None)
    assert (stored.db_path, stored.legacy_path) == (tmp_path / "state.db", tmp_path / "key_pool_stats.json")


def test_thread_safety(tmp_path: Path) -> None:
    keys = KeyPool(CarConfig(home=tmp_path), tmp_path / "s.json", env={VAR + "S": f"{A},{B},{C}"}, store=None)
    used: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(200):
            key = keys.acquire(VAR)
            assert key is not None
            keys.report(VAR, key, status=200, retry_after=None)
            with lock:
                used.append(key)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = keys.stats([VAR])[VAR]
    assert sum(r.requests for r in rows) == len(used) == 1600
    assert all(r.requests > 300 for r in rows)  # the load is spread
    keys.flush()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT sum(requests) FROM key_stats").fetchone()[0] == 1600


def test_no_key_in_logs_or_reprs(tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    for status in (429, 401, 200, None):
        keys.report(VAR, A, status=status, retry_after=None)
    keys.reset()
    stats = keys.stats()
    texts = [r.getMessage() for r in caplog.records] + [repr(keys), repr(stats), json.dumps(str(stats))]
    assert caplog.records  # it did log: rate limit and refusal
    for text in texts:
        assert A not in text and B not in text


@pytest.mark.timeout(60)  # without the fix: held until the database answers, here never
def test_a_database_that_stops_answering_never_holds_a_request(tmp_path: Path) -> None:
    """A PostgreSQL that took the connection and stopped answering (a hung server) froze every
    replica: the pool wrote its statistics on the caller's thread, the event loop, under the lock
    each request takes. Now they are written on a thread of their own; the counts wait in memory
    and reach the database when it answers again."""
    url = postgres_schema_url()
    target = urlsplit(url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    config = CarConfig(home=tmp_path, state=StateSettings(url=proxy.through(url)))
    keys = KeyPool(config, env={VAR: A}, store=None, fleet=None)

    def requests_written() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT requests FROM key_stats").fetchone()
        return int(row[0]) if row else 0

    try:
        proxy.freeze()
        started = time.monotonic()
        for _ in range(5):
            key = keys.acquire(VAR)
            assert key == A
            keys.report(VAR, key, status=429, retry_after=0.01)  # health news: written at once
            keys.report(VAR, key, status=200, retry_after=None)
        assert time.monotonic() - started < 1.0, "a request waited for the database"
        assert requests_written() == 0
        proxy.thaw()
        deadline = time.monotonic() + 10
        while requests_written() < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests_written() == 10
    finally:
        proxy.thaw()
        keys.close()
        proxy.close()
