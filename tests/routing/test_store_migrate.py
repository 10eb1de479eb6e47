"""copy_sqlite_state: a SQLite state.db into the real PostgreSQL (the CLI's tests cover the command)."""

from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.errors import ConfigError
from car_inference.routing.store import OutcomeStore, TraceRow
from car_inference.routing.store_migrate import copy_sqlite_state
from car_inference.routing.store_pg import PgOutcomeStore
from fakes.services import postgres_schema_url


def _fill(path: Path, traces: range) -> None:
    with OutcomeStore(path) as store:
        for i in traces:
            row = TraceRow(f"t{i}", f"p/m{i % 3}", "generate", "code", "latin-short", "r", None, float(i))
            score = 0.5 if i % 5 == 0 else None
            store.record_trace(row, success=i % 4 != 0, latency_ms=float(i), score=score)
            store.add_spend("acme", row.model_id, 0.25, ts=100.0)  # equal entries: each one counts


def test_small_chunks_copy_the_same_rows(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    _fill(db, range(11))
    one, many = postgres_schema_url(), postgres_schema_url()
    whole = copy_sqlite_state(db, one)
    chunked = copy_sqlite_state(db, many, chunk_rows=2)
    assert whole.tables == chunked.tables
    counts = {t.table: (t.source_rows, t.copied) for t in chunked.tables}
    assert counts["traces"] == (11, 11) and counts["spend"] == (11, 11) and counts["feedback"] == (3, 3)
    with PgOutcomeStore(one) as a, PgOutcomeStore(many) as b:
        assert a.profiles() == b.profiles() and a.task_stats() == b.task_stats()
        assert b.spend_by_provider(0.0) == {"acme": pytest.approx(11 * 0.25)}


def test_a_second_copy_adds_only_new_rows_and_keeps_counters(tmp_path: Path) -> None:
    """Rows already in PostgreSQL stay as they are: new traces and spend are added, a model's
    counters are not overwritten (run the copy before replicas write)."""
    db = tmp_path / "state.db"
    url = postgres_schema_url()
    _fill(db, range(4))
    copy_sqlite_state(db, url)
    with PgOutcomeStore(url) as pg:
        before = {p["model_id"]: p["total_calls"] for p in pg.profiles()}
    _fill(db, range(4, 6))
    again = {t.table: t for t in copy_sqlite_state(db, url, chunk_rows=3).tables}
    assert (again["traces"].copied, again["traces"].already_there) == (2, 4)
    assert (again["spend"].copied, again["spend"].already_there) == (2, 4)
    with PgOutcomeStore(url) as pg:
        assert {p["model_id"]: p["total_calls"] for p in pg.profiles()} == before
        assert pg.trace("t5") is not None


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        copy_sqlite_state(tmp_path / "none.db", postgres_schema_url())
