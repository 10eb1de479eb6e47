"""Which image or video model serves a request that names none: the router's own way of choosing.

Media calls are recorded as outcomes under the family ``image`` or ``video`` (``engine/media.py``):
success or failure, latency, and any feedback. ``choose_media`` reads those beliefs as the text
router does (``OutcomeTracker.belief``: the catalog's quality prior, refined by what each model's
calls showed, with its uncertainty), draws one sample per candidate (Thompson sampling, scaled by
``[routing] exploration``), and scores it with the same utility as text (``scoring.weights``)::

    score = wq * draw - wl / 2 * log10(latency ms) - wc / 3 * log10(price of this call + 1e-5)

Latency is the observed p50 once there are enough calls, else the catalog's; the price is the
catalog's (per image times images, per second times seconds; in-process models cost nothing).
Models whose circuit is open are left out unless nothing else is left. With ``prefer_local``,
local models are the candidates when one is available.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import RoutingSettings
from ..requests import RoutingWorkload
from ..schema import ModelSchema
from .complexity import TaskComplexity
from .outcomes import InferenceTask, OutcomeTracker
from .pool import default_latency_ms
from .scoring import COST_FLOOR, weights

__all__ = ["MEDIA_FAMILY", "MediaChoice", "choose_media"]

# The family a media task's outcomes are learned under.
MEDIA_FAMILY = {InferenceTask.GENERATE_IMAGE: "image", InferenceTask.GENERATE_VIDEO: "video"}


@dataclass(frozen=True, slots=True)
class MediaChoice:
    """The models to try, best first (a routed request that one of them cannot serve as asked,
    e.g. ``steps`` on a hosted model, goes to the next), and why the first leads."""

    models: list[ModelSchema]
    reason: str

    @property
    def model(self) -> ModelSchema:
        return self.models[0]


def choose_media(
    models: Sequence[ModelSchema],
    *,
    family: str,
    price: Callable[[ModelSchema], float],
    tracker: OutcomeTracker,
    settings: RoutingSettings,
    rng: random.Random,
    blocked: Callable[[str], bool],
) -> MediaChoice:
    """``models`` (not empty) ranked for one media request; see the module text."""
    if not models:
        raise ValueError("choose_media needs at least one model")
    pool = [m for m in models if not blocked(m.id)] or list(models)
    if settings.prefer_local:
        pool = [m for m in pool if m.is_local] or pool
    wq, wl, wc = weights(settings, TaskComplexity.MEDIUM, RoutingWorkload.BACKGROUND)
    # The context's difficulty is measured against every candidate's prior, as the text scorer does.
    priors = {m.id: m.quality if m.quality is not None else 0.5 for m in pool}
    scored: list[tuple[float, int, ModelSchema, float, float, int]] = []
    for i, m in enumerate(pool):
        mean, var, n = tracker.belief(m.id, family, priors[m.id], priors=priors)
        draw = mean + settings.exploration * math.sqrt(var) * rng.gauss(0.0, 1.0)
        draw = 0.0 if draw < 0.0 else 1.0 if draw > 1.0 else draw
        latency = tracker.latency_p50(m.id) or default_latency_ms(m)
        score = (
            wq * draw - wl / 2 * math.log10(max(latency, 1.0)) - wc / 3 * math.log10(price(m) + COST_FLOOR)
        )
        scored.append((-score, i, m, mean, math.sqrt(var), n))
    scored.sort(key=lambda row: (row[0], row[1]))
    _score, _i, _first, mean, sd, n = scored[0]
    reason = (
        f"{family}: quality {mean:.2f} ± {sd:.2f} after {n} calls, best of {len(scored)} by "
        "quality, latency and price"
        if len(scored) > 1
        else f"{family}: the only candidate"
    )
    return MediaChoice([row[2] for row in scored], reason)
