"""Two engines (two replicas, each with its own $CAR_HOME) sharing circuit breakers through a real
Redis, against the fake provider server: failures seen by one change the other's routing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from car_inference.engine import InferenceEngine
from car_inference.requests import GenerateParams, GenerateRequest
from car_inference.routing import CircuitState
from fakes import FakeProviderServer, Fault
from fakes.redis_service import closed_port, redis_prefix, redis_url

from .conftest import RemoteEngine

MODELS = {
    "alpha": {"provider": "acme", "quality": 0.95, "fallbacks": ["beta"]},
    "beta": {"provider": "bolt", "quality": 0.9},
}


def req(**kw: object) -> GenerateRequest:
    return GenerateRequest(prompt="Say hello.", params=GenerateParams(max_tokens=32), **kw)  # type: ignore[arg-type]


def _replica(first: InferenceEngine, home: Path) -> InferenceEngine:
    """A second engine with the first one's catalog and settings but a state of its own, so that
    only Redis can tell it what the first one saw."""
    home.mkdir()
    for name in ("models.toml", "config.toml"):
        shutil.copy(first.config.home / name, home / name)
    return InferenceEngine(home=home)


async def test_three_500s_on_one_engine_steer_the_others_adaptive_request(
    remote_engine: RemoteEngine, fake: FakeProviderServer, tmp_path: Path
) -> None:
    coordination = f'[coordination]\nredis_url = "{redis_url()}"\nkey_prefix = "{redis_prefix()}"\n'
    a = remote_engine(MODELS, config="[breaker]\nfailure_threshold = 3\ncooldown_s = 30\n" + coordination)
    b = _replica(a, tmp_path / "replica-b")
    try:
        assert b.route(req()).model_id == "acme/alpha", "before the failures B would pick alpha"
        fake.set_key_behavior("key-alpha", Fault.server_error())
        for _ in range(3):
            assert (await a.generate(req(model="alpha"))).model_used == "bolt/beta"
        assert a.breakers.state("acme/alpha") is CircuitState.OPEN
        opened = time.monotonic()
        while "acme/alpha" not in b.breakers.blocked():
            assert time.monotonic() - opened < 0.1, "B still routes to alpha 100 ms after it opened"
            time.sleep(0.002)
        fake.requests.clear()
        result = await b.generate(req())
        assert result.model_used == "bolt/beta"
        assert [r.api_key for r in fake.requests] == ["key-beta"], "B never called the open model"
        health = b.model_health()
        assert health.coordination is not None and health.coordination.backend == "redis"
        assert health.coordination.reachable and health.coordination.latency_ms is not None
        assert health.circuit_breakers["acme/alpha"]["state"] == "open"
    finally:
        b.close()
        a.close()


async def test_an_engine_whose_redis_is_down_still_serves(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    config = f'[coordination]\nredis_url = "redis://127.0.0.1:{closed_port()}/0"\ntimeout_ms = 200\n'
    engine = remote_engine(MODELS, config="[breaker]\nfailure_threshold = 2\n" + config)
    try:
        fake.set_key_behavior("key-alpha", Fault.server_error())
        for _ in range(2):
            assert (await engine.generate(req(model="alpha"))).model_used == "bolt/beta"
        assert engine.breakers.state("acme/alpha") is CircuitState.OPEN  # this replica's own breaker
        health = engine.model_health().coordination
        assert health is not None and health.reachable is False and health.error
    finally:
        engine.close()
