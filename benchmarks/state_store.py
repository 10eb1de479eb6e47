"""What writing one outcome costs the state store, PostgreSQL against SQLite and a bare floor.

The engine's writer records each answer as ``record_trace`` (the trace, its quick-retry lookup and
the counters of its model and baseline rows) plus ``add_spend``, ``--batch`` records per
``batch()`` transaction, as ``car serve``'s writer thread does. Measured in one run, rounds
alternating, min / median / max of the milliseconds per outcome:

- ``sqlite``: the embedded ``OutcomeStore`` (``state.db``);
- ``postgresql``: ``PgOutcomeStore`` on a fresh database (each write its own savepoint, the batch
  under the fleet's write lock, pipelined);
- ``floor``: bare psycopg writing the same rows with the same statements, the whole batch pipelined
  in one transaction: no savepoints, no lookup, no lock. What any PostgreSQL store must pay.

``--writers N`` (N > 1) also runs N processes writing to the PostgreSQL store at once and prints
the outcomes per second of all of them together: counter writes take the advisory write lock in
turn, so this is the fleet's ceiling on recorded outcomes.

    .venv/bin/python benchmarks/state_store.py [--outcomes 2000] [--rounds 5] [--writers 3] \\
        [--postgres-admin-url postgresql://root@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from car_inference.routing.store import OutcomeStore
from car_inference.routing.store_base import EMA_ALPHA, QUALITY_DECAY, TraceRow, baseline_rows, stat_keys
from car_inference.routing.store_pg import PgOutcomeStore
from car_inference.routing.store_sql import dialect

MODELS = [f"bench/m{i}" for i in range(7)]
SQL = dialect("postgresql")


def _row(k: int) -> TraceRow:
    # Half the requests templated (their counters go under the template), as applications send them.
    cluster = f"latin-mc|medium/tpl{k % 3}" if k % 2 else "latin-mc|medium"
    return TraceRow(
        uuid.uuid4().hex, MODELS[k % 7], "generate", "reasoning", cluster, "thompson",
        uuid.uuid4().hex[:16], time.time(),
    )  # fmt: skip


def store_writes(store: Any, outcomes: int, batch: int) -> float:
    """Milliseconds per outcome through the store's own methods."""
    start = time.perf_counter()
    for i in range(0, outcomes, batch):
        with store.batch():
            for k in range(i, min(i + batch, outcomes)):
                store.record_trace(
                    _row(k), success=k % 3 != 0, latency_ms=500.0, input_tokens=100, output_tokens=12,
                    retry_window_s=30.0,
                )  # fmt: skip
                store.add_spend("bench", MODELS[k % 7], 0.0001)
    return (time.perf_counter() - start) / outcomes * 1e3


