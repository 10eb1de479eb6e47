"""Live calls to the real providers: one short generate and one stream each.

Skipped unless the provider's key was in the environment when the run started (``conftest``
moves every ``*_API_KEY(S)`` into ``LIVE_KEYS``). Run with ``pytest -m live tests/live``. The model
can be changed with ``CAR_LIVE_OPENAI_MODEL``, ``CAR_LIVE_ANTHROPIC_MODEL``, ``CAR_LIVE_GEMINI_MODEL``
(catalog ids). These tests need the network, so they lift the loopback-only guard for themselves.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from car_inference.backends import load_backend_class
from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig, RemoteSettings
from car_inference.keys import KeyPool
from car_inference.requests import GenerateParams, GenerateRequest
from car_inference.stream import Done, TextDelta
from fakes.live_keys import LIVE_KEYS, REAL_CONNECT, REAL_CONNECT_EX

PROVIDERS = [
    ("OPENAI_API_KEY", "CAR_LIVE_OPENAI_MODEL", "openai/gpt-6-luna"),
    ("ANTHROPIC_API_KEY", "CAR_LIVE_ANTHROPIC_MODEL", "anthropic/claude-haiku-5-5"),
    ("GEMINI_API_KEY", "CAR_LIVE_GEMINI_MODEL", "google/gemini-3.5-flash-lite"),
]
PARAMS = [
    pytest.param(var, LIVE_KEYS.get(override, default), id=var.split("_")[0].lower())
    for var, override, default in PROVIDERS
]


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", REAL_CONNECT)
    monkeypatch.setattr(socket.socket, "connect_ex", REAL_CONNECT_EX)


def _backend(model_id: str, tmp_path: Path) -> tuple[object, object]:
    model = next(m for m in load_builtin().models if m.id == model_id)
    config = CarConfig(home=tmp_path, remote=RemoteSettings(timeout_s=60))
    pool = KeyPool(config, tmp_path / "key_pool_stats.json", env=dict(LIVE_KEYS), store=None)
    cls = load_backend_class(model.kind, model.id)
    return cls(BackendContext(config=config, cache=ModelCache(100), keys=pool)), model


def _skip_without(var: str) -> None:
    if not (LIVE_KEYS.get(var) or LIVE_KEYS.get(var + "S")):
        pytest.skip(f"{var} is not set")


@pytest.mark.live
@pytest.mark.parametrize(("key_var", "model_id"), PARAMS)
async def test_live_generate(key_var: str, model_id: str, tmp_path: Path, network: None) -> None:
    _skip_without(key_var)
    backend, model = _backend(model_id, tmp_path)
    request = GenerateRequest(
        prompt="Reply with the single word: pong", params=GenerateParams(max_tokens=256)
    )
    out = await backend.generate(model, request)  # type: ignore[attr-defined]
    assert "pong" in out.text.lower()
    assert out.usage is not None and out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    assert out.time_to_first_token_ms is not None


@pytest.mark.live
@pytest.mark.parametrize(("key_var", "model_id"), PARAMS)
async def test_live_stream(key_var: str, model_id: str, tmp_path: Path, network: None) -> None:
    _skip_without(key_var)
    backend, model = _backend(model_id, tmp_path)
    request = GenerateRequest(
        prompt="Count from 1 to 5, separated by spaces.", params=GenerateParams(max_tokens=256)
    )
    events = [e async for e in backend.stream(model, request)]  # type: ignore[attr-defined]
    done = events[-1]
    assert isinstance(done, Done) and "3" in done.text
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.text
    assert done.usage is not None and done.usage.total_tokens > 0
