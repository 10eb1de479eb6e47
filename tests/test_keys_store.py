"""Key statistics' database, SQLite and PostgreSQL: increments from writers at once all count."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from car_inference.config import CarConfig, StateSettings
from car_inference.keys_store import KeyStatsError, open_key_stats
from fakes.services import postgres_schema_url

ROUNDS = 200


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> CarConfig:
    url = postgres_schema_url() if request.param == "postgresql" else None
    return CarConfig(home=tmp_path, state=StateSettings(url=url))


def _row(fp: str = "fp1", **counts: object) -> dict[str, object]:
    row: dict[str, object] = {
        "fp": fp, "env_var": "OPENAI_API_KEY", "masked": "sk-…0001", "requests": 1, "failures": 0,
        "rate_limits": 0, "last_used": 1.0, "last_status": 200, "cooling_until": None, "disabled": False,
        "reported": True, "health": False,
    }  # fmt: skip
    return row | counts


def _writer(config: CarConfig, worker: int, start: object) -> None:
    db = open_key_stats(config)
    start.wait()  # type: ignore[attr-defined]
    for i in range(ROUNDS):  # one transaction per request: the most chances to lose one
        db.write([_row(requests=1, failures=int(i % 4 == 0), last_used=float(worker * 1000 + i))])
    db.close()


def test_two_processes_writing_at_once_lose_no_increment(config: CarConfig) -> None:
    open_key_stats(config).close()
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(config, w, start)) for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    db = open_key_stats(config)
    ((fp, env_var, _masked, requests, failures, _rl, last_used, *_),) = db.read()
    db.close()
    assert (fp, env_var, requests, failures) == ("fp1", "OPENAI_API_KEY", 2 * ROUNDS, 2 * ROUNDS // 4)
    assert last_used == 1000 + ROUNDS - 1  # the latest use wins, whoever wrote last


def test_health_is_overwritten_only_with_news(config: CarConfig) -> None:
    db = open_key_stats(config)
    db.write([_row(cooling_until=50.0, disabled=True, health=True, last_status=429)])
    db.write([_row(last_status=None, reported=False)])  # counts only: health and status stay
    (row,) = db.read()
    assert row[3] == 2 and row[7] == 429 and row[8] == 50.0 and row[9] == 1
    db.write([_row(cooling_until=None, disabled=False, health=True)])
    (row,) = db.read()
    assert row[8] is None and row[9] == 0
    db.close()


def test_a_file_is_imported_once(config: CarConfig) -> None:
    db = open_key_stats(config)
    assert db.import_once("/old/key_pool_stats.json", [_row(requests=7)])
    assert not db.import_once("/old/key_pool_stats.json", [_row(requests=7)])
    assert db.read()[0][3] == 7
    db.close()


def test_where_they_live(config: CarConfig) -> None:
    db = open_key_stats(config)
    db.write([_row()])
    db.close()
    if config.state.url is None:
        assert db.backend == "sqlite" and db.location == str(config.paths.state_db)
        with sqlite3.connect(config.paths.state_db) as conn:
            assert conn.execute("SELECT requests FROM key_stats").fetchone() == (1,)
    else:
        assert db.backend == "postgresql" and not config.paths.state_db.exists()


def test_an_unreachable_database_is_a_key_stats_error(tmp_path: Path) -> None:
    config = CarConfig(home=tmp_path, state=StateSettings(url="postgresql://car:s3cret@127.0.0.1:1/car"))
    with pytest.raises(KeyStatsError) as info:
        open_key_stats(config)
    assert "s3cret" not in str(info.value) and "127.0.0.1:1" in str(info.value)


def _pool_worker(config: CarConfig, start: object) -> None:
    from car_inference.keys import KeyPool

    keys = KeyPool(config, env={"OPENAI_API_KEY": KEY}, store=None, fleet=None)
    start.wait()  # type: ignore[attr-defined]
    for i in range(ROUNDS):
        keys.report("OPENAI_API_KEY", KEY, status=500 if i % 5 == 0 else 200, retry_after=None)
        keys.flush()  # a write per request
    keys.close()


KEY = "sk-test-key-aaaaaaaa0001"


def test_key_pools_of_two_processes_share_their_counts(config: CarConfig) -> None:
    """The key pool itself on either database: what `car keys stats` shows is every process's."""
    from car_inference.keys import KeyPool

    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_pool_worker, args=(config, start)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    pool = KeyPool(config, env={"OPENAI_API_KEY": KEY}, store=None, fleet=None)
    (row,) = pool.stats(["OPENAI_API_KEY"])["OPENAI_API_KEY"]
    pool.close()
    assert (row.requests, row.failures, row.last_status) == (2 * ROUNDS, 2 * ROUNDS // 5, 200)
    assert config.paths.state_db.exists() == (config.state.url is None)  # PostgreSQL: no state.db