_INSERT_TRACE = SQL.q(
    "INSERT INTO traces (trace_id, model_id, task, family, cluster, reason, prompt_hash, started_at,"
    " outcome, completed_at, latency_ms, input_tokens, output_tokens, base, quality)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SPEND = SQL.q("INSERT INTO spend (ts, provider, model_id, usd) VALUES (?, ?, ?, ?)")


def floor_writes(url: str, outcomes: int, batch: int) -> float:
    """The same rows, bare: each batch's statements pipelined in one transaction."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        for i in range(0, outcomes, batch):
            with conn.pipeline(), conn.transaction():
                for k in range(i, min(i + batch, outcomes)):
                    r, ok, now = _row(k), k % 3 != 0, time.time()
                    q = float(ok)
                    conn.execute(_INSERT_TRACE, (
                        r.trace_id, r.model_id, r.task, r.family, r.cluster, r.reason, r.prompt_hash,
                        r.started_at, "success" if ok else "failure", now, 500.0, 100, 12, q, q,
                    ))  # fmt: skip
                    params = {
                        "model_id": r.model_id, "ok": int(ok), "fail": int(not ok), "latency": 500.0,
                        "in_tok": 100, "out_tok": 12, "q": q, "now": now, "alpha": EMA_ALPHA,
                        "decay": QUALITY_DECAY,
                    }  # fmt: skip
                    conn.execute(SQL.profile_upsert, params)
                    rows = [{**params, "key": key} for key in stat_keys(r.family, r.cluster)]
                    base = baseline_rows(r.family, r.cluster)
                    rows += [{**params, "model_id": m, "key": key} for m, key in base]
                    conn.cursor().executemany(SQL.task_upsert, rows)
                    conn.execute(_INSERT_SPEND, (now, "bench", r.model_id, 0.0001))
        return (time.perf_counter() - start) / outcomes * 1e3


def _writer(url: str, outcomes: int, batch: int, go: Any) -> None:
    with PgOutcomeStore(url) as store:
        go.wait()
        store_writes(store, outcomes, batch)


def fleet_rate(url: str, writers: int, outcomes: int, batch: int) -> float:
    """Outcomes per second, all of ``writers`` processes writing at once."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, outcomes, batch, go)) for _ in range(writers)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # every process imported and connected
    start = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a writer process failed (exit {p.exitcode})")
    return writers * outcomes / (time.perf_counter() - start)


def _delay_proxy(listen_port: int, target_port: int, delay_s: float, ready: Any) -> None:
    """Forward 127.0.0.1:listen_port to target_port, each chunk ``delay_s`` late in both
    directions (a database on another machine); order kept, chunks in flight overlap. Threads and
    ``time.sleep``: an event loop's timers round sub-millisecond delays up to a millisecond."""
    import queue
    import threading

    def direction(src: socket.socket, dst: socket.socket) -> None:
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def send() -> None:
            while True:
                due, data = chunks.get()
                if not data:
                    dst.close()
                    return
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)

        threading.Thread(target=send, daemon=True).start()
        while data := src.recv(65536):
            chunks.put((time.monotonic() + delay_s, data))
        chunks.put((0.0, b""))

    listener = socket.create_server(("127.0.0.1", listen_port))
    ready.set()
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", target_port))
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=direction, args=(client, server), daemon=True).start()
        threading.Thread(target=direction, args=(server, client), daemon=True).start()


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--outcomes", type=int, default=2000, help="outcomes per round and store")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="outcomes per batch() transaction")
    parser.add_argument("--writers", type=int, default=3, help="processes writing at once (1: skip)")
    parser.add_argument(
        "--rtt-ms", type=float, default=0.0,
        help="reach PostgreSQL through a proxy adding this round trip (a database on another machine)",
    )  # fmt: skip
    parser.add_argument("--postgres-admin-url", default="postgresql://root@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    db = f"car_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {db}")  # a name made here
    admin_url = urlsplit(args.postgres_admin_url)
    proxy = None
    if args.rtt_ms > 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        target = admin_url.port or 5432
        proxy = ctx.Process(target=_delay_proxy, args=(port, target, args.rtt_ms / 2000, ready), daemon=True)
        proxy.start()
        ready.wait(30)
        admin_url = admin_url._replace(netloc=f"{admin_url.netloc.rsplit(':', 1)[0]}:{port}")
        print(f"PostgreSQL through a proxy adding {args.rtt_ms} ms per round trip")
    url = urlunsplit(admin_url._replace(path=f"/{db}"))
    try:
        with tempfile.TemporaryDirectory() as tmp, PgOutcomeStore(url) as pg:
            sqlite = OutcomeStore(Path(tmp) / "state.db")
            runs: dict[str, Callable[[int], float]] = {
                "sqlite": lambda n: store_writes(sqlite, n, args.batch),
                "postgresql": lambda n: store_writes(pg, n, args.batch),
                "floor": lambda n: floor_writes(url, n, args.batch),
            }
            for run in runs.values():  # warm-up: connections, prepared statements, pages
                run(200)
            ms: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    ms[name].append(run(args.outcomes))
            sqlite.close()
        print(f"ms per outcome (record_trace + add_spend, batches of {args.batch}), min / median / max"
              f" of {args.rounds} rounds of {args.outcomes}:")  # fmt: skip
        for name, values in ms.items():
            print(f"  {name:11s} {_spread(values)}")
        ratio = [p / f for p, f in zip(ms["postgresql"], ms["floor"], strict=True)]
        print(f"  postgresql / floor: {_spread(ratio, '{:.2f}')}")
        ratio = [p / s for p, s in zip(ms["postgresql"], ms["sqlite"], strict=True)]
        print(f"  postgresql / sqlite: {_spread(ratio, '{:.1f}')}")
        if args.writers > 1:
            rates = [fleet_rate(url, args.writers, args.outcomes, args.batch) for _ in range(3)]
            one = 1000 / statistics.median(ms["postgresql"])
            print(f"{args.writers} processes writing at once: {_spread(rates, '{:.0f}')} outcomes/s in all"
                  f" (one writer alone: {one:.0f}/s)")  # fmt: skip
    finally:
        if proxy is not None:
            proxy.kill()
        with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


if __name__ == "__main__":
    main()
