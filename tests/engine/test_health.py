"""The model health report, spend status and profile export."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from car_inference.engine import InferenceEngine
from car_inference.engine.bookkeeping import Bookkeeper
from car_inference.errors import InvalidInput
from car_inference.schema import ModelCapability


def test_model_health_report_describes_the_engine(isolated_home: Path) -> None:
    engine = InferenceEngine()
    report = engine.model_health()
    assert report.total_models == len(engine.list_models())
    assert report.available_models >= 2 and report.local_models + report.remote_models == report.total_models
    generate = next(d for d in report.defaults if d.capability == ModelCapability.GENERATE)
    assert (
        generate.configured_model.startswith("huggingface/smollm2")
        and generate.available
        and generate.is_local
    )
    caps = {c.capability: c for c in report.capabilities}
    assert len(caps) == 15 and caps[ModelCapability.EMBED].local_available_models >= 1
    providers = {p.provider: p for p in report.providers}
    assert providers["openai"].remote_models > 0 and not providers["openai"].configured
    scenarios = {s.name: s for s in report.routing_scenarios}
    assert set(scenarios) == {
        "interactive_text",
        "background_code",
        "interactive_tool_use",
        "interactive_vision",
    }
    assert scenarios["interactive_text"].model_id == "huggingface/smollm2-135m-instruct:q4_1"
    assert scenarios["interactive_vision"].model_id is None, "nothing local can see images"
    assert "vision" in scenarios["interactive_vision"].reason
    assert report.routing_quality_weight == engine.config.routing.quality_weight
    assert (report.routing_settle_after, report.routing_settled_width) == (1500, 0.25)
    assert report.spend is not None
    assert {m.id for m in report.speech.local_models} >= {"piper/en_us-joe-medium"}
    json.loads(report.model_dump_json())


def test_priors_show_in_health_with_their_source(isolated_home: Path) -> None:
    (isolated_home / "benchmark_priors.json").write_text(
        json.dumps([{"model_id": "qwen/qwen3-8b:q4_k_m", "overall_score": 0.7, "task_scores": {"code": 0.8}}])
    )
    report = InferenceEngine().model_health()
    (prior,) = report.benchmark_priors
    assert prior.model_name == "Qwen3-8B" and prior.task_scores == {"code": 0.8}
    assert prior.source_path == str(isolated_home / "benchmark_priors.json")


def test_profiles_export_import_round_trip(isolated_home: Path, tmp_path: Path) -> None:
    engine = InferenceEngine()
    engine.import_profiles(
        [
            {
                "model_id": "qwen/qwen3-4b:q4_k_m",
                "total_calls": 5,
                "success_count": 4,
                "fail_count": 1,
                "total_latency_ms": 500,
                "total_input_tokens": 10,
                "total_output_tokens": 20,
                "task_stats": {},
                "ema_quality": 0.6,
                "quality_per_1k_tokens": 0.0,
                "updated_at": 1,
            }
        ]
    )
    path = tmp_path / "outcome_profiles.json"
    assert engine.export_profiles_file(path) >= 1
    data = json.loads(path.read_text())
    row = next(p for p in data if p["model_id"] == "qwen/qwen3-4b:q4_k_m")
    assert row["total_calls"] == 5 and set(row) >= {"ema_quality", "task_stats", "quality_per_1k_tokens"}
    with pytest.raises(InvalidInput, match="import_profiles: qwen/qwen3-4b:q4_k_m has two profiles"):
        engine.import_profiles([row, {**row, "total_calls": 9, "success_count": 9, "fail_count": 0}])
    kept = next(p for p in engine.export_profiles() if p.model_id == row["model_id"])
    assert kept.total_calls == 5  # nothing of the refused file was taken
    # A file named like the old fixed temporary file is the user's: left alone. Exports running
    # at once each write a whole file (they shared "<name>.tmp" and failed with FileNotFoundError).
    mine = tmp_path / "outcome_profiles.json.tmp"
    mine.write_text("keep me")
    with ThreadPoolExecutor(4) as pool:
        assert all(n >= 1 for n in pool.map(lambda _: engine.export_profiles_file(path), range(24)))
    assert mine.read_text() == "keep me" and json.loads(path.read_text())
    assert sorted(p.name for p in tmp_path.glob("*profiles*")) == [
        "outcome_profiles.json",
        "outcome_profiles.json.tmp",
    ]
    with pytest.raises(InvalidInput, match="is a folder"):
        engine.export_profiles_file(tmp_path)
    with pytest.raises(InvalidInput, match="does not exist"):
        engine.export_profiles_file(tmp_path / "none" / "p.json")


def test_an_export_never_replaces_the_engines_own_files(isolated_home: Path, tmp_path: Path) -> None:
    """`car profiles export $CAR_HOME/state.db` replaced the live database with JSON, exit 0."""
    engine = InferenceEngine()
    db = isolated_home / "state.db"
    before = db.read_bytes()[:16]
    for own in (db, isolated_home / "config.toml"):
        with pytest.raises(InvalidInput, match="one of car's own files"):
            engine.export_profiles_file(own)
    link = tmp_path / "profiles.json"
    link.symlink_to(db)
    with pytest.raises(InvalidInput, match="one of car's own files"):
        engine.export_profiles_file(link)
    other = tmp_path / "other.db"
    other.write_bytes(db.read_bytes())
    with pytest.raises(InvalidInput, match="is an SQLite database"):
        engine.export_profiles_file(other)
    assert db.read_bytes()[:16] == before == b"SQLite format 3\x00"
    engine.close()


def test_health_shows_the_records_not_yet_written(isolated_home: Path) -> None:
    engine = InferenceEngine()
    # Writes that stall outside the store's own batch (a PostgreSQL store's reads take other
    # connections meanwhile; SQLite's one connection would hold them until the batch ends).
    keeper = engine.bookkeeper = Bookkeeper()
    stuck = threading.Event()
    keeper.start_writer()
    keeper.submit(stuck.wait, 10)  # the store hangs on this record
    keeper.submit(print, end="")  # and this one waits behind it
    deadline = time.monotonic() + 10
    while keeper.pending != 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)
    state = engine.model_health().state
    assert state is not None and state.pending == 1 and state.lag_s >= 0.05
    stuck.set()
    engine.close()
    assert (keeper.pending, keeper.lag_s) == (0, 0.0)


def test_a_state_table_dropped_by_hand_shows_in_the_report_which_still_answers(isolated_home: Path) -> None:
    """With the spend table gone the report raised (/v1/health: 500) and with another table gone
    it said the state was fine; now it answers, without spend, and `state.error` names the table."""
    import sqlite3

    engine = InferenceEngine(home=isolated_home)
    try:
        assert engine.model_health().state.error is None  # type: ignore[union-attr]
        with sqlite3.connect(isolated_home / "state.db") as conn:
            conn.execute("DROP TABLE spend")
        report = engine.model_health()
        assert report.spend is None
        assert report.state is not None and "spend" in (report.state.error or "")
    finally:
        engine.close()
