"""``car state migrate``: a SQLite ``state.db`` copied into the PostgreSQL store replicas share.

The learned counters (``COUNTER_TABLES``: profiles and task statistics) of a file are *added* to
those PostgreSQL has (another machine's file copied before, or replicas that wrote already), once:
in one transaction with the file's store id (``StoreBase.store_id``) recorded in
``merged_stores``. Sums and decayed sums add, EMAs are weighted by calls (``add_counters``). Once
a file's id is recorded, a later copy of it adds only the counter rows not there yet (a model
first seen since).

Every other row is copied unless already there: traces by id, key statistics by key
fingerprint, feedback and spend entries by their whole content, as many times as the file has
them. So running the copy again, or after an interrupted run, adds nothing twice. Outcomes a
file gained after its first copy reach PostgreSQL as traces, not as counts: copy a machine's file
when it stops writing to it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..errors import ConfigError
from ..keys_store import PgKeyStats
from ..redaction import redact_url
from .store import OutcomeStore
from .store_pg_sql import COPY_COLUMNS, COUNTER_TABLES

__all__ = ["StateCopy", "TableCopy", "copy_sqlite_state"]


class TableCopy(BaseModel):
    table: str
    source_rows: int
    copied: int  # rows not in PostgreSQL before
    already_there: int  # in PostgreSQL before the copy: kept as they were
    added_to: int = 0  # counter rows in PostgreSQL before, to which this file's were added


class StateCopy(BaseModel):
    source: str
    target: str
    server: str = ""  # the target as libpq resolved it: user@host:port/database
    schema_version: int
    tables: list[TableCopy]
    # False: an earlier copy of this file (its store id) added its counters; they were not again.
    counters_added: bool = True


def copy_sqlite_state(sqlite_path: Path, url: str, *, chunk_rows: int = 5000) -> StateCopy:
    """Copy every row of the SQLite store at ``sqlite_path`` into the PostgreSQL store at ``url``
    that is not there yet, ``chunk_rows`` rows per transaction (a large file is never held in
    memory whole; an interrupted copy, run again, goes on where it stopped)."""
    if not sqlite_path.is_file():
        raise ConfigError("no SQLite state to migrate (the file does not exist)", path=str(sqlite_path))
    with OutcomeStore(sqlite_path) as source:  # an older file is brought to the current schema first
        source_id = source.store_id()
    from .store_pg import PgOutcomeStore

    counts = dict.fromkeys(COPY_COLUMNS, 0)
    copied = dict.fromkeys(COPY_COLUMNS, 0)
    added = dict.fromkeys(COPY_COLUMNS, 0)

    def tally(
        chunks: Iterator[tuple[str, list[dict[str, Any]]]],
    ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        for table, rows in chunks:
            counts[table] += sum(r.get("n", 1) for r in rows)
            yield table, rows

    with PgOutcomeStore(url) as target:
        PgKeyStats(url).close()  # the key statistics' tables, as the replicas' key pools make them
        merged = target.add_counters(
            source_id, str(sqlite_path), tally(_read_sqlite(sqlite_path, chunk_rows, COUNTER_TABLES))
        )
        for table, (inserted, added_to) in (merged or {}).items():
            copied[table], added[table] = inserted, added_to
        rest = tuple(t for t in COPY_COLUMNS if merged is None or t not in merged)
        for table, rows in tally(_read_sqlite(sqlite_path, chunk_rows, rest)):
            copied[table] += target.insert_missing({table: rows})[table]
        version, server = target.schema_version, target.server()
    return StateCopy(
        source=str(sqlite_path),
        target=redact_url(url),
        server=server,
        schema_version=version,
        tables=[
            TableCopy(
                table=t,
                source_rows=counts[t],
                copied=copied[t],
                added_to=added[t],
                already_there=counts[t] - copied[t] - added[t],
            )
            for t in COPY_COLUMNS
        ],
        counters_added=merged is not None,
    )


def _read_sqlite(
    path: Path, chunk_rows: int, tables: Iterable[str] = tuple(COPY_COLUMNS)
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Each of ``tables``' rows, ``chunk_rows`` at a time, tables in ``COPY_COLUMNS`` order."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, (columns, key) in COPY_COLUMNS.items():
            if table not in tables or table not in present:  # key_stats: only where a key pool ran
                continue
            if key is not None:
                cursor = conn.execute(f"SELECT {columns} FROM {table}")
            else:  # identical entries (two equal spends in one instant) are counted, not merged
                cursor = conn.execute(f"SELECT {columns}, COUNT(*) AS n FROM {table} GROUP BY {columns}")
            while rows := cursor.fetchmany(chunk_rows):
                yield table, [dict(r) for r in rows]
    finally:
        conn.close()
