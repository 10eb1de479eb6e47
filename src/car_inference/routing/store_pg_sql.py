"""PostgreSQL-only SQL of ``store_pg.py``: what ``car state migrate`` needs to copy rows in
(the schema and the counting statements are ``store_sql``'s, shared with SQLite).

Times stay epoch seconds (double), so the tracker reads the same dicts from either store.
"""

from __future__ import annotations

from .store_sql import COPY_COLUMNS

__all__ = ["COPY_COLUMNS", "insert_missing"]


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
