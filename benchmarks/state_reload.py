"""What a replica's reload of the learned state costs: a full read against a read of the changes.

In a fleet each replica reloads the learned router state when another announces a change, up to
four times a second (``routing/coord.py``). ``OutcomeTracker.reload`` reads everything (every
``task_stats`` row, each model's latency window) on its first call and at most every 30 s, and in
between only the profiles and the rows updated since the newest it has seen (``routing/reload.py``).
This fills a fresh PostgreSQL database as a fleet with ``--models`` models would after a while
(``--keys`` contexts each, ``--traces`` traces), then times, alternating, a full reload (the floor:
what every reload cost before) and a reload after ``--changed`` rows were written by another
replica ``--interval-ms`` before (so rows written within the reader's slack are read again, as
in a fleet that stays busy); wall and thread-CPU milliseconds, min / median / max of
``--rounds``.

    .venv/bin/python benchmarks/state_reload.py [--models 50] [--keys 110] [--traces 200000] \\
        [--changed 300] [--interval-ms 250] [--postgres-admin-url postgresql://root@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg

from car_inference.config import RoutingSettings
from car_inference.routing.outcomes import OutcomeTracker
from car_inference.routing.store_pg import PgOutcomeStore

_STATS = (
    "INSERT INTO task_stats (model_id, key, calls, success_count, fail_count, total_latency_ms,"
    " quality_sum, decayed_sum, decayed_n, ema_quality, updated_at, total_output_tokens)"
    " SELECT 'bench/m' || (i %% %(models)s), 'family' || (i / %(models)s), 10, 9, 1, 900.0, 7.5, 6.0,"
    " 8.0, 0.7, %(t)s, 1200 FROM generate_series(0, %(rows)s - 1) AS i"
)
_TRACES = (
    "INSERT INTO traces (trace_id, model_id, task, family, reason, started_at, outcome, completed_at,"
    " latency_ms, base, quality)"
    " SELECT 't' || i, 'bench/m' || (i %% %(models)s), 'generate', 'chat', 'bench', %(t)s + i * 0.001,"
    " 'success', %(t)s + i * 0.001 + 0.5, 200 + i %% 300, 1, 1 FROM generate_series(0, %(n)s - 1) AS i"
)
_CHANGE = (
    "UPDATE task_stats SET calls = calls + 1, updated_at = %s"
    " WHERE ctid = ANY(ARRAY(SELECT ctid FROM task_stats ORDER BY random() LIMIT %s))"
)


def _spread(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in (min(values), statistics.median(values), max(values)))


def _timed(fn: object) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--keys", type=int, default=110, help="contexts (task_stats keys) per model")
    parser.add_argument("--traces", type=int, default=200_000)
    parser.add_argument(
        "--changed", type=int, default=300, help="rows another replica writes between reloads"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--interval-ms", type=float, default=250, help="between reloads (coord.py)")
    parser.add_argument("--postgres-admin-url", default="postgresql://root@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    db = f"car_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {db}")  # a name made here
    url = urlunsplit(urlsplit(args.postgres_admin_url)._replace(path=f"/{db}"))
    try:
        with PgOutcomeStore(url) as store:
            now = time.time()
            with psycopg.connect(url, autocommit=True) as conn:
                models = "SELECT 'bench/m' || i FROM generate_series(0, %s - 1) AS i"
                conn.execute(f"INSERT INTO profiles (model_id) {models}", (args.models,))
                rows = args.models * args.keys
                conn.execute(_STATS, {"models": args.models, "rows": rows, "t": now - 3600})
                conn.execute(_TRACES, {"models": args.models, "n": args.traces, "t": now - 86_400})
                conn.execute("ANALYZE")
            tracker = OutcomeTracker(store, RoutingSettings())
            full: list[tuple[float, float]] = []
            changes: list[tuple[float, float]] = []
            with psycopg.connect(url, autocommit=True) as other:
                tracker.reload(full=True)
                for _ in range(args.rounds):  # as in a busy fleet: a reload every interval
                    other.execute(_CHANGE, (time.time(), args.changed))
                    time.sleep(args.interval_ms / 1000)
                    changes.append(_timed(tracker.reload))
                    full.append(_timed(lambda: tracker.reload(full=True)))
    finally:
        with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {db}")
    print(f"PostgreSQL: {args.models} models, {rows:,} task_stats rows, {args.traces:,} traces;"
          f" ms per reload, min / median / max of {args.rounds}:")  # fmt: skip
    for name, got in (("full read", full), (f"{args.changed} rows changed", changes)):
        print(f"  {name:18s} wall {_spread([w for w, _ in got])}   thread CPU {_spread([c for _, c in got])}")
    ratio = statistics.median(w for w, _ in full) / statistics.median(w for w, _ in changes)
    print(f"  full / changes (median wall): {ratio:.1f}x")


if __name__ == "__main__":
    main()
