"""What rolling the spend ledger up buys: the month's totals read before and after, and its cost.

Each paid call adds a spend entry; the spend limits read the day's and the month's totals per
provider (at start, and when a new UTC day begins). ``compact_old_spend`` (run by ``car serve``
hourly and by ``car state prune``) rolls every past day's entries into one per day, provider and
model. This loads ``--entries`` entries spread over the last ``--days`` days (10 models of two
providers), reads the month's totals (min / median / max of ``--reads``), rolls the ledger up,
reads again, and prints the ratio. The floor for the read is the same query on the rolled-up rows.

    .venv/bin/python benchmarks/spend_ledger.py [--entries 3000000] [--days 30] \\
        [--postgres-admin-url postgresql://root@127.0.0.1:5432/postgres]   # (default: SQLite)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from car_inference.routing.store_api import compact_old_spend, open_store
from car_inference.routing.store_base import DAY_S

PROVIDERS = ("openai", "anthropic")


def _load(store: Any, rows: list[tuple[float, str, str, float]], postgres: bool) -> None:
    """The entries as the store's ``add_spend`` writes them, in bulk (COPY / executemany)."""
    if postgres:
        sql = "COPY spend (ts, provider, model_id, usd) FROM STDIN"
        with store._pool.connection() as conn, conn.cursor() as cur, cur.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)
        return
    with store._tx() as conn:
        conn.executemany("INSERT INTO spend (ts, provider, model_id, usd) VALUES (?, ?, ?, ?)", rows)


def _reads(store: Any, since: float, times: int) -> list[float]:
    out = []
    for _ in range(times):
        start = time.perf_counter()
        store.spend_by_provider(since)
        out.append((time.perf_counter() - start) * 1000)
    return out


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=3_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--postgres-admin-url", help="measure PostgreSQL (a new database) instead of SQLite")
    args = parser.parse_args()

    url, db = None, ""
    if args.postgres_admin_url:
        db = f"car_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {db}")  # a name made here
        url = urlunsplit(urlsplit(args.postgres_admin_url)._replace(path=f"/{db}"))
    now = time.time()
    month0 = (now // DAY_S - args.days) * DAY_S
    models = [(p, f"{p}/m{i}") for p in PROVIDERS for i in range(5)]
    step = args.days * DAY_S / args.entries
    rows = [(month0 + 0.5 + i * step, *models[i % len(models)], 0.001) for i in range(args.entries)]
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(url, Path(tmp) / "state.db")
        try:
            _load(store, rows, url is not None)
            before = _reads(store, month0, args.reads)
            start = time.perf_counter()
            rolled = compact_old_spend(store, now=now)
            took = time.perf_counter() - start
            after = _reads(store, month0, args.reads)
            if url is not None:  # the deleted rows' space, as autovacuum would give it back
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("VACUUM spend")
                vacuumed = _reads(store, month0, args.reads)
        finally:
            store.close()
            if url is not None:
                with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
                    admin.execute(f"DROP DATABASE {db}")
    print(f"{'PostgreSQL' if url else 'SQLite'}: {args.entries:,} entries over {args.days} days")
    print(f"  month's totals, ms (min / median / max of {args.reads}): before {_spread(before)},"
          f" after {_spread(after, '{:.3f}')}")  # fmt: skip
    if url is not None:
        print(f"  after VACUUM (autovacuum's work): {_spread(vacuumed, '{:.3f}')}")
        after = vacuumed
    print(f"  before / after (median): {statistics.median(before) / statistics.median(after):,.0f}x")
    print(f"  rolled up {rolled:,} entries in {took:.1f} s ({took / max(rolled, 1) * 1e6:.1f} µs each)")


if __name__ == "__main__":
    main()
