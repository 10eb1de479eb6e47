"""The stores' SQL on its own: the schema builds in SQLite, the upserts count in SQL (so processes
add), and the PostgreSQL dialect is the same statements with psycopg's parameters."""

from __future__ import annotations

import sqlite3

from car_inference.routing.store_sql import dialect, schema_text

PARAMS = {
    "model_id": "p/m", "ok": 1, "fail": 0, "latency": 100.0, "in_tok": 10, "out_tok": 5, "q": 1.0,
    "now": 1.0, "alpha": 0.1, "decay": 0.5,
}  # fmt: skip


def test_schema_builds_and_upserts_add_up() -> None:
    sql = dialect("sqlite")
    db = sqlite3.connect(":memory:")
    for statement in sql.schema:
        db.execute(statement)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"profiles", "task_stats", "traces", "feedback", "spend"} <= tables
    for quality in (1.0, 0.0):
        db.execute(sql.profile_upsert, {**PARAMS, "q": quality})
        db.execute(sql.task_upsert, {**PARAMS, "q": quality, "key": "code"})
    calls, latency, quality_sum = db.execute(
        "SELECT total_calls, total_latency_ms, quality_sum FROM profiles WHERE model_id = 'p/m'"
    ).fetchone()
    assert (calls, latency, quality_sum) == (2, 200.0, 1.0)
    decayed_sum, decayed_n = db.execute(
        "SELECT decayed_sum, decayed_n FROM task_stats WHERE model_id = 'p/m' AND key = 'code'"
    ).fetchone()
    assert (decayed_sum, decayed_n) == (0.5, 1.5)  # 1.0 decayed by 0.5, then + 0.0; n: 1 * 0.5 + 1


def test_postgres_dialect_differs_only_in_words_and_parameters() -> None:
    lite, pg = dialect("sqlite"), dialect("postgresql")
    assert "DOUBLE PRECISION" in schema_text("postgresql") and "DOUBLE" not in schema_text("sqlite")
    assert ":ok" in lite.profile_upsert and "%(ok)s" in pg.profile_upsert and ":ok" not in pg.profile_upsert
    assert "excluded.ema_quality" in pg.profile_upsert  # names with dots are not parameters
    assert "LEAST(" in pg.adjust_task and "MIN(" in lite.adjust_task
    assert (
        pg.q("SELECT * FROM t WHERE a = ? AND b LIKE '5%'") == "SELECT * FROM t WHERE a = %s AND b LIKE '5%%'"
    )
    assert pg.q("SELECT x::text FROM t WHERE k = :key") == "SELECT x::text FROM t WHERE k = %(key)s"
    assert len(lite.schema) == len(pg.schema)
    assert lite.migrations.keys() == pg.migrations.keys() == {2, 3, 4, 5}
