"""The quality model: what the router expects a model to score on a request, from outcomes.

Predicted quality (``OutcomeTracker.quality``, inlined in ``AdaptiveRouter._score``) is a baseline
plus the model's advantage, each shrunk with ``settings.prior_strength`` (k) pseudo-observations.
The baseline is what any model scores on this family (and prompt cluster): the other models' decayed
mean there, shrunk toward the mean prior of the competing models. The advantage starts at the
model's prior minus that mean and is refined, in turn, by its mean residual over all its calls, over
the family, and by its own mean minus the baseline in the cluster (or family, without clusters)::

    delta = prior - prior_mean
    delta = (k * delta + R_model) / (k + N_model)        # R: residual sums (``residual`` below)
    base  = (k * prior_mean + S_family_others) / (k + N_family_others)
    with a cluster:
        delta = (k * delta + R_family) / (k + N_family)
        base  = (k * base + S_cluster_others) / (k + N_cluster_others)
        delta = (k * delta + S_cluster - N_cluster * base) / (k + N_cluster)
    without:
        delta = (k * delta + S_family - N_family * base) / (k + N_family)
    quality = clamp(base + delta, 0, 1)

S and N are sums of quality and counts decayed by ``store.QUALITY_DECAY`` per observation ("others": all
models' rows less this model's); N_model is the model's plain call count.

Residuals rather than raw means at the model and family levels keep a model's record fair when it
was mostly tried on hard (or easy) prompts; leaving the model's own observations out of the
baseline keeps them from being counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ProfileRow", "StatsRow", "predict", "residual", "shrunk_baseline"]


@dataclass(slots=True)
class ProfileRow:
    """A model's totals (one ``profiles`` row)."""

    total_calls: int = 0
    success_count: int = 0
    fail_count: int = 0
    total_latency_ms: float = 0.0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    quality_sum: float = 0.0
    resid_sum: float = 0.0
    ema_quality: float = 0.5
    updated_at: float = 0.0


@dataclass(slots=True)
class StatsRow:
    """One ``task_stats`` row: a model's (or, for model ``*``, everyone's) stats for one key."""

    calls: int = 0
    success_count: int = 0
    fail_count: int = 0
    total_latency_ms: float = 0.0
    quality_sum: float = 0.0
    decayed_sum: float = 0.0
    decayed_n: float = 0.0
    resid_sum: float = 0.0
    ema_quality: float = 0.0
    updated_at: float = 0.0


def shrunk_baseline(levels: Iterable[tuple[float, float]], k: float, start: float = 0.5) -> float:
    """Expected quality of any model, from (decayed sum, decayed n) of the family and family|cluster
    baselines: each level shrunk toward the one above with ``k`` pseudo-observations."""
    estimate = start
    for total, n in levels:
        if n > 0:
            estimate = (k * estimate + total) / (k + n)
    return estimate


def residual(quality: float, k: float, levels: Iterable[tuple[float, float, float, float]]) -> float:
    """How much better than other models an observation was: quality minus the other models'
    baseline here, their decayed (sum, n) at the family then cluster level, each shrunk toward the
    one above with ``k`` pseudo-observations from 0.5 (``levels``: all models' sum and n, then this
    model's own, per level)."""
    base = 0.5
    for total_all, n_all, total_own, n_own in levels:
        others = n_all - n_own
        if others > 1e-9:
            base = (k * base + total_all - total_own) / (k + others)
    return quality - base


def predict(
    k: float,
    delta: float,
    base: float,
    profile: ProfileRow | None,
    fam: StatsRow | None,
    fam_all: StatsRow | None,
    clu: StatsRow | None,
    clu_all: StatsRow | None,
    *,
    use_cluster: bool,
) -> tuple[float, int]:
    """The quality estimate of the module docstring, from one model's rows and its key's baseline
    rows. (``AdaptiveRouter._score`` inlines the same arithmetic for speed.)"""
    n = 0
    if profile is not None and profile.total_calls:
        delta = (k * delta + profile.resid_sum) / (k + profile.total_calls)
    if fam_all is not None:  # family baseline without this model's own observations
        own_s, own_n = (fam.decayed_sum, fam.decayed_n) if fam is not None else (0.0, 0.0)
        others = fam_all.decayed_n - own_n
        if others > 1e-9:
            base = (k * base + fam_all.decayed_sum - own_s) / (k + others)
    if fam is not None:
        n = 0 if use_cluster else fam.calls
        if fam.decayed_n > 0:
            if use_cluster:  # residuals as observed: the prior for the cluster level
                delta = (k * delta + fam.resid_sum) / (k + fam.decayed_n)
            else:
                delta = (k * delta + fam.decayed_sum - fam.decayed_n * base) / (k + fam.decayed_n)
    if use_cluster:
        if clu_all is not None:
            own_s, own_n = (clu.decayed_sum, clu.decayed_n) if clu is not None else (0.0, 0.0)
            others = clu_all.decayed_n - own_n
            if others > 1e-9:
                base = (k * base + clu_all.decayed_sum - own_s) / (k + others)
        if clu is not None:
            n = clu.calls
            if clu.decayed_n > 0:
                delta = (k * delta + clu.decayed_sum - clu.decayed_n * base) / (k + clu.decayed_n)
    estimate = base + delta
    return (0.0 if estimate < 0.0 else 1.0 if estimate > 1.0 else estimate), n
