"""Servers for the server tests: the real app under uvicorn in a background thread, on a free
loopback port, in front of a real engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer

SMOL = "huggingface/smollm2-135m-instruct:q4_1"
MINILM = "sentence-transformers/all-minilm-l6-v2"


def model_freed(engine: InferenceEngine, why: str, model: str = SMOL, within_s: float = 5) -> Any:
    """The cache entry of ``model`` once no generation holds it; fails saying ``why`` after
    ``within_s`` seconds."""
    entry = engine.cache.get(f"gguf:{model}")
    assert entry is not None
    deadline = time.monotonic() + within_s
    while not entry.lock.acquire(blocking=False):
        assert time.monotonic() < deadline, why
        time.sleep(0.01)
    entry.lock.release()
    return entry


def endpoint_toml(
    name: str, base_url: str, models: list[str], capabilities: list[str], discover: bool = False
) -> str:
    """An ``[[endpoints]]`` table: an OpenAI-compatible server whose models need no key."""
    quoted = ", ".join(f'"{m}"' for m in models)
    caps = ", ".join(f'"{c}"' for c in capabilities)
    return (
        f'[[endpoints]]\nname = "{name}"\nbase_url = "{base_url}"\nmodels = [{quoted}]\n'
        f"capabilities = [{caps}]\ncontext_length = 32768\ndiscover = {'true' if discover else 'false'}\n"
    )


def remote_home(home: Path, fake: FakeProviderServer, *models: str, extra: str = "") -> Path:
    """A $CAR_HOME whose models.toml serves ``models`` from ``fake`` as ``fake/<model>``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(
        # It stands for a hosted provider's models, which read images (`vision`: images to a
        # model without it are refused before the call).
        endpoint_toml("fake", fake.openai_base_url, list(models), ["generate", "tool_use", "vision"]) + extra
    )
    (home / "config.toml").write_text(
        "[routing]\nexploration_rate = 0.0\nseed = 7\n[remote]\ntimeout_s = 5\n"
    )
    return home


@pytest.fixture(scope="session")
def server_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    """One engine over the embedded models for the server tests (its own state, so the routing
    it learns here stays out of other tests)."""
    engine = InferenceEngine(home=tmp_path_factory.mktemp("server-home"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def local_server(server_engine: InferenceEngine) -> Iterator[ServerThread]:
    with ServerThread(create_app(server_engine)) as server:
        yield server


@pytest.fixture(scope="module")
def fake_provider() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


def serve(engine: InferenceEngine, **settings: object) -> ServerThread:
    return ServerThread(create_app(engine, ServerSettings(**settings))).start()  # type: ignore[arg-type]
