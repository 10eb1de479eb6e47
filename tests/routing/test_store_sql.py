"""The store's SQL on its own: the schema builds, and the upserts count in SQL (so processes add)."""

from __future__ import annotations

import sqlite3

from car_inference.routing.store_sql import PROFILE_UPSERT, SCHEMA, TASK_UPSERT

PARAMS = {
    "model_id": "p/m", "ok": 1, "fail": 0, "latency": 100.0, "in_tok": 10, "out_tok": 5, "q": 1.0,
    "r": 0.2, "now": 1.0, "alpha": 0.1, "decay": 0.5,
}  # fmt: skip


def test_schema_builds_and_upserts_add_up() -> None:
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"profiles", "task_stats", "traces", "feedback", "spend"} <= tables
    for quality in (1.0, 0.0):
        db.execute(PROFILE_UPSERT, {**PARAMS, "q": quality})
        db.execute(TASK_UPSERT, {**PARAMS, "q": quality, "key": "code"})
    calls, latency, quality_sum = db.execute(
        "SELECT total_calls, total_latency_ms, quality_sum FROM profiles WHERE model_id = 'p/m'"
    ).fetchone()
    assert (calls, latency, quality_sum) == (2, 200.0, 1.0)
    decayed_sum, decayed_n = db.execute(
        "SELECT decayed_sum, decayed_n FROM task_stats WHERE model_id = 'p/m' AND key = 'code'"
    ).fetchone()
    assert (decayed_sum, decayed_n) == (0.5, 1.5)  # 1.0 decayed by 0.5, then + 0.0; n: 1 * 0.5 + 1
