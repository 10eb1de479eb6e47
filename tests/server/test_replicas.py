"""Three real ``car serve`` replicas behave as one gateway (issue #14's proof).

The fleet: three ``car serve`` subprocesses (real uvicorn, ports of their own) sharing one
PostgreSQL state store (a schema of its own in the run's fresh database, dropped with it) and one
Redis the module starts itself on another port (so a test can stop it mid-run), under a key prefix
of the run's own, with a global concurrency bound (so every request takes a fleet slot in Redis).
The hosted models are ``[[endpoints]]`` served by fake OpenAI-compatible
providers in this process; a round-robin client stands where a load balancer would. The fleet is
started once for the module; the test that kills a replica runs last.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import FakeProviderServer, Fault
from fakes.redis_service import RedisServer, redis_prefix
from fakes.replicas import ReplicaFleet, RoundRobin, wait_for
from fakes.services import postgres_schema_url

from .conftest import endpoint_toml

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CHAT = "/v1/chat/completions"
BREAKER_COOLDOWN_S = 30.0  # long: a breaker a test opened stays open for the rest of the module
THRESHOLD = 3
KEY_ENV = "FAKE_ENDPOINT_KEY"
POOL_KEYS = ("sk-pool-one", "sk-pool-two")
PAY_PER_MTOK = 1_000.0  # $0.001 a token: a short answer costs about a cent
PAY_DAILY_USD = 0.25


def replica_key(index: int) -> str:
    """The API key replica ``index`` sends to the fake providers."""
    return f"sk-replica-{index}"


@dataclass
class Fleet:
    replicas: ReplicaFleet
    client: RoundRobin
    redis: RedisServer
    prefix: str
    state_url: str
    fakes: dict[str, FakeProviderServer] = field(default_factory=dict)
    _redis: Any = None

    def redis_client(self) -> Any:
        """A client of the fleet's Redis (one per thread: redis-py's pool is thread-safe)."""
        import redis

        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis.url, socket_timeout=2, decode_responses=True)
        return self._redis

    def health(self, index: int) -> dict[str, Any]:
        response = self.client.get(index, "/v1/health")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data


def _body(model: str, text: str = "Say hello.") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}


def _models_toml(fakes: dict[str, FakeProviderServer]) -> str:
    """Each fake is an ``[[endpoints]]`` table serving ``m`` (``pay``: a priced model). Each
    replica calls with a key of its own (``KEY_ENV``), so a fake can answer each differently;
    ``pool/m`` takes the fleet's two keys ``POOL_KEYS`` (``[keys]``)."""
    out = []
    for name, fake in fakes.items():
        if name == "pay":
            continue
        key_env = "POOL_API_KEY" if name == "pool" else KEY_ENV
        out.append(
            endpoint_toml(name, fake.openai_base_url, ["m"], ["generate"]) + f'api_key_env = "{key_env}"\n'
        )
    out.append(
        f'[[models]]\nid = "pay/m"\nname = "pay-m"\nprovider = "pay"\ncapabilities = ["generate"]\n'
        f"context_length = 8192\n[models.cost]\ninput_per_mtok = {PAY_PER_MTOK}\n"
        f'output_per_mtok = {PAY_PER_MTOK}\n[models.source]\nkind = "openai"\n'
        f'base_url = "{fakes["pay"].openai_base_url}"\nmodel_name = "m"\napi_key_env = "{KEY_ENV}"\n'
    )
    return "".join(out)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    state_url = postgres_schema_url()  # skips (fails under CAR_REQUIRE_SERVICES=1) without PostgreSQL
    redis = RedisServer()  # likewise without redis-server
    redis.start()
    fakes = {name: FakeProviderServer().start() for name in ("up", "brk", "brk2", "r1", "r2", "pool", "pay")}
    prefix = redis_prefix()
    config = (
        f'[state]\nurl = "{state_url}"\n'
        f'[coordination]\nredis_url = "{redis.url}"\nkey_prefix = "{prefix}"\nglobal_concurrency = 64\n'
        f"[breaker]\nfailure_threshold = {THRESHOLD}\ncooldown_s = {BREAKER_COOLDOWN_S}\n"
        "[routing]\nexploration = 0.0\nseed = 7\n[remote]\ntimeout_s = 10\n"
        f'[keys]\nPOOL_API_KEY = ["{POOL_KEYS[0]}", "{POOL_KEYS[1]}"]\n'
        f"[spend.providers.pay]\ndaily_usd = {PAY_DAILY_USD}\n"
    )
    root: Path = tmp_path_factory.mktemp("replicas")
    replicas = ReplicaFleet(
        root, 3, config, _models_toml(fakes), env={}, env_of=lambda i: {KEY_ENV: replica_key(i)}
    )
    client = RoundRobin(replicas)
    try:
        replicas.start()
        fleet = Fleet(replicas, client, redis, prefix, state_url, fakes)
        _warm(fleet)
        yield fleet
    finally:
        client.close()
        replicas.stop()
        redis.stop()
        for fake in fakes.values():
            fake.stop()


