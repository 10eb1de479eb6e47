"""What the hosted-provider backend tests share besides the fake server: a tool, a tiny image,
and a backend wired to its own key pool."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypeVar

import pytest

from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.config import CarConfig, RemoteSettings
from car_inference.errors import ProviderError
from car_inference.keys import KeyPool
from car_inference.requests import GenerateRequest

from .provider_server import FakeProviderServer
from .provider_wire import Fault, Reply

__all__ = ["PNG", "WEATHER", "keep_alive_alone_times_out", "remote_backend"]

WEATHER: dict[str, Any] = {  # an OpenAI function schema, as GenerateRequest.tools takes it
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
PNG = "iVBORw0KGgo="

B = TypeVar("B")


def remote_backend(cls: type[B], tmp_path: Path, env: dict[str, str], **remote: Any) -> B:
    """``cls`` over a key pool of ``env`` (no OS environment), settings ``remote`` overriding."""
    config = CarConfig(home=tmp_path, remote=RemoteSettings(**remote))
    pool = KeyPool(config, tmp_path / "key_pool_stats.json", env=env, store=None)
    return cls(BackendContext(config=config, cache=ModelCache(100), keys=pool))  # type: ignore[call-arg]


async def keep_alive_alone_times_out(backend: Any, model: Any, fake: FakeProviderServer) -> None:
    """``backend`` (its ``timeout_s`` 0.6) gives up on a stream of ``: keep-alive`` comments alone
    within seconds, and takes an answer whose chunks come 0.3 s apart: the read timeout restarts
    at every byte, and such an upstream held a call for ever (a CLI killed after 40 s with
    timeout_s = 3)."""
    fake.queue(Fault.keep_alive(seconds=10, every_s=0.1))
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await backend.generate(model, GenerateRequest(prompt="x"))
    assert time.monotonic() - started < 3
    assert info.value.timeout and info.value.retryable and "timed out" in str(info.value)
    fake.queue(Reply(text="a slow but steady answer", delay_between_chunks_s=0.3))
    result = await backend.generate(model, GenerateRequest(prompt="x"))
    assert result.text == "a slow but steady answer"
