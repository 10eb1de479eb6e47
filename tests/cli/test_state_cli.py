"""`car state migrate`: a real SQLite state.db copied into the real PostgreSQL, run in-process."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer
from typer.testing import CliRunner

from car_inference.cli.state import register
from car_inference.config import CarConfig, StateSettings
from car_inference.keys import KeyPool
from car_inference.routing.store import OutcomeStore, TraceRow
from car_inference.routing.store_pg import PgOutcomeStore
from fakes.services import postgres_schema_url

app = typer.Typer()
register(app)
runner = CliRunner()
KEY = "sk-test-key-aaaaaaaa0001"


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _fill(path: Path) -> None:
    with OutcomeStore(path) as store:
        for i in range(6):
            row = TraceRow(
                f"t{i}", "p/a" if i % 2 else "p/b", "generate", "code", "latin-short", "r", None, i
            )
            store.record_trace(
                row, success=i != 3, latency_ms=10.0 * i, output_tokens=i, score=0.5 if i == 4 else None
            )
        store.adjust_quality("t1", "quick_retry", 0.25, explicit=False)
        store.add_spend("acme", "p/a", 0.5, ts=100.0)
        store.add_spend("acme", "p/a", 0.5, ts=100.0)  # the same amount twice is two entries
    keys = KeyPool(CarConfig(home=path.parent), env={"OPENAI_API_KEY": KEY}, store=None, fleet=None)
    for status in (200, 429, 200):
        keys.report("OPENAI_API_KEY", KEY, status=status, retry_after=None)
    keys.close()


def test_migrate_copies_everything_once(isolated_home: Path) -> None:
    _fill(isolated_home / "state.db")
    url = postgres_schema_url()
    (isolated_home / "config.toml").write_text(f'[state]\nurl = "{url}"\n')
    code, out, err = car("state", "migrate", "--json")
    assert code == 0, err
    first = {t["table"]: t for t in json.loads(out)["tables"]}
    assert {t: first[t]["copied"] for t in first} == {
        "profiles": 2, "task_stats": 6, "traces": 6, "feedback": 2, "spend": 2, "key_stats": 1,
    }  # fmt: skip
    with OutcomeStore(isolated_home / "state.db") as lite, PgOutcomeStore(url) as pg:
        assert pg.profiles() == lite.profiles()
        assert pg.task_stats() == lite.task_stats()
        assert [pg.trace(f"t{i}") for i in range(6)] == [lite.trace(f"t{i}") for i in range(6)]
        assert pg.feedback_for("t1") == lite.feedback_for("t1")
        assert pg.spend_by_provider(0.0) == lite.spend_by_provider(0.0) == {"acme": 1.0}
    shared = KeyPool(
        CarConfig(home=isolated_home, state=StateSettings(url=url)),
        env={"OPENAI_API_KEY": KEY},
        store=None,
        fleet=None,
    )
    (stats,) = shared.stats(["OPENAI_API_KEY"])["OPENAI_API_KEY"]
    shared.close()
    assert (stats.requests, stats.rate_limits, stats.last_status) == (3, 1, 200)
    code, out, _ = car("state", "migrate")  # again: nothing copied twice
    assert code == 0 and "already there" in out
    # Where it went as libpq resolved it (a bare postgresql:// reaches the local socket's server).
    parts = urlsplit(url)
    server = f"{parts.username}@{parts.hostname}:{parts.port or 5432}{parts.path}"
    assert f"that is {server}" in " ".join(out.split())
    with PgOutcomeStore(url) as pg:
        assert sum(p["total_calls"] for p in pg.profiles()) == 6
        assert pg.spend_by_provider(0.0) == {"acme": 1.0}
    code, out, _ = car("state", "migrate", "--json")
    assert {t["table"]: t["copied"] for t in json.loads(out)["tables"]} == dict.fromkeys(first, 0)


def test_a_version_1_file_is_migrated_then_copied(isolated_home: Path) -> None:
    db = isolated_home / "state.db"
    _fill(db)
    conn = sqlite3.connect(db)  # as schema 1 was: residual sums, no answer lengths or joined_at
    conn.execute("ALTER TABLE task_stats DROP COLUMN joined_at")
    conn.execute("ALTER TABLE profiles ADD COLUMN resid_sum REAL NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE task_stats ADD COLUMN resid_sum REAL NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE task_stats DROP COLUMN total_output_tokens")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    code, out, err = car("state", "migrate", "--to", postgres_schema_url(), "--json")
    assert code == 0, err
    assert json.loads(out)["schema_version"] == 5


def test_usage_errors_are_one_line_with_status_2(isolated_home: Path) -> None:
    code, _, err = car("state", "migrate")
    assert code == 2 and "pass --to postgresql://" in err
    code, _, err = car("state", "migrate", "--to", "mysql://u:secret@h/db")
    assert code == 2 and "must be a postgresql:// URL" in err and "secret" not in err
    code, _, err = car(
        "state", "migrate", "--to", postgres_schema_url(), "--from", str(isolated_home / "none.db")
    )
    assert code == 2 and "does not exist" in err and "none.db" in err
    _fill(isolated_home / "state.db")
    code, _, err = car("state", "migrate", "--to", "postgresql://u:secret@127.0.0.1:1/db")
    assert code == 2 and "not reachable" in err and "secret" not in err


def test_a_file_damaged_part_way_is_named_not_the_homes_state_db(isolated_home: Path, tmp_path: Path) -> None:
    """`--from bad.db` with a damaged page said $CAR_HOME/state.db is damaged and should be moved
    aside: a file that did not exist (the home's state is in PostgreSQL), or a healthy one."""
    bad = tmp_path / "bad.db"
    with OutcomeStore(bad) as store:
        for i in range(400):
            row = TraceRow(f"t{i}", "p/a", "generate", "code", "latin-short", "r" * 200, None, i)
            store.record_trace(row, success=True, latency_ms=1.0)
    data = bytearray(bad.read_bytes())
    page = 4096
    data[page * 3 : page * 4] = b"\xff" * page
    bad.write_bytes(bytes(data))
    code, _, err = car("state", "migrate", "--from", str(bad), "--to", postgres_schema_url())
    assert code == 2 and err.strip().splitlines() == [err.strip()], err
    assert str(bad) in err and "cannot be read" in err and "state.db" not in err


def test_prune_with_a_home_that_is_a_file_or_an_infinite_retention_is_one_line(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CAR_HOME that is a file gave prune a 50-line FileExistsError traceback; a retention of
    inf passed the config and was then blamed on --older-than-days, which nobody passed."""
    (isolated_home / "config.toml").write_text("[state]\ntrace_retention_days = inf\n")
    code, _, err = car("state", "prune")
    assert code == 2 and "[state.trace_retention_days]: Input should be a finite number" in err
    assert "--older-than-days" not in err
    home_file = tmp_path / "home-file"
    home_file.write_text("")
    monkeypatch.setenv("CAR_HOME", str(home_file))
    code, _, err = car("state", "prune")
    assert code == 2 and err.strip().endswith("cannot be used: it is a file, not a folder")
    assert len(err.strip().splitlines()) == 1


def test_car_health_names_the_state_backend(isolated_home: Path) -> None:
    from car_inference.cli import app as car_app

    url = postgres_schema_url().replace("postgres@", "postgres:pw@")  # trust auth ignores it
    (isolated_home / "config.toml").write_text(f'[state]\nurl = "{url}"\n')
    result = runner.invoke(car_app, ["health", "--local"])
    assert result.exit_code == 0, result.stderr
    assert "learned state: postgresql at postgresql://postgres:***@127.0.0.1" in result.stdout
    assert "ms round trip" in result.stdout and ":pw@" not in result.stdout


def test_an_unreachable_postgresql_refuses_the_start_in_one_line(isolated_home: Path) -> None:
    # A real process: the key statistics, which live in the same database, used to warn first
    # (two more lines through logging) before the state store's error.
    env = {
        **os.environ,
        "CAR_HOME": str(isolated_home),
        "CAR_STATE__URL": "postgresql://u:secret@127.0.0.1:1/db",
    }
    done = subprocess.run(
        [sys.executable, "-m", "car_inference", "health", "--local"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: PostgreSQL state store at"), lines
    assert "not reachable" in lines[0] and "secret" not in done.stderr


def test_prune_deletes_traces_older_than_the_retention(isolated_home: Path) -> None:
    now = time.time()
    with OutcomeStore(isolated_home / "state.db") as store:
        for i, age_days in enumerate((40, 31, 2)):
            row = TraceRow(f"t{i}", "p/a", "generate", "code", None, "r", None, now - age_days * 86_400)
            store.record_trace(row, success=True, latency_ms=1.0)
        for i, age_days in enumerate((100, 95, 5)):  # three templates, two dormant for 90 days
            row = TraceRow(f"x{i}", "p/a", "generate", "code", f"coarse/p{i}", "r", None, now)
            store.record_trace(row, success=True, latency_ms=1.0, now=now - age_days * 86_400)
        yesterday = (now // 86_400 - 1) * 86_400
        for ts in (yesterday + 100, yesterday + 200, now):
            store.add_spend("openai", "openai/a", 0.5, ts=ts)
    code, out, err = car("state", "prune", "--json")  # the default retention: 30 days
    assert code == 0, err
    assert json.loads(out) == {
        "deleted": 2, "older_than_days": 30.0, "templates_forgotten": 2, "templates_older_than_days": 90.0,
        "spend_entries_rolled_up": 2,
    }  # fmt: skip
    code, out, _ = car("state", "prune", "--older-than-days", "1", "--templates-older-than-days", "1")
    assert code == 0 and "deleted 1 traces older than 1 days" in out
    assert "forgot 1 templates not seen for 1 days" in out
    assert "rolled 0 spend entries up into daily totals" in out
    code, out, _ = car("state", "prune", "--older-than-days", "0", "--templates-older-than-days", "0")
    assert code == 0 and "kept every trace" in out and "kept every template" in out
    code, _, err = car("state", "prune", "--older-than-days", "-1")
    assert code == 2 and "--older-than-days" in err
    code, out, err = car("state", "prune", "--templates-older-than-days", "inf", "--json")
    assert code == 2 and out == "" and "finite number of days" in err  # --json printed Infinity
    with OutcomeStore(isolated_home / "state.db") as store:
        assert [p["total_calls"] for p in store.profiles()] == [6], "the learned counters stay"
        assert {r["key"] for r in store.task_stats()} == {"code"}, "and the rows under no template"
        assert store.spend_by_provider(0.0) == {"openai": 1.5}