def _warm(fleet: Fleet) -> None:
    """One request per model to every replica: a process's first call to a model imports the SDK
    and builds its client (seconds on a busy machine), which no timing below should include.
    The provider answers 400, which counts for no breaker."""
    for name, fake in fleet.fakes.items():
        for key in [*POOL_KEYS, *(replica_key(i) for i in range(len(fleet.replicas)))]:
            fake.set_key_behavior(key, Fault.bad_request("warming up"))
        for index in range(len(fleet.replicas)):
            response = fleet.client.to(index, CHAT, _body(f"{name}/m"))
            assert response.status_code == 400, response.text
        fake.reset()


def _open_breaker_on(fleet: Fleet, index: int, model: str) -> int:
    """``THRESHOLD`` failures of ``model`` seen by replica ``index`` alone (the provider answers it
    500, and every other replica 400, see ``_refused``); returns the Redis time (ms) at which the
    fleet's breaker opened."""
    fake = fleet.fakes[model.split("/", maxsplit=1)[0]]
    for other in range(len(fleet.replicas)):
        fake.set_key_behavior(replica_key(other), Fault.bad_request("the request's own fault"))
    fake.set_key_behavior(replica_key(index), Fault.server_error())
    for _ in range(THRESHOLD):
        response = fleet.client.to(index, CHAT, _body(model))
        assert response.status_code >= 500 and response.json()["error"]["code"] != "circuit_open", (
            response.text
        )
    opened = fleet.redis_client().hget(f"{fleet.prefix}breaker:{model}", "opened_at")
    assert opened is not None, "the third failure did not open the fleet's breaker"
    return int(opened)


def _redis_ms(fleet: Fleet) -> int:
    seconds, micros = fleet.redis_client().time()
    return int(seconds) * 1000 + int(micros) // 1000


def _all_refuse(fleet: Fleet, model: str) -> None:
    """Every replica answers ``model`` with the open circuit's 503 and the provider hears nothing."""
    fake = fleet.fakes[model.split("/", maxsplit=1)[0]]
    before = len(fake.requests)
    for index in range(len(fleet.replicas)):
        for _ in range(2):
            response = fleet.client.to(index, CHAT, _body(model))
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "circuit_open"
            assert float(response.headers["retry-after"]) > 0
    assert len(fake.requests) == before


def _auto(fleet: Fleet, index: int) -> str:
    """The model replica ``index`` routes a request naming none to (its decision alone)."""
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "record": False}
    response = fleet.client.to(index, "/v1/route", body)
    assert response.status_code == 200, response.text
    return str(response.json()["decision"]["model_id"])


def test_outcomes_fed_to_one_replica_change_routing_on_all(fleet: Fleet) -> None:
    """Answers from ``r2/m`` that replica 0 alone produced (fast, successful) make every replica
    route to it; replicas 1 and 2 never called it, so they learn it from the shared store, reloaded
    when replica 0 announces the change, within a second."""
    before = {index: _auto(fleet, index) for index in range(len(fleet.replicas))}
    assert len(set(before.values())) == 1 and before[0] not in ("r2/m", "brk/m", "brk2/m"), before
    for _ in range(6):
        response = fleet.client.to(0, CHAT, _body("r2/m"))
        assert response.status_code == 200, response.text
    fed = time.monotonic()
    took = {}
    for index in (1, 2):
        wait_for(lambda i=index: _auto(fleet, i) == "r2/m", 3.0, f"replica {index} routes to r2/m")  # type: ignore[misc]
        took[index] = round(time.monotonic() - fed, 3)
    print(f"after replica 0's outcomes, replicas route to r2/m within {took} s (was {before[0]})")
    assert max(took.values()) <= 1.0, took
    assert _auto(fleet, 0) == "r2/m"
    assert not [r for r in fleet.fakes["r2"].requests if r.api_key != replica_key(0)]


