"""copy_sqlite_state: a SQLite state.db into the real PostgreSQL (the CLI's tests cover the command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    """A file's counters are added once: a second copy of it adds its new traces and spend, and
    leaves the counters as the first copy made them."""
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


def _by(rows: list[dict[str, Any]], *key: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(r[k] for k in key): r for r in rows}


def test_another_machines_counters_are_added_to_those_there_once(tmp_path: Path) -> None:
    """Two machines' files into one database (or a file into one replicas already write to): the
    second's counters add to the first's, so the counts still equal the traces; copying the
    second again adds nothing twice."""
    url = postgres_schema_url()
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    _fill(one, range(6))
    _fill(two, range(100, 109))  # the same three models, other traces
    copy_sqlite_state(one, url)
    result = copy_sqlite_state(two, url, chunk_rows=4)
    tables = {t.table: t for t in result.tables}
    assert result.counters_added and (tables["profiles"].added_to, tables["profiles"].copied) == (3, 0)
    assert tables["traces"].copied == 9
    with OutcomeStore(one) as a, OutcomeStore(two) as b, PgOutcomeStore(url) as pg:
        merged, left, right = (_by(s.profiles(), "model_id") for s in (pg, a, b))
        for model, row in merged.items():
            for column in ("total_calls", "success_count", "fail_count", "total_latency_ms", "quality_sum"):
                assert row[column] == pytest.approx(left[model][column] + right[model][column])
        traces = [pg.trace(f"t{i}") for i in [*range(6), *range(100, 109)]]
        assert sum(int(p["total_calls"]) for p in merged.values()) == len(traces) == 15
        assert all(t is not None for t in traces)
        stats, lstats, rstats = (_by(s.task_stats(), "model_id", "key") for s in (pg, a, b))
        assert set(stats) == set(lstats) | set(rstats)
        for k, row in stats.items():
            calls = (lstats.get(k) or {}).get("calls", 0) + (rstats.get(k) or {}).get("calls", 0)
            assert row["calls"] == calls
    again = copy_sqlite_state(two, url)
    assert not again.counters_added
    with PgOutcomeStore(url) as pg:
        assert _by(pg.profiles(), "model_id") == merged


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        copy_sqlite_state(tmp_path / "none.db", postgres_schema_url())
