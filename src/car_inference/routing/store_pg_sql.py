"""PostgreSQL-only SQL of ``store_pg.py``: what ``car state migrate`` needs to copy rows in, and a
batch's counter changes merged into one statement per table (the schema and the counting
statements are ``store_sql``'s, shared with SQLite).

Times stay epoch seconds (double), so the tracker reads the same dicts from either store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .estimate import ALL
from .store_sql import COPY_COLUMNS

__all__ = [
    "COPY_COLUMNS",
    "COUNTER_TABLES",
    "add_counters",
    "insert_missing",
    "merge_counters",
    "present_rows",
]

# The tables of learned counters: ``car state migrate`` adds a file's rows to these (once per file).
COUNTER_TABLES = ("profiles", "task_stats")
_CALLS = {"profiles": "total_calls", "task_stats": "calls"}


def insert_missing(table: str) -> str:
    """Insert one row unless it is there already: by its key, or for feedback and spend (whose
    ids are per database) by its whole content, counted: a row the source has ``%(n)s`` times is
    inserted as often as the target has it fewer times. A second copy of the same rows adds nothing."""
    columns, key = COPY_COLUMNS[table]
    names = [c.strip() for c in columns.split(",")]
    values = ", ".join(f"%({n})s" for n in names)
    if key is not None:
        return f"INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT ({key}) DO NOTHING"
    same = " AND ".join(f"{n} = %({n})s" for n in names)
    return (
        f"INSERT INTO {table} ({columns}) SELECT {values} FROM generate_series(1,"
        f" %(n)s - (SELECT COUNT(*) FROM {table} WHERE {same}))"
    )


def add_counters(table: str) -> str:
    """Add one row of another store's counters (``car state migrate``) to this one's: sums and
    decayed sums add (two histories' evidence), the EMA is the two weighted by their calls, a
    row's ``updated_at`` the later and its ``joined_at`` the earlier; a row not there is inserted."""
    columns, key = COPY_COLUMNS[table]
    names = [c.strip() for c in columns.split(",")]
    keys = {k.strip() for k in (key or "").split(",")}
    n = _CALLS[table]
    special = {
        "ema_quality": f"CASE WHEN t.{n} + excluded.{n} > 0 THEN (t.ema_quality * t.{n}"
        f" + excluded.ema_quality * excluded.{n}) / (t.{n} + excluded.{n}) ELSE t.ema_quality END",
        "updated_at": "GREATEST(t.updated_at, excluded.updated_at)",
        "joined_at": "LEAST(t.joined_at, excluded.joined_at)",
    }
    sets = ", ".join(f"{c} = {special.get(c, f't.{c} + excluded.{c}')}" for c in names if c not in keys)
    values = ", ".join(f"%({c})s" for c in names)
    return f"INSERT INTO {table} AS t ({columns}) VALUES ({values}) ON CONFLICT ({key}) DO UPDATE SET {sets}"


def present_rows(table: str) -> str:
    """How many of the given keys (one array per key column, in order) ``table`` holds."""
    _, key = COPY_COLUMNS[table]
    keys = ", ".join(k.strip() for k in (key or "").split(","))
    arrays = ", ".join("%s::text[]" for _ in keys.split(","))
    return f"SELECT COUNT(*) FROM {table} JOIN unnest({arrays}) AS k({keys}) USING ({keys})"


# A batch's held-back counter changes (``store_pg._apply_deferred``), as one statement per table:
# each row they change is changed once, its k updates in order folded into the parameters
# (``merge_counters``). Sums add; an EMA or a decayed sum updated k times by x <- x*r + c_i is
# x*r^k + sum(r^(k-i) * c_i), so the row's old value is needed only once, in the statement.
_MERGE_PROFILES = """
WITH m AS (
    SELECT * FROM unnest(%(model_id)s::text[], %(k)s::bigint[], %(ok)s::bigint[], %(fail)s::bigint[],
                         %(latency)s::float8[], %(in_tok)s::bigint[], %(out_tok)s::bigint[],
                         %(q)s::float8[], %(e0)s::float8[], %(e)s::float8[], %(ak)s::float8[],
                         %(now)s::float8[])
        AS m(model_id, k, ok, fail, latency, in_tok, out_tok, q, e0, e, ak, now)
)
INSERT INTO profiles AS p (model_id, total_calls, success_count, fail_count, total_latency_ms,
                           total_input_tokens, total_output_tokens, quality_sum, ema_quality, updated_at)
SELECT model_id, k, ok, fail, latency, in_tok, out_tok, q, e0, now FROM m
ON CONFLICT (model_id) DO UPDATE SET
    ema_quality = (SELECT CASE WHEN p.total_calls = 0 THEN m.e0 ELSE p.ema_quality * m.ak + m.e END
                   FROM m WHERE m.model_id = excluded.model_id),
    total_calls = p.total_calls + excluded.total_calls,
    success_count = p.success_count + excluded.success_count,
    fail_count = p.fail_count + excluded.fail_count,
    total_latency_ms = p.total_latency_ms + excluded.total_latency_ms,
    total_input_tokens = p.total_input_tokens + excluded.total_input_tokens,
    total_output_tokens = p.total_output_tokens + excluded.total_output_tokens,
    quality_sum = p.quality_sum + excluded.quality_sum,
    updated_at = excluded.updated_at
"""

_MERGE_TASKS = """
WITH m AS (
    SELECT * FROM unnest(%(model_id)s::text[], %(key)s::text[], %(k)s::bigint[], %(ok)s::bigint[],
                         %(fail)s::bigint[], %(latency)s::float8[], %(q)s::float8[], %(ds)s::float8[],
                         %(dn)s::float8[], %(dk)s::float8[], %(e0)s::float8[], %(e)s::float8[],
                         %(ak)s::float8[], %(now)s::float8[], %(out_tok)s::bigint[], %(j)s::bigint[])
        AS m(model_id, key, k, ok, fail, latency, q, ds, dn, dk, e0, e, ak, now, out_tok, j)
)
INSERT INTO task_stats AS t (model_id, key, calls, success_count, fail_count, total_latency_ms,
                             quality_sum, decayed_sum, decayed_n, ema_quality, updated_at,
                             total_output_tokens, joined_at)
SELECT model_id, key, k, ok, fail, latency, q, ds, dn, e0, now, out_tok,
       COALESCE((SELECT b.calls FROM task_stats b WHERE b.model_id = '*' AND b.key = m.key), 0) + j
FROM m
ON CONFLICT (model_id, key) DO UPDATE SET
    (ema_quality, decayed_sum, decayed_n) = (
        SELECT CASE WHEN t.calls = 0 THEN m.e0 ELSE t.ema_quality * m.ak + m.e END,
               t.decayed_sum * m.dk + m.ds, t.decayed_n * m.dk + m.dn
        FROM m WHERE m.model_id = excluded.model_id AND m.key = excluded.key),
    calls = t.calls + excluded.calls,
    success_count = t.success_count + excluded.success_count,
    fail_count = t.fail_count + excluded.fail_count,
    total_latency_ms = t.total_latency_ms + excluded.total_latency_ms,
    quality_sum = t.quality_sum + excluded.quality_sum,
    total_output_tokens = t.total_output_tokens + excluded.total_output_tokens,
    updated_at = excluded.updated_at
"""


@dataclass(slots=True)
class _Fold:
    """One counter row's updates so far, in order (the upserts' arithmetic, ``store_sql``)."""

    k: int = 0
    ok: int = 0
    fail: int = 0
    latency: float = 0.0
    in_tok: int = 0
    out_tok: int = 0
    q: float = 0.0
    e0: float = 0.0  # the EMA from a new row (its first update sets it)
    e: float = 0.0  # what the updates add to an existing row's EMA times ak
    ak: float = 1.0
    ds: float = 0.0
    dn: float = 0.0
    dk: float = 1.0
    now: float = 0.0
    j: int = 0  # for a new row: its key's baseline updates earlier in the batch (``joined_at``)

    def add(self, row: dict[str, Any]) -> None:
        a, d, q = row["alpha"], row["decay"], row["q"]
        self.e0 = q if self.k == 0 else self.e0 * (1 - a) + a * q
        self.e, self.ak = self.e * (1 - a) + a * q, self.ak * (1 - a)
        self.ds, self.dn, self.dk = self.ds * d + q, self.dn * d + 1.0, self.dk * d
        self.k += 1
        self.ok += row["ok"]
        self.fail += row["fail"]
        self.latency += row["latency"]
        self.in_tok += row["in_tok"]
        self.out_tok += row["out_tok"]
        self.q += q
        self.now = row["now"]


_PROFILE_FIELDS = ("k", "ok", "fail", "latency", "in_tok", "out_tok", "q", "e0", "e", "ak", "now")
_TASK_FIELDS = ("k", "ok", "fail", "latency", "q", "ds", "dn", "dk", "e0", "e", "ak", "now", "out_tok", "j")


def merge_counters(
    rows: Iterable[tuple[str, dict[str, Any]]], profile_upsert: str, task_upsert: str
) -> list[tuple[str, dict[str, list[Any]]]] | None:
    """``rows`` (each counter upsert's statement and parameters, in the order they were made) as
    at most two statements, each changing every row once; None when a statement is neither upsert."""
    profiles: dict[str, _Fold] = {}
    tasks: dict[tuple[str, str], _Fold] = {}
    baselines: dict[str, int] = {}  # key -> its baseline row's updates so far
    for sql, row in rows:
        if sql == profile_upsert:
            profiles.setdefault(row["model_id"], _Fold()).add(row)
        elif sql == task_upsert:
            model_id, key = row["model_id"], row["key"]
            fold = tasks.get((model_id, key))
            if fold is None:
                fold = tasks[model_id, key] = _Fold(j=baselines.get(key, 0))
            fold.add(row)
            if model_id == ALL:
                baselines[key] = baselines.get(key, 0) + 1
        else:
            return None
    out: list[tuple[str, dict[str, list[Any]]]] = []
    if profiles:
        params: dict[str, list[Any]] = {"model_id": list(profiles)}
        params.update({f: [getattr(x, f) for x in profiles.values()] for f in _PROFILE_FIELDS})
        out.append((_MERGE_PROFILES, params))
    if tasks:
        params = {"model_id": [m for m, _ in tasks], "key": [key for _, key in tasks]}
        params.update({f: [getattr(x, f) for x in tasks.values()] for f in _TASK_FIELDS})
        out.append((_MERGE_TASKS, params))
    return out