def test_a_key_cooled_by_a_429_on_one_replica_is_skipped_by_all(fleet: Fleet) -> None:
    fake = fleet.fakes["pool"]
    for _ in range(2 * len(fleet.replicas)):
        _, response = fleet.client.post(CHAT, _body("pool/m"))
        assert response.status_code == 200, response.text
    used = [r.api_key for r in fake.requests]
    assert set(used) == set(POOL_KEYS), used  # each replica spreads its calls over both keys
    fake.set_key_behavior(POOL_KEYS[0], Fault.rate_limit(retry_after=120))
    limited = len(fake.requests)
    while not any(r.api_key == POOL_KEYS[0] for r in fake.requests[limited:]):
        response = fleet.client.to(0, CHAT, _body("pool/m"))
        assert response.status_code == 200, response.text  # the 429 sends it to the other key
        assert len(fake.requests) < limited + 10
    time.sleep(0.3)  # a few of the fleet's refreshes (refresh_ms = 50)
    seen = len(fake.requests)
    for _ in range(4 * len(fleet.replicas)):
        _, response = fleet.client.post(CHAT, _body("pool/m"))
        assert response.status_code == 200, response.text
    after = [r.api_key for r in fake.requests[seen:]]
    assert len(after) == 4 * len(fleet.replicas) and set(after) == {POOL_KEYS[1]}, after


def _spent(fleet: Fleet, provider: str) -> float:
    import psycopg

    with psycopg.connect(fleet.state_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(usd), 0) FROM spend WHERE provider = %s", (provider,)
        ).fetchone()
    return float(row[0]) if row else 0.0


def test_a_daily_spend_limit_holds_across_replicas(fleet: Fleet) -> None:
    """Nine clients race calls to a priced model through the balancer; the provider's daily limit
    is shared: what was spent exceeds it by at most one call in flight per replica."""
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        refusals = 0
        for k in range(100):  # until refused a few times, waiting a little after each refusal
            _, response = fleet.client.post(CHAT, _body("pay/m", f"client {n} call {k}"))
            code = response.json()["error"]["code"] if response.status_code != 200 else ""
            with lock:
                results.append((response.status_code, code))
            if code:
                refusals += 1
                if refusals == 8:
                    return
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    passed = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert refused and all(code == "spend_limit_exceeded" for _, code in refused), set(refused)
    costs = []
    import psycopg

    wait_for(lambda: _spent(fleet, "pay") > 0, 5.0, "the spend records")
    time.sleep(0.5)  # the last records' commit
    with psycopg.connect(fleet.state_url, autocommit=True) as conn:
        costs = [float(r[0]) for r in conn.execute("SELECT usd FROM spend WHERE provider = 'pay'").fetchall()]
    spent = sum(costs)
    print(f"{len(passed)} calls passed, {len(refused)} refused; spent ${spent:.4f} of ${PAY_DAILY_USD}")
    assert len(costs) == len(passed)
    assert spent <= PAY_DAILY_USD + len(fleet.replicas) * max(costs) + 1e-9, (spent, costs)
    assert spent >= PAY_DAILY_USD / 2  # the limit, not something else, stopped the calls


def _refused(response: httpx.Response) -> bool:
    """The open circuit's 503; else the request reached the provider, whose 400 (the request's
    own fault) counts for no breaker, so a replica cannot learn of the open breaker from its own
    attempts, only from the fleet."""
    if response.status_code == 503 and response.json()["error"]["code"] == "circuit_open":
        return True
    assert response.status_code == 400, response.text
    return False


def _wait_refused(fleet: Fleet, index: int, model: str, limit_s: float) -> int:
    """Send ``model`` requests to replica ``index`` until it refuses; the Redis time (ms) then."""
    deadline = time.monotonic() + limit_s
    while not _refused(fleet.client.to(index, CHAT, _body(model))):
        assert time.monotonic() < deadline, f"replica {index} still calls {model} after {limit_s} s"
    return _redis_ms(fleet)


