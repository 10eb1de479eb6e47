"""The spend ledger: what rolling it up buys, and what recording a paid call costs with limits set.

Each paid call adds a spend entry; the spend limits read the day's and the month's totals per
provider (at start, and when a new UTC day begins). ``compact_old_spend`` (run by ``car serve``
hourly and by ``car state prune``) rolls every past day's entries into one per day, provider and
model. This loads ``--entries`` entries spread over the last ``--days`` days (10 models of two
providers), reads the month's totals (min / median / max of ``--reads``), rolls the ledger up,
reads again, and prints the ratio. The floor for the read is the same query on the rolled-up rows.
Then it adds ``--today`` entries dated today and times ``SpendControl.record`` with a monthly
limit set (``--calls`` calls, each writing its entry; the totals re-read at most every second),
against the store's ``add_spend`` alone (the floor: the write every record makes).

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

from car_inference.config import SpendSettings
from car_inference.routing.spend import SpendControl
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


def _records(store: Any, calls: int) -> tuple[list[float], list[float], list[float]]:
    """Milliseconds per ``SpendControl.record`` (limits set) and per bare ``add_spend``, alternating,
    and per re-read of the totals (what a record pays once a second)."""
    spend = SpendControl(SpendSettings(monthly_usd=1e9), store)
    record, floor = [], []
    reread = []
    for _ in range(5):
        start = time.perf_counter()
        spend.reload()
        reread.append((time.perf_counter() - start) * 1000)
    for _ in range(calls):
        start = time.perf_counter()
        spend.record("openai", "openai/m0", 0.001)
        record.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        store.add_spend("openai", "openai/m0", 0.001)
        floor.append((time.perf_counter() - start) * 1000)
    return record, floor, reread


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=3_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--today", type=int, default=100_000, help="entries dated today")
    parser.add_argument("--calls", type=int, default=300)
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
            today = now // DAY_S * DAY_S
            step = (now - today) / args.today
            _load(
                store,
                [(today + i * step, *models[i % len(models)], 0.001) for i in range(args.today)],
                url is not None,
            )
            record, floor, reread = _records(store, args.calls)
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
    print(f"  with {args.today:,} entries today, ms per paid call (min / median / max of {args.calls}):")
    print(f"    SpendControl.record, monthly limit set: {_spread(record, '{:.3f}')}")
    print(f"    add_spend alone (floor):                {_spread(floor, '{:.3f}')}")
    print(f"    record / floor (median): {statistics.median(record) / statistics.median(floor):.2f}x")
    print(f"    the totals' re-read (at most once a second; every record paid it before): {_spread(reread)}")


if __name__ == "__main__":
    main()
