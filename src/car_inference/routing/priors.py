"""Benchmark quality priors: what published or local benchmark runs say about a model before it has
served a request here (the seed's ``benchmark_priors.json``).

Accepted file shapes: one object (``{"model_id": ..., "overall_score": 0.88}``), a list of them,
``{"models": [...]}``, or a mapping ``model_id -> {...}``. Scores are 0..1. Looked up, in order, at
``$CAR_HOME/models/benchmark_priors.json``, ``$CAR_HOME/benchmark_priors.json`` and
``$CAR_BENCHMARK_PRIORS_PATH``; later files win for the same model.

Priors only seed the cold start: ``apply_benchmark_priors`` creates a profile (``ema_quality`` =
``overall_score``) only for a model with no observed profile, and the router shrinks observed
quality toward the prior, so real outcomes always take over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError

if TYPE_CHECKING:
    from .outcomes import OutcomeTracker

__all__ = [
    "BenchmarkPrior",
    "apply_benchmark_priors",
    "benchmark_priors_paths",
    "load_all_benchmark_priors",
    "load_benchmark_priors",
]

PRIORS_ENV = "CAR_BENCHMARK_PRIORS_PATH"


class BenchmarkPrior(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model_id: str
    overall_score: float = Field(ge=0.0, le=1.0)
    overall_latency_ms: float | None = Field(default=None, ge=0.0)
    task_scores: dict[str, float] = Field(default_factory=dict)
    task_latency_ms: dict[str, float] = Field(default_factory=dict)

    @field_validator("task_scores")
    @classmethod
    def _scores_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for task, score in value.items():
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"task score for {task!r} must be within 0..1, got {score}")
        return value

    def score_for(self, family: str) -> float:
        """The task score for ``family`` when there is one, else the overall score."""
        return self.task_scores.get(family, self.overall_score)


def _entries(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if "model_id" in data:
            return [data]
        if isinstance(data.get("models"), list):
            return data["models"]
        return [{"model_id": k, **v} for k, v in data.items() if isinstance(v, dict)]
    raise ValueError("expected an object or a list")


def load_benchmark_priors(path: str | Path) -> dict[str, BenchmarkPrior]:
    """Priors in one file, by model id. A missing file gives {}; a malformed one raises
    ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        priors = [BenchmarkPrior.model_validate(entry) for entry in _entries(data)]
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"invalid benchmark priors: {exc}".splitlines()[0], path=str(path)) from None
    return {p.model_id: p for p in priors}


def benchmark_priors_paths(home: Path, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where priors are looked for, in order, without duplicates."""
    env = os.environ if env is None else env
    paths = [home / "models" / "benchmark_priors.json", home / "benchmark_priors.json"]
    extra = env.get(PRIORS_ENV)
    if extra:
        paths.append(Path(extra).expanduser())
    return list(dict.fromkeys(paths))


def load_all_benchmark_priors(
    home: Path, env: Mapping[str, str] | None = None, *, strict: bool = False
) -> dict[str, BenchmarkPrior]:
    """Priors from every lookup path; a later file wins for the same model. A malformed file is
    skipped (as the seed does, which logs it), or raises with ``strict``."""
    merged: dict[str, BenchmarkPrior] = {}
    for path in benchmark_priors_paths(home, env):
        try:
            merged.update(load_benchmark_priors(path))
        except ConfigError:
            if strict:
                raise
    return merged


def apply_benchmark_priors(
    tracker: OutcomeTracker, priors: Mapping[str, BenchmarkPrior] | Iterable[BenchmarkPrior]
) -> int:
    """Give the tracker these priors (the router reads them for every decision) and create a
    profile with ``ema_quality = overall_score`` for each model that has no observed profile.
    Returns how many profiles were created."""
    items = priors.values() if isinstance(priors, Mapping) else priors
    return sum(tracker.add_benchmark_prior(p) for p in items)