@dataclass
class _Watch:
    """Requests for one model sent to one replica by a few threads in turn, with each request's
    send and answer times on Redis's clock, until ``stop`` is set."""

    fleet: Fleet
    index: int
    model: str
    sent: list[tuple[int, int, bool]] = field(default_factory=list)  # sent, answered, refused
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, threads: int = 3, pause_s: float = 0.01) -> list[threading.Thread]:
        def loop() -> None:
            deadline = time.monotonic() + 20
            while not self.stop.is_set() and time.monotonic() < deadline:
                sent = _redis_ms(self.fleet)
                refused = _refused(self.fleet.client.to(self.index, CHAT, _body(self.model)))
                self.sent.append((sent, _redis_ms(self.fleet), refused))
                time.sleep(pause_s)

        out = []
        for _ in range(threads):
            out.append(threading.Thread(target=loop))
            out[-1].start()
            time.sleep(pause_s / threads)  # staggered: a request goes out every few ms
        return out

    def let_through_after(self, opened_ms: int) -> list[int]:
        """How long after the opening each request the replica passed to the provider was sent."""
        return [sent - opened_ms for sent, _, refused in self.sent if not refused and sent >= opened_ms]

    def first_refusal(self, opened_ms: int) -> int:
        """How long after the opening the first refusal was answered (the replica knew by then)."""
        return min(answered for _, answered, refused in self.sent if refused) - opened_ms


def test_a_breaker_opened_on_one_replica_stops_the_others_within_100ms(fleet: Fleet) -> None:
    """Replicas 1 and 2 keep receiving requests for ``brk/m`` (one every few ms each) while
    replica 0 meets the failures that open its breaker. No request sent to them more than 100 ms
    after the opening (Redis's clock) may reach the provider: they refuse it with the open
    circuit's 503. (The time a refusal comes back also counts a busy machine's delays in answering
    it, so it is printed, not asserted.)"""
    fake = fleet.fakes["brk"]
    for index in range(len(fleet.replicas)):
        fake.set_key_behavior(replica_key(index), Fault.bad_request("the request's own fault"))
    watches = [_Watch(fleet, index, "brk/m") for index in (1, 2)]
    threads = [thread for watch in watches for thread in watch.run()]
    try:  # the watchers are under way: their requests reach the provider
        wait_for(lambda: all(len(watch.sent) >= 3 for watch in watches), 10.0, "the watchers' requests")
        assert not any(refused for watch in watches for *_, refused in watch.sent)
        opened_ms = _open_breaker_on(fleet, 0, "brk/m")
        wait_for(lambda: _redis_ms(fleet) > opened_ms + 400, 5.0, "the watch window", 0.01)
    finally:
        for watch in watches:
            watch.stop.set()
        for thread in threads:
            thread.join()
    for watch in watches:
        late = [after for after in watch.let_through_after(opened_ms) if after > 100]
        assert not late, f"replica {watch.index} passed requests sent {late} ms after the opening"
        refused = [sent for sent, _, r in watch.sent if r and sent > opened_ms + 100]
        assert len(refused) >= 3, watch.sent  # the window after 100 ms was watched
    summary = {
        w.index: (max(w.let_through_after(opened_ms), default=None), w.first_refusal(opened_ms))
        for w in watches
    }
    print(f"replica: (last request let through, sent ms after the opening; first refusal answered) {summary}")
    _all_refuse(fleet, "brk/m")


def test_redis_stopped_mid_run_requests_keep_succeeding_and_coordination_resumes(fleet: Fleet) -> None:
    fleet.redis.stop()
    try:
        for _ in range(3 * len(fleet.replicas)):
            _, response = fleet.client.post(CHAT, _body("up/m"))
            assert response.status_code == 200, response.text
        for index in range(len(fleet.replicas)):
            wait_for(
                lambda i=index: fleet.health(i)["coordination"]["reachable"] is False,  # type: ignore[misc]
                5.0,
                f"replica {index} reports Redis unreachable",
                0.1,
            )
            assert fleet.health(index)["coordination"]["error"]
        for _ in range(3 * len(fleet.replicas)):
            _, response = fleet.client.post(CHAT, _body("up/m"))
            assert response.status_code == 200, response.text
    finally:
        fleet.redis.start()  # the same port, empty (no persistence)
    for index in range(len(fleet.replicas)):
        wait_for(
            lambda i=index: fleet.health(i)["coordination"]["reachable"] is True,  # type: ignore[misc]
            5.0,
            f"replica {index} uses Redis again",
            0.1,
        )
    assert "unreachable" in fleet.replicas[0].log and "reachable again" in fleet.replicas[0].log
    # Coordination resumed: failures seen by replica 1 stop replicas 0 and 2.
    _open_breaker_on(fleet, 1, "brk2/m")
    for index in (0, 2):
        _wait_refused(fleet, index, "brk2/m", 1.0)
    _all_refuse(fleet, "brk2/m")


