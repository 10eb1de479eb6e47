"""``car state migrate``: a SQLite ``state.db`` copied into the PostgreSQL store replicas share.

Idempotent: a row already in PostgreSQL is left as it is (profiles and task statistics by model
and key, traces by id, key statistics by key fingerprint, feedback and spend entries by their
whole content, as many times as the file has them), so running the copy again,
or after an interrupted run, adds nothing twice. Counters are copied, not added: a model whose
counters PostgreSQL has already (replicas that wrote before the copy) keeps them, and the report
says how many rows were already there. Run it before the replicas start writing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..config import redact_url
from ..errors import ConfigError
from ..keys_store import PgKeyStats
from .store import OutcomeStore
from .store_pg_sql import COPY_COLUMNS

__all__ = ["StateCopy", "TableCopy", "copy_sqlite_state"]


class TableCopy(BaseModel):
    table: str
    source_rows: int
    copied: int
    already_there: int  # in PostgreSQL before the copy: kept as they were


class StateCopy(BaseModel):
    source: str
    target: str
    schema_version: int
    tables: list[TableCopy]


def copy_sqlite_state(sqlite_path: Path, url: str, *, chunk_rows: int = 5000) -> StateCopy:
    """Copy every row of the SQLite store at ``sqlite_path`` into the PostgreSQL store at ``url``
    that is not there yet, ``chunk_rows`` rows per transaction (a large file is never held in
    memory whole; an interrupted copy, run again, goes on where it stopped)."""
    if not sqlite_path.is_file():
        raise ConfigError("no SQLite state to migrate (the file does not exist)", path=str(sqlite_path))
    OutcomeStore(sqlite_path).close()  # an older file is brought to the current schema first
    from .store_pg import PgOutcomeStore

    counts = dict.fromkeys(COPY_COLUMNS, 0)
    copied = dict.fromkeys(COPY_COLUMNS, 0)
    with PgOutcomeStore(url) as target:
        PgKeyStats(url).close()  # the key statistics' tables, as the replicas' key pools make them
        for table, rows in _read_sqlite(sqlite_path, chunk_rows):
            counts[table] += sum(r.get("n", 1) for r in rows)
            copied[table] += target.insert_missing({table: rows})[table]
        version = target.schema_version
    return StateCopy(
        source=str(sqlite_path),
        target=redact_url(url),
        schema_version=version,
        tables=[_table_copy(t, counts[t], copied[t]) for t in COPY_COLUMNS],
    )


def _table_copy(table: str, source_rows: int, copied: int) -> TableCopy:
    return TableCopy(table=table, source_rows=source_rows, copied=copied, already_there=source_rows - copied)


def _read_sqlite(path: Path, chunk_rows: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Each table's rows, ``chunk_rows`` at a time, tables in ``COPY_COLUMNS`` order."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, (columns, key) in COPY_COLUMNS.items():
            if table not in present:  # key_stats: only where a key pool ran
                continue
            if key is not None:
                cursor = conn.execute(f"SELECT {columns} FROM {table}")
            else:  # identical entries (two equal spends in one instant) are counted, not merged
                cursor = conn.execute(f"SELECT {columns}, COUNT(*) AS n FROM {table} GROUP BY {columns}")
            while rows := cursor.fetchmany(chunk_rows):
                yield table, [dict(r) for r in rows]
    finally:
        conn.close()
