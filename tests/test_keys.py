"""KeyPool: resolution, spreading, cooldowns, disabling, statistics on disk, thread safety, secrecy."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from car_inference.config import CarConfig, RemoteSettings
from car_inference.keys import KeyPool, fingerprint, stats_path_for
from car_inference.secrets import SERVICE, SecretStore
from fakes.keyring import MemoryKeyring

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


def test_stats_persist_round_trip_without_keys(tmp_path: Path, clock: Clock) -> None:
    keys = pool(tmp_path, clock, {VAR + "S": f"{A},{B}"})
    keys.acquire(VAR)
    keys.report(VAR, A, status=429, retry_after=60)
    keys.report(VAR, B, status=401, retry_after=None)
    keys.report(VAR, A, status=200, retry_after=None)
    keys.flush()
    text = (tmp_path / "stats.json").read_text()
    assert A not in text and B not in text
    data = json.loads(text)
    assert set(data["keys"]) == {fingerprint(A), fingerprint(B)} and data["version"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
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


def test_unreadable_stats_file_is_ignored(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "stats.json").write_text("{not json")
    keys = pool(tmp_path, clock, {VAR: A})
    assert keys.acquire(VAR) == A and "ignoring" in caplog.text


def test_known_variables_for_stats(tmp_path: Path, clock: Clock) -> None:
    keys = pool(
        tmp_path, clock, {"GROQ_API_KEYS": "g1-abcdefghijk", "HOME": "/x"}, keys={"MISTRAL_API_KEY": [C]}
    )
    assert set(keys.stats()) == {"GROQ_API_KEY", "MISTRAL_API_KEY"}
    assert stats_path_for(CarConfig(home=tmp_path)) == tmp_path / "key_pool_stats.json"
    assert (
        KeyPool.for_config(CarConfig(home=tmp_path), store=None).stats_path
        == tmp_path / "key_pool_stats.json"
    )


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
    assert sum(e["requests"] for e in json.loads((tmp_path / "s.json").read_text())["keys"].values()) == 1600


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
