"""Helpers for routing tests: real ModelSchema objects in a real UnifiedRegistry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from car_inference.config import BreakerSettings, RoutingSettings
from car_inference.registry import UnifiedRegistry
from car_inference.routing import AdaptiveRouter, CircuitBreakerRegistry, OutcomeTracker
from car_inference.schema import ModelSchema


def remote(
    model_id: str,
    *,
    caps: Iterable[str] = ("generate",),
    context: int = 8192,
    price: tuple[float, float] = (1.0, 2.0),
    quality: float | None = None,
    params: Iterable[str] = (),
    latency_ms: float | None = None,
) -> ModelSchema:
    """A hosted model (OpenAI wire format); available when the registry's key check says so."""
    provider, name = model_id.split("/", 1)
    data: dict[str, Any] = {
        "id": model_id,
        "name": name,
        "provider": provider,
        "capabilities": list(caps),
        "context_length": context,
        "source": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "TEST_API_KEY"},
        "cost": {"input_per_mtok": price[0], "output_per_mtok": price[1]},
        "quality": quality,
        "supported_params": list(params),
    }
    if latency_ms is not None:
        data["performance"] = {"latency_p50_ms": latency_ms}
    return ModelSchema.model_validate(data)


def local(
    model_id: str,
    *,
    caps: Iterable[str] = ("generate",),
    context: int = 8192,
    quality: float | None = None,
    latency_ms: float | None = None,
) -> ModelSchema:
    """A model on a local vLLM server: local, free, available once configured."""
    provider, name = model_id.split("/", 1)
    data: dict[str, Any] = {
        "id": model_id,
        "name": name,
        "provider": provider,
        "capabilities": list(caps),
        "context_length": context,
        "source": {"kind": "vllm", "endpoint": "http://127.0.0.1:8000", "model_name": name},
        "quality": quality,
    }
    if latency_ms is not None:
        data["performance"] = {"latency_p50_ms": latency_ms}
    return ModelSchema.model_validate(data)


def registry(*models: ModelSchema) -> UnifiedRegistry:
    return UnifiedRegistry(models, key_check=lambda env: True)


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_router(
    settings: RoutingSettings | None = None,
    *,
    tracker: OutcomeTracker | None = None,
    breakers: CircuitBreakerRegistry | None = None,
    spend: Any = None,
    seed: int = 7,
    meter: Any = None,
) -> AdaptiveRouter:
    settings = settings or RoutingSettings(exploration=0.0)
    return AdaptiveRouter(
        settings,
        tracker or OutcomeTracker(None, settings),
        breakers or CircuitBreakerRegistry(BreakerSettings()),
        spend,
        rng_seed=seed,
        meter=meter,
    )


class TableMeter:
    """A ``PromptMeter`` over fixed tables: windows per model id and exact counts per model id.
    Records which models were counted."""

    def __init__(self, windows: dict[str, int] | None = None, counts: dict[str, int] | None = None) -> None:
        self.windows = windows or {}
        self.counts = counts or {}
        self.counted: list[str] = []

    def window(self, model: ModelSchema) -> int:
        return self.windows.get(model.id, model.context_length)

    def count(self, model: ModelSchema, request: object) -> int | None:
        self.counted.append(model.id)
        return self.counts.get(model.id)
