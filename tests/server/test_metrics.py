"""Prometheus metrics on the server's own registry."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from car_inference.engine.bookkeeping import Bookkeeper
from car_inference.errors import (
    AllModelsFailed,
    InferenceFailed,
    ModelNotFound,
    ModelUnavailable,
    ProviderError,
)
from car_inference.requests import TokenUsage
from car_inference.server.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_counts_per_model() -> None:
    metrics = Metrics()
    metrics.request("/v1/chat/completions", "m1", 200)
    metrics.request("/v1/chat/completions", None, 429)
    metrics.generation("m1", 120.0, 30.0, TokenUsage(prompt_tokens=10, completion_tokens=4))
    metrics.decision("adaptive")
    metrics.fallback(["m0"])
    assert sample(metrics, "car_requests_total", route="/v1/chat/completions", model="m1", status="200") == 1
    assert sample(metrics, "car_requests_total", route="/v1/chat/completions", model="-", status="429") == 1
    assert sample(metrics, "car_request_latency_seconds_sum", model="m1") == 0.12
    assert sample(metrics, "car_time_to_first_token_seconds_count", model="m1") == 1
    assert sample(metrics, "car_input_tokens_total", model="m1") == 10
    assert sample(metrics, "car_output_tokens_total", model="m1") == 4
    assert sample(metrics, "car_routing_decisions_total", strategy="adaptive") == 1
    assert sample(metrics, "car_fallbacks_total", model="m0") == 1


def test_failures_count_against_the_models_that_failed() -> None:
    metrics = Metrics()
    upstream = ProviderError("x", provider="p", model="p/a", status=500)
    metrics.failure(AllModelsFailed([("p/a", upstream), ("p/b", InferenceFailed("y"))]))
    metrics.failure(upstream)
    metrics.failure(ModelNotFound("nope"))
    assert sample(metrics, "car_errors_total", model="p/a", error="ProviderError") == 2
    assert sample(metrics, "car_errors_total", model="p/b", error="InferenceFailed") == 1
    assert sample(metrics, "car_errors_total", model="-", error="ModelNotFound") == 1
    # No model for a capability (the speech and image routes): no model to name.
    metrics.failure(ModelUnavailable("image_generation", "no model has it"), "image_generation")
    metrics.failure(ModelUnavailable("p/c", "not pulled"), "image_generation")
    assert sample(metrics, "car_errors_total", model="-", error="ModelUnavailable") == 1
    assert sample(metrics, "car_errors_total", model="p/c", error="ModelUnavailable") == 1


def test_each_app_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.decision("explicit")
    assert sample(b, "car_routing_decisions_total", strategy="explicit") is None
    assert REGISTRY.get_sample_value("car_routing_decisions_total", {"strategy": "explicit"}) is None
    assert b"car_routing_decisions_total" in a.render()


def test_the_writer_queue_is_a_gauge() -> None:
    metrics, keeper = Metrics(), Bookkeeper()
    metrics.watch_records(keeper)
    assert sample(metrics, "car_records_pending") == 0 and sample(metrics, "car_records_lag_seconds") == 0
    keeper._pending.append((time.monotonic() - 5.0, print, (), {}))  # a record waiting 5 s
    assert sample(metrics, "car_records_pending") == 1
    assert (sample(metrics, "car_records_lag_seconds") or 0) >= 5.0
