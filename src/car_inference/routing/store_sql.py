"""The SQL of the outcome store (``store.py``): the schema and the two counting upserts.

The upserts do the counting arithmetic in SQL, inside the writer's transaction, so that processes
sharing one ``state.db`` add to each other's counts instead of overwriting them.
"""

__all__ = ["MIGRATIONS", "PROFILE_UPSERT", "SCHEMA", "TASK_UPSERT"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    model_id TEXT PRIMARY KEY,
    total_calls INTEGER NOT NULL DEFAULT 0,
    success_count INTEGER NOT NULL DEFAULT 0,
    fail_count INTEGER NOT NULL DEFAULT 0,
    total_latency_ms REAL NOT NULL DEFAULT 0,
    total_input_tokens INTEGER NOT NULL DEFAULT 0,
    total_output_tokens INTEGER NOT NULL DEFAULT 0,
    quality_sum REAL NOT NULL DEFAULT 0,
    resid_sum REAL NOT NULL DEFAULT 0,
    ema_quality REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS task_stats (
    model_id TEXT NOT NULL,
    key TEXT NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0,
    success_count INTEGER NOT NULL DEFAULT 0,
    fail_count INTEGER NOT NULL DEFAULT 0,
    total_latency_ms REAL NOT NULL DEFAULT 0,
    quality_sum REAL NOT NULL DEFAULT 0,
    decayed_sum REAL NOT NULL DEFAULT 0,
    decayed_n REAL NOT NULL DEFAULT 0,
    resid_sum REAL NOT NULL DEFAULT 0,
    ema_quality REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL DEFAULT 0,
    total_output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model_id, key)
);
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    task TEXT NOT NULL,
    family TEXT NOT NULL,
    cluster TEXT,
    reason TEXT,
    prompt_hash TEXT,
    started_at REAL NOT NULL,
    outcome TEXT NOT NULL DEFAULT 'pending',
    completed_at REAL,
    latency_ms REAL,
    ttft_ms REAL,
    input_tokens INTEGER,
    output_tokens INTEGER,
    error_class TEXT,
    error TEXT,
    base REAL,
    penalty REAL NOT NULL DEFAULT 0,
    feedback REAL,
    quality REAL
);
CREATE INDEX IF NOT EXISTS traces_by_prompt ON traces (prompt_hash, started_at);
CREATE INDEX IF NOT EXISTS traces_by_model ON traces (model_id, completed_at);
CREATE INDEX IF NOT EXISTS traces_by_start ON traces (started_at);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    trace_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_trace ON feedback (trace_id);
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    provider TEXT NOT NULL,
    model_id TEXT NOT NULL,
    usd REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_by_ts ON spend (ts);
"""

PROFILE_UPSERT = """
INSERT INTO profiles (model_id, total_calls, success_count, fail_count, total_latency_ms, total_input_tokens,
                      total_output_tokens, quality_sum, resid_sum, ema_quality, updated_at)
VALUES (:model_id, 1, :ok, :fail, :latency, :in_tok, :out_tok, :q, :r, :q, :now)
ON CONFLICT (model_id) DO UPDATE SET
    ema_quality = CASE WHEN total_calls = 0 THEN excluded.ema_quality
                       ELSE ema_quality + :alpha * (excluded.ema_quality - ema_quality) END,
    total_calls = total_calls + 1,
    success_count = success_count + :ok,
    fail_count = fail_count + :fail,
    total_latency_ms = total_latency_ms + :latency,
    total_input_tokens = total_input_tokens + :in_tok,
    total_output_tokens = total_output_tokens + :out_tok,
    quality_sum = quality_sum + :q,
    resid_sum = resid_sum + :r,
    updated_at = :now
"""

TASK_UPSERT = """
INSERT INTO task_stats (model_id, key, calls, success_count, fail_count, total_latency_ms,
                        quality_sum, decayed_sum, decayed_n, resid_sum, ema_quality, updated_at,
                        total_output_tokens)
VALUES (:model_id, :key, 1, :ok, :fail, :latency, :q, :q, 1, :r, :q, :now, :out_tok)
ON CONFLICT (model_id, key) DO UPDATE SET
    ema_quality = CASE WHEN calls = 0 THEN excluded.ema_quality
                       ELSE ema_quality + :alpha * (excluded.ema_quality - ema_quality) END,
    calls = calls + 1,
    success_count = success_count + :ok,
    fail_count = fail_count + :fail,
    total_latency_ms = total_latency_ms + :latency,
    quality_sum = quality_sum + :q,
    decayed_sum = decayed_sum * :decay + :q,
    decayed_n = decayed_n * :decay + 1,
    resid_sum = resid_sum * :decay + :r,
    total_output_tokens = total_output_tokens + :out_tok,
    updated_at = :now
"""

# Statements that bring a database of schema version N - 1 to N (``SCHEMA`` creates the latest).
MIGRATIONS = {
    # 2: answer lengths per context, for expected costs
    2: "ALTER TABLE task_stats ADD COLUMN total_output_tokens INTEGER NOT NULL DEFAULT 0",
}
