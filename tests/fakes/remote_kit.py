"""What the hosted-provider backend tests share besides the fake server: a tool, a tiny image,
and a backend wired to its own key pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.config import CarConfig, RemoteSettings
from car_inference.keys import KeyPool

__all__ = ["PNG", "WEATHER", "remote_backend"]

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
