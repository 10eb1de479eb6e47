"""Two InferenceEngines on one Redis (``[coordination] redis_url``) stand for two replicas, with
their hosted models served by the fake provider: a call in flight on one holds its spend estimate
against the other's calls, and outcomes recorded on one change routing on the other without it
asking. (Three real ``car serve`` replicas: tests/server/test_replicas.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from car_inference.engine import InferenceEngine
from car_inference.engine.sync import SyncInferenceEngine
from car_inference.errors import SpendLimitExceeded
from car_inference.requests import GenerateParams, GenerateRequest
from fakes import FakeProviderServer, Reply
from fakes.redis_service import redis_prefix, redis_url

PROMPT = "Summarize the benefits of local-first AI routing in two sentences."


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


def _wait(check: Callable[[], bool], limit: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit:
            pytest.fail(f"not within {limit} s")
        time.sleep(0.01)
    return time.monotonic() - started


def _home(home: Path, fake: FakeProviderServer, prefix: str, config: str = "") -> Path:
    """Two hosted models, ``p/one`` and ``p/two``, at $1 per token in and out (so a call's estimate
    is about its max_tokens in dollars), on the fleet's Redis."""
    home.mkdir(parents=True, exist_ok=True)
    models = ""
    for name in ("one", "two"):
        models += (
            f'[[models]]\nid = "p/{name}"\nname = "{name}"\nprovider = "p"\n'
            'capabilities = ["generate"]\ncontext_length = 32768\nquality = 0.8\n'
            f'[models.source]\nkind = "openai"\nbase_url = "{fake.openai_base_url}"\n'
            f'api_key_env = "FLEET_TEST_KEY"\nmodel_name = "{name}"\n'
            "[models.cost]\ninput_per_mtok = 1000000.0\noutput_per_mtok = 1000000.0\n"
        )
    (home / "models.toml").write_text(models)
    (home / "config.toml").write_text(
        "[routing]\nexploration = 0.0\nseed = 7\n[remote]\ntimeout_s = 5\n"
        f'[coordination]\nredis_url = "{redis_url()}"\nkey_prefix = "{prefix}"\n' + config
    )
    return home


def _engines(
    tmp_path: Path, fake: FakeProviderServer, config: str = "", *, shared: bool = False
) -> list[InferenceEngine]:
    """Two replicas: homes of their own (state.db apart), or one home (a shared state store)."""
    prefix = redis_prefix()
    homes = [tmp_path / "a", tmp_path / ("a" if shared else "b")]
    return [InferenceEngine(home=_home(h, fake, prefix, config)) for h in homes]


def test_a_call_in_flight_on_one_replica_holds_its_estimate_on_the_other(
    fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_TEST_KEY", "sk-fleet")
    a, b = _engines(tmp_path, fake, "[spend]\ndaily_usd = 1500.0\n")
    sa, sb = SyncInferenceEngine(a), SyncInferenceEngine(b)
    request = GenerateRequest(prompt=PROMPT, model="p/one", params=GenerateParams(max_tokens=1000))
    try:
        fake.queue(Reply(text="slow", delay_s=1.0, prompt_tokens=10, completion_tokens=5))
        answers: list[str] = []
        slow = threading.Thread(target=lambda: answers.append(sa.generate(request).text))
        slow.start()
        _wait(lambda: any(r.json and r.json.get("model") == "one" for r in fake.requests), limit=5.0)
        with pytest.raises(SpendLimitExceeded) as info:  # A's ~$1000 estimate is held: $1500 has no room
            sb.generate(request)
        assert info.value.scope == "global" and info.value.spent_usd > 1000
        slow.join()
        assert answers == ["slow"]
        a.flush()  # A's record (its real cost, settling the reservation) is written
        reply = sb.generate(request)  # A's call cost $15: the estimate gave way to it
        assert reply.model_used == "p/one"
        status = b.spend.status().entry("global", "daily")
        assert status is not None and status.spent_usd >= 15.0
    finally:
        for sync in (sa, sb):
            sync.close()
            sync.engine.close()


def test_outcomes_on_one_replica_change_routing_on_the_other(
    fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_TEST_KEY", "sk-fleet")
    a, b = _engines(tmp_path, fake, shared=True)
    request = GenerateRequest(prompt=PROMPT)
    try:
        first = b.route(request).model_id
        other = "p/two" if first == "p/one" else "p/one"
        decision = a.route(request)
        for _ in range(15):  # on A: the model B would pick answers badly, the other well
            a.report(decision, model_id=first, score=0.0, latency_ms=100.0)
            a.report(decision, model_id=other, score=1.0, latency_ms=100.0)
        took = _wait(lambda: b.route(request).model_id == other, limit=1.0)
        assert b.fleet is not None and b.fleet.reloads >= 2  # B reloaded on A's notice
        print(f"B routed on A's outcomes {took * 1000:.0f} ms after them")
    finally:
        for engine in (a, b):
            engine.close()
