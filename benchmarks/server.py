"""What `car serve` adds in front of an OpenAI-compatible upstream, measured in one run.

Three processes on loopback: a minimal OpenAI-compatible upstream (keep-alive HTTP/1.1, a fixed
answer, streamed or not), our server in front of it (the upstream is an ``[[endpoints]]`` model,
named explicitly, so every request still goes through the router, the outcome store and the
official ``openai`` SDK), and this client (httpx). The same chat completion request goes to the
upstream directly and through the server:

- sequential non-stream requests: latency p50 / p99 and what the server adds;
- 16 concurrent clients: requests per second and p99 latency.

To split what is added between the engine and the HTTP layer, the same request also runs through
``InferenceEngine.generate`` in this process (no server), against the same upstream.

    .venv/bin/python benchmarks/server.py [--requests 2000] [--concurrent-requests 4000]

The replica setup (``--replicas``) instead compares, in one run, two ``car serve`` processes in
front of the same upstream: one on the embedded defaults (SQLite ``state.db``, coordination in the
process) and one configured as a replica of a fleet (``[state] url`` on PostgreSQL, ``[coordination]
redis_url`` with a global concurrency limit, so every request takes a fleet slot in Redis, and a
daily spend limit in both, so every call reserves its estimate: in Redis for the replica, in the
process for SQLite); two setups in between say where the difference goes. Rounds alternate
between the setups; each round measures sequential requests' latency (p50, p99), the server
process's CPU time per request (user + system, from /proc, its writer and coordination threads
included, counted until the server is idle again, so the round's outcome records are written;
PostgreSQL's and Redis's own CPU is not counted) and how long after the last answer its writes
went on; the report gives min / median / max over the rounds. It creates a database ``car_bench_<random>``
(dropped at the end) and uses a Redis key prefix of its own (deleted at the end).

    .venv/bin/python benchmarks/server.py --replicas [--rounds 7] [--replica-requests 300] \\
        [--postgres-admin-url postgresql://postgres@127.0.0.1:5432/postgres] \\
        [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench_args import positive

ANSWER = "Hello! How can I help you today?"
ROUNDS = 5  # sequential rounds per target, interleaved
CONCURRENT_ROUNDS = 3  # concurrency-16 rounds per target, alternating
MESSAGES = [{"role": "user", "content": "Say hello."}]
WIRE_MODEL = "bench-model"

# --- the upstream -------------------------------------------------------------------------------------


def _upstream_body(request: dict[str, object]) -> tuple[bytes, str]:
    created = int(time.time())
    base = {"id": "chatcmpl-bench", "created": created, "model": request.get("model", WIRE_MODEL)}
    usage = {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}
    if not request.get("stream"):
        message = {"role": "assistant", "content": ANSWER}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        body = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
        return json.dumps(body).encode(), "application/json"
    chunks = []
    for delta, finish in (
        ({"role": "assistant", "content": ""}, None),
        ({"content": ANSWER}, None),
        ({}, "stop"),
    ):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunks.append({**base, "object": "chat.completion.chunk", "choices": [choice]})
    chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return text.encode(), "text/event-stream"


class _Upstream(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, Content-Length framing; enough for the SDK and httpx."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            raw, self.buffer = self.buffer[end + 4 : end + 4 + length], self.buffer[end + 4 + length :]
            if head[0].startswith("GET"):
                body, kind = b'{"object": "list", "data": []}', "application/json"
            else:
                body, kind = _upstream_body(json.loads(raw or b"{}"))
            self.transport.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                + body
            )


async def _run_upstream(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# --- a minimal Python proxy, for scale ---------------------------------------------------------------


def _run_proxy(port: int, upstream: str) -> None:
    """FastAPI + httpx passing the request body to the upstream and its answer back, nothing else:
    what any Python server in front of the upstream costs on this machine, with the same server
    stack (uvicorn with httptools and uvloop when installed)."""
    import httpx as client_lib
    import uvicorn
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    app = FastAPI()
    holder: dict[str, Any] = {}

    async def chat(request: Request) -> Response:
        client = holder.get("client") or holder.setdefault("client", client_lib.AsyncClient())
        body = await request.json()
        body["model"] = WIRE_MODEL
        answer = await client.post(upstream + "/v1/chat/completions", json=body)
        return Response(answer.content, media_type="application/json")

    app.add_route("/v1/chat/completions", chat, methods=["POST"])  # plain Starlette route: no injection
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- our server -----------------------------------------------------------------------------------------


def _run_server(port: int, upstream: str, home: str) -> None:
    """Our server in ``home`` (whose config.toml, when there, says where its state lives)."""
    import uvicorn

    from car_inference.engine import InferenceEngine
    from car_inference.server import create_app
    from car_inference.server.run import uvicorn_config

    models = f'[[endpoints]]\nname = "up"\nbase_url = "{upstream}/v1"\nmodels = ["{WIRE_MODEL}"]\n'
    Path(home).mkdir(parents=True, exist_ok=True)
    Path(home, "models.toml").write_text(models)
    engine = InferenceEngine(home=Path(home))
    settings = engine.config.server.model_copy(update={"port": port, "max_concurrency": 256})
    try:
        uvicorn.Server(uvicorn_config(create_app(engine, settings), settings, log_level="warning")).run()
    finally:
        engine.close()  # its store's and coordination's threads end with it


# --- the client -------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _sequential(client: httpx.Client, url: str, model: str, n: int) -> list[float]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16}
    out = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.post(url, json=body)
        out.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200 or ANSWER not in response.text:
            raise SystemExit(f"{url}: {response.status_code} {response.text[:300]}")
    return out


def _engine(upstream: str, home: Path) -> Any:
    from car_inference.engine import InferenceEngine

    home.mkdir()
    models = f'[[endpoints]]\nname = "up"\nbase_url = "{upstream}/v1"\nmodels = ["{WIRE_MODEL}"]\n'
    (home / "models.toml").write_text(models)
    return InferenceEngine(home=home)


async def _engine_calls(engine: Any, n: int) -> list[float]:
    from car_inference.requests import GenerateParams, GenerateRequest, Message

    request = GenerateRequest(
        messages=[Message(role="user", content="Say hello.")],
        model=f"up/{WIRE_MODEL}",
        params=GenerateParams(max_tokens=16),
    )
    out = []
    for _ in range(n):
        start = time.perf_counter()
        result = await engine.generate(request)
        out.append((time.perf_counter() - start) * 1000)
        if result.text != ANSWER:
            raise SystemExit(f"engine: {result.text!r}")
    return out


async def _concurrent(url: str, model: str, total: int, workers: int = 16) -> tuple[float, list[float]]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16}
    latencies: list[float] = []
    remaining = total
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                response = await client.post(url, json=body)
                latencies.append((time.perf_counter() - start) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"{url}: {response.status_code} {response.text[:300]}")

        await asyncio.gather(*(worker() for _ in range(workers)))  # warm the connections
        remaining = total
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - start
    return total / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=positive, default=2000, help="sequential requests per target")
    parser.add_argument(
        "--concurrent-requests", type=positive, default=4000, help="requests at concurrency 16"
    )
    parser.add_argument("--replicas", action="store_true", help="compare the replica setup with SQLite")
    parser.add_argument("--rounds", type=positive, default=7, help="--replicas: rounds per setup")
    parser.add_argument(
        "--replica-requests", type=positive, default=300, help="--replicas: requests per round"
    )
    parser.add_argument("--postgres-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--role", choices=["upstream", "server", "proxy"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < ROUNDS or args.concurrent_requests < 16 * CONCURRENT_ROUNDS:
        # a round of no requests ended the whole run in "no median for empty data"
        parser.error(
            f"--requests is at least {ROUNDS} (rounds) and --concurrent-requests {16 * CONCURRENT_ROUNDS}"
        )
    if args.role == "upstream":
        asyncio.run(_run_upstream(args.port))
        return
    if args.role == "server":
        _run_server(args.port, args.upstream, args.home)
        return
    if args.role == "proxy":
        _run_proxy(args.port, args.upstream)
        return
    if args.replicas:
        _replica_setup(args)
        return

    up_port, car_port, proxy_port = _free_port(), _free_port(), _free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    ours = f"http://127.0.0.1:{car_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    with tempfile.TemporaryDirectory() as home:
        me = [sys.executable, __file__]
        procs = [
            subprocess.Popen([*me, "--role", "upstream", "--port", str(up_port)], env=env),
            subprocess.Popen(
                [*me, "--role", "server", "--port", str(car_port), "--upstream", upstream, "--home", home],
                env=env,
            ),
            subprocess.Popen(
                [*me, "--role", "proxy", "--port", str(proxy_port), "--upstream", upstream], env=env
            ),
        ]
        try:
            _wait(upstream + "/v1/models")
            _wait(ours + "/health")
            _wait(f"http://127.0.0.1:{proxy_port}/docs")
            targets = {
                "direct": (upstream + "/v1/chat/completions", WIRE_MODEL),
                "car": (ours + "/v1/chat/completions", f"up/{WIRE_MODEL}"),
                "proxy": (f"http://127.0.0.1:{proxy_port}/v1/chat/completions", WIRE_MODEL),
            }
            # sequential[name][r]: the latencies of round r; rounds interleave the targets, so drift
            # hits all alike, and each round's p50 difference is one measurement of what is added
            sequential: dict[str, list[list[float]]] = {"direct": [], "car": [], "proxy": [], "engine": []}
            engine = _engine(upstream, Path(home) / "engine-home")
            with httpx.Client(timeout=60) as client, asyncio.Runner() as loop:
                for url, model in targets.values():
                    _sequential(client, url, model, 200)  # warm up
                loop.run(_engine_calls(engine, 200))
                for _ in range(ROUNDS):
                    for name, (url, model) in targets.items():
                        sequential[name].append(_sequential(client, url, model, args.requests // ROUNDS))
                    sequential["engine"].append(loop.run(_engine_calls(engine, args.requests // ROUNDS)))
            engine.close()
            concurrent: dict[str, list[tuple[float, list[float]]]] = {"car": [], "direct": []}
            per_round = args.concurrent_requests // CONCURRENT_ROUNDS
            for _ in range(CONCURRENT_ROUNDS):  # alternating, as the sequential rounds
                for name, results in concurrent.items():
                    url, model = targets[name]
                    results.append(asyncio.run(_concurrent(url, model, per_round)))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=10)
    _report(sequential, concurrent, args)


def _row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |")


def _report(
    rounds: dict[str, list[list[float]]], concurrent: dict[str, list[tuple[float, list[float]]]], args: Any
) -> None:
    sequential = {k: [x for r in v for x in r] for k, v in rounds.items()}
    p50 = {k: statistics.median(v) for k, v in sequential.items()}
    p99 = {k: _percentile(v, 0.99) for k, v in sequential.items()}

    def per_round(name: str, floor: str, q: float) -> list[float]:
        """What ``name`` adds over ``floor`` at quantile ``q``, one figure per round."""
        pairs = zip(rounds[name], rounds[floor], strict=True)
        return [_percentile(a, q) - _percentile(b, q) for a, b in pairs]

    car_rps = [rps for rps, _ in concurrent["car"]]
    direct_rps = [rps for rps, _ in concurrent["direct"]]
    rps_ratio = [c / d for c, d in zip(car_rps, direct_rps, strict=True)]
    car99 = [_percentile(c, 0.99) for _, c in concurrent["car"]]
    direct99 = [_percentile(d, 0.99) for _, d in concurrent["direct"]]
    c99 = [c - d for c, d in zip(car99, direct99, strict=True)]
    cpu = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"car serve vs the upstream called directly ({cpu})")
    count = len(sequential["car"])
    print(
        f"{count} sequential requests per target in {ROUNDS} interleaved rounds; {args.concurrent_requests}"
        f" at concurrency 16 in {CONCURRENT_ROUNDS} alternating rounds. Values: sequential, all rounds"
        " pooled; at concurrency 16, the median round; added: median (min / max) over the rounds\n"
    )
    _row("measure", "through car serve", "upstream directly", "added", "target")
    _row("---", "---", "---", "---", "---")
    added = per_round("car", "direct", 0.5)
    for label, q, quantile, target in (("p50", p50, 0.5, "≤ +2 ms"), ("p99", p99, 0.99, "")):
        _row(
            f"chat completion {label} (sequential)",
            f"{q['car']:.2f} ms",
            f"{q['direct']:.2f} ms",
            _spread(per_round("car", "direct", quantile), "ms", signed=True),
            target,
        )
    _row(
        "requests/s at concurrency 16",
        f"{statistics.median(car_rps):,.0f}",
        f"{statistics.median(direct_rps):,.0f}",
        _spread(rps_ratio, "×"),
        "",
    )
    _row(
        "p99 at concurrency 16",
        f"{statistics.median(car99):.2f} ms",
        f"{statistics.median(direct99):.2f} ms",
        _spread(c99, "ms", signed=True),
        "",
    )
    in_engine = statistics.median(per_round("engine", "direct", 0.5))
    print(
        f"\nof the {statistics.median(added):+.2f} ms at p50 (median round): engine.generate in-process"
        f" (router, outcome store, openai SDK streaming) takes {p50['engine']:.2f} ms, {in_engine:+.2f} ms"
        f" over the direct call; the HTTP server in front of it adds"
        f" {statistics.median(per_round('car', 'engine', 0.5)):+.2f} ms"
    )
    print(
        "for scale: a minimal FastAPI + httpx proxy (no SDK, no routing, no records) adds"
        f" {_spread(per_round('proxy', 'direct', 0.5), 'ms', signed=True)} at p50 and"
        f" {_spread(per_round('proxy', 'direct', 0.99), 'ms', signed=True)} at p99 on this machine;"
        f" car serve over that proxy at p50: {_spread(per_round('car', 'proxy', 0.5), 'ms', signed=True)}"
    )
    verdict = "met" if statistics.median(added) <= 2 else "MISSED"
    print(f"added p50, median round {statistics.median(added):.2f} ms: target {verdict}")


# --- the replica setup: PostgreSQL + Redis against SQLite ----------------------------------------------

_SPEND = "[spend]\ndaily_usd = 1000000.0\n"  # a limit no run reaches: every call reserves its estimate


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fleet_services(admin_url: str, redis_url: str) -> tuple[str, str, Any]:
    """A fresh database and a Redis key prefix of this run's own; returns (state url, prefix,
    cleanup)."""
    import uuid

    import psycopg
    import redis

    name = f"car_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.ping()
    prefix = f"{name}:"

    def cleanup() -> None:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    return admin_url.rsplit("/", 1)[0] + "/" + name, prefix, cleanup


def _settle(pid: int, limit_s: float = 120.0) -> float:
    """Seconds until the server is idle again (under 5% of a core over 0.3 s): its writer thread
    has written the round's outcome records, so their CPU time counts in the round's."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        cpu = _cpu_s(pid)
        time.sleep(0.3)
        if _cpu_s(pid) - cpu < 0.015:
            break
    return max(0.0, time.perf_counter() - started - 0.3)


