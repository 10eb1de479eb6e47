"""choose_media: the router's choice among image/video models, from what their calls showed."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from car_inference.config import RoutingSettings
from car_inference.routing import InferenceTask, OutcomeTracker
from car_inference.routing.media import MEDIA_FAMILY, choose_media
from car_inference.schema import ModelSchema


def image_model(model_id: str, *, local: bool = False, per_image: float = 0.04) -> ModelSchema:
    source = (
        {"kind": "diffusers", "path": "/nowhere"}
        if local
        else {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "K"}
    )
    return ModelSchema.model_validate({
        "id": model_id, "name": model_id.split("/", 1)[1], "provider": model_id.split("/", 1)[0],
        "capabilities": ["image_generation"], "source": source, "quality": 0.7,
        "cost": {"per_image": 0.0 if local else per_image},
    })  # fmt: skip


def record(tracker: OutcomeTracker, model_id: str, success: bool, times: int) -> None:
    for i in range(times):
        tracker.record_attempt(
            model_id, InferenceTask.GENERATE_IMAGE, MEDIA_FAMILY[InferenceTask.GENERATE_IMAGE],
            "media", trace_id=f"{model_id}-{success}-{i}", started_at=0.0, success=success,
            latency_ms=900.0,
        )  # fmt: skip


def picks(
    models: list[ModelSchema], tracker: OutcomeTracker, settings: RoutingSettings, **kw: object
) -> Counter[str]:
    rng = random.Random(7)
    blocked = kw.pop("blocked", lambda _id: False)
    chosen = Counter[str]()
    for _ in range(200):
        choice = choose_media(
            models, family="image", price=lambda m: m.cost.per_image or 0.0, tracker=tracker,
            settings=settings, rng=rng, blocked=blocked,  # type: ignore[arg-type]
        )  # fmt: skip
        chosen[choice.model.id] += 1
    return chosen


def test_a_model_whose_calls_fail_is_no_longer_chosen() -> None:
    tracker = OutcomeTracker(None, RoutingSettings())
    a, b = image_model("p/a"), image_model("p/b")
    before = picks([a, b], tracker, RoutingSettings())
    assert before["p/a"] > 40 and before["p/b"] > 40  # same prior, same price: both tried
    record(tracker, "p/a", False, 30)
    record(tracker, "p/b", True, 30)
    after = picks([a, b], tracker, RoutingSettings())
    assert after["p/b"] >= 195


def test_price_counts_and_open_circuits_and_prefer_local_filter() -> None:
    tracker = OutcomeTracker(None, RoutingSettings())
    cheap, dear = image_model("p/cheap", per_image=0.01), image_model("p/dear", per_image=0.5)
    # Equal beliefs (no exploration draw): the price decides.
    assert picks([cheap, dear], tracker, RoutingSettings(exploration=0.0)) == Counter({"p/cheap": 200})
    only_dear = picks([cheap, dear], tracker, RoutingSettings(), blocked=lambda m: m == "p/cheap")
    assert only_dear == Counter({"p/dear": 200})
    # Every circuit open: still a choice (the breakers refuse it at call time, with their reason).
    assert sum(picks([cheap], tracker, RoutingSettings(), blocked=lambda m: True).values()) == 200
    local = image_model("l/sd", local=True)
    assert picks([dear, local], tracker, RoutingSettings(prefer_local=True)) == Counter({"l/sd": 200})


def test_no_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        choose_media(
            [], family="image", price=lambda m: 0.0, tracker=OutcomeTracker(None, RoutingSettings()),
            settings=RoutingSettings(), rng=random.Random(0), blocked=lambda _id: False,
        )  # fmt: skip