@dataclass
class _Load:
    """Client threads sending ``up/m`` round-robin until stopped; what each answer said."""

    fleet: Fleet
    answers: list[tuple[float, int, int, str]] = field(default_factory=list)  # time, replica, status, trace
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, workers: int) -> None:
        for n in range(workers):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, worker: int) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                index, response = self.fleet.client.post(CHAT, _body("up/m", f"w{worker} n{count}"))
            except (RuntimeError, httpx.HTTPError) as exc:
                self.errors.append(repr(exc))
                continue
            trace = response.headers.get("x-car-trace-id", "")
            self.answers.append((time.monotonic(), index, response.status_code, trace))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def _completed(fleet: Fleet) -> dict[str, str]:
    """trace id -> outcome, for every completed trace in the shared store."""
    import psycopg

    with psycopg.connect(fleet.state_url, autocommit=True) as conn:
        rows = conn.execute("SELECT trace_id, outcome FROM traces WHERE outcome <> 'pending'").fetchall()
    return {str(trace): str(outcome) for trace, outcome in rows}


def _counted_calls(fleet: Fleet, model: str) -> tuple[int, int]:
    """(the profile's call counter, the completed traces) for ``model``: equal when every outcome
    and its counters were written in one transaction."""
    import psycopg

    with psycopg.connect(fleet.state_url, autocommit=True) as conn:
        counter = conn.execute("SELECT total_calls FROM profiles WHERE model_id = %s", (model,)).fetchone()
        traces = conn.execute(
            "SELECT count(*) FROM traces WHERE model_id = %s AND outcome IN ('success', 'failure')", (model,)
        ).fetchone()
    return (int(counter[0]) if counter else 0), int(traces[0] if traces else 0)


def test_kill_9_under_load_loses_no_committed_record_and_the_others_keep_serving(fleet: Fleet) -> None:
    victim = 1
    load = _Load(fleet)
    load.start(workers=4)
    try:
        wait_for(
            lambda: sum(1 for a in load.answers if a[1] == victim) >= 20, 30.0, "load on the victim", 0.05
        )
        committed: dict[str, str] = {}

        def victim_committed() -> bool:  # some of its answers are in the store: snapshot them
            nonlocal committed
            answered = {a[3] for a in load.answers if a[1] == victim and a[2] == 200}
            committed = {t: o for t, o in _completed(fleet).items() if t in answered}
            return len(committed) >= 5

        wait_for(victim_committed, 30.0, "the victim's first commits", 0.02)
        from_victim = {a[3] for a in load.answers if a[1] == victim and a[2] == 200}
        fleet.replicas[victim].kill()
        killed_at = time.monotonic()
        wait_for(
            lambda: sum(1 for a in load.answers if a[0] > killed_at + 0.2) >= 30,
            30.0,
            "load after the kill",
            0.05,
        )
    finally:
        load.stop()
    after_kill = [a for a in load.answers if a[0] > killed_at + 0.2]
    assert all(a[2] == 200 for a in load.answers), [a for a in load.answers if a[2] != 200][:5]
    assert not load.errors, load.errors[:5]
    assert {a[1] for a in after_kill} == {0, 2}  # the survivors carried the load
    assert fleet.client.skipped > 0  # the balancer did meet the dead replica
    # Nothing the victim had committed is lost, and the survivors record what they answer.
    survivors = {a[3] for a in after_kill}
    wait_for(lambda: survivors <= set(_completed(fleet)), 15.0, "the survivors' records", 0.1)
    stored = _completed(fleet)
    assert {t: stored.get(t) for t in committed} == committed
    # No outcome was half written: the call counter matches the completed traces exactly.
    counter, traces = _counted_calls(fleet, "up/m")
    assert counter == traces, (counter, traces)
    print(
        f"victim had {len(from_victim)} answers, {len(committed)} committed before kill -9; "
        f"{len(after_kill)} answers after it, from replicas 0 and 2"
    )