def _replica_round(client: httpx.Client, url: str, pid: int, n: int) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, CPU ms per request of the server, seconds its writes took after the last
    answer) over ``n`` sequential requests."""
    cpu = _cpu_s(pid)
    latencies = _sequential(client, url, f"up/{WIRE_MODEL}", n)
    behind = _settle(pid)
    used = (_cpu_s(pid) - cpu) * 1000 / n
    return statistics.median(latencies), _percentile(latencies, 0.99), used, behind


def _replica_setup(args: Any) -> None:
    state_url, prefix, cleanup = _fleet_services(args.postgres_admin_url, args.redis_url)
    state = f'[state]\nurl = "{state_url}"\n'
    redis = f'[coordination]\nredis_url = "{args.redis_url}"\nkey_prefix = "{prefix}"\n'
    setups = {  # the full replica last; the two between it and SQLite say where its cost goes
        "sqlite": _SPEND,
        "postgres": state + _SPEND,
        "postgres+redis": state + redis + _SPEND,
        "replica": state + redis + "global_concurrency = 256\n" + _SPEND,
    }
    up_port = _free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    me = [sys.executable, __file__]
    try:
        with tempfile.TemporaryDirectory() as root:
            procs = [subprocess.Popen([*me, "--role", "upstream", "--port", str(up_port)], env=env)]
            urls: dict[str, tuple[str, int]] = {}
            for name, config in setups.items():
                home, port = Path(root, name), _free_port()
                home.mkdir()
                (home / "config.toml").write_text(config)
                cmd = [
                    *me,
                    "--role",
                    "server",
                    "--port",
                    str(port),
                    "--upstream",
                    upstream,
                    "--home",
                    str(home),
                ]
                procs.append(subprocess.Popen(cmd, env=env))
                urls[name] = (f"http://127.0.0.1:{port}", procs[-1].pid)
            try:
                _wait(upstream + "/v1/models")
                rows = _replica_rounds(urls, args)
            finally:
                _stop_all(procs, names=["upstream", *setups])
    finally:
        cleanup()
    _replica_report(rows, args)


def _stop_all(procs: list[subprocess.Popen[bytes]], names: list[str], limit_s: float = 30.0) -> None:
    """SIGTERM each process, and SIGKILL (saying so) one still running ``limit_s`` later."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + limit_s
    for proc, name in zip(procs, names, strict=True):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"warning: the {name} server had not stopped {limit_s:.0f} s after SIGTERM; killed",
                file=sys.stderr,
            )
            proc.kill()
            proc.wait(timeout=10)


def _replica_rounds(
    urls: dict[str, tuple[str, int]], args: Any
) -> dict[str, list[tuple[float, float, float, float]]]:
    rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in urls}
    with httpx.Client(timeout=60) as client:
        for base, _ in urls.values():
            _wait(base + "/health")
            _sequential(client, base + "/v1/chat/completions", f"up/{WIRE_MODEL}", 100)  # warm up
        names = list(urls)
        for index in range(args.rounds):  # alternating, so drift hits both alike
            for name in names if index % 2 == 0 else names[::-1]:
                base, pid = urls[name]
                rows[name].append(
                    _replica_round(client, base + "/v1/chat/completions", pid, args.replica_requests)
                )
    return rows


def _spread(values: list[float], unit: str, signed: bool = False) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    form = ("+" if signed else "") + (".1f" if unit == "s" else ".2f")
    return f"{mid:{form}} {unit} ({low:{form}} / {high:{form}})"


def _replica_report(rows: dict[str, list[tuple[float, float, float, float]]], args: Any) -> None:
    lite = rows["sqlite"]
    cpu = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"car serve as a fleet replica vs on SQLite, in front of the same upstream ({cpu})")
    print(
        f"{args.rounds} alternating rounds of {args.replica_requests} sequential requests per setup; "
        "median (min / max) over rounds; a daily spend limit in every setup\n"
    )
    _row(
        "setup",
        "latency p50",
        "latency p99",
        "server CPU per request",
        "writes done after the last answer (0.3 s steps)",
    )
    _row("---", "---", "---", "---", "---")
    labels = {
        "sqlite": "SQLite state.db, coordination in the process",
        "postgres": "PostgreSQL state",
        "postgres+redis": "+ Redis coordination (breakers, keys, spend reservations, notices)",
        "replica": "+ global_concurrency (a fleet slot in Redis per request): the replica setup",
    }
    for name, setup in rows.items():
        cells = [_spread([r[col] for r in setup], "ms") for col in range(3)]
        cells.append(_spread([r[3] for r in setup], "s"))
        _row(labels[name], *cells)
    print("\nadded over SQLite, per round (median (min / max)):\n")
    _row("setup", "latency p50", "latency p99", "server CPU per request")
    _row("---", "---", "---", "---")
    for name, setup in rows.items():
        if name != "sqlite":
            added = [[f[col] - s[col] for s, f in zip(lite, setup, strict=True)] for col in range(3)]
            _row(labels[name], *[_spread(a, "ms", signed=True) for a in added])


if __name__ == "__main__":
    main()
