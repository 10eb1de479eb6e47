"""The quality model: what the router expects a model to score in a context, and how sure it is.

A model's quality in a request's context (its family, then its cluster; or its template alone: the
keys of ``store.stat_keys``) is a Gaussian belief refined from the widest level to the narrowest::

    prior     mean = the model's prior (benchmark score for the family, catalog, else 0.5) plus the
                     context's difficulty: how much the models observed there beat their own priors
                     (``difficulty``, shrunk while the context is new); var = prior_sd²
    (a model never seen in the family: its record elsewhere, discounted by BETWEEN_FAMILIES)
    family    its calls in the family outside this cluster     drift = DRIFT_VAR[0]
    cluster   its calls in this cluster                          drift = DRIFT_VAR[1]
    (a templated request has one level, its template, with DRIFT_VAR[0])
    at each level:  var0 = var + drift;  noise = clamp(q·(1-q), 0.04, 0.25) at the prior's q
                    var  = 1 / (1/var0 + n/noise);  mean = var · (mean/var0 + n·m/noise)

``n`` is the level's decayed count less the narrower level's (``store.QUALITY_DECAY``) and ``m`` the
level's decayed mean quality. An untried model keeps its own prior, moved only by how hard the
context is for everyone, with the widest uncertainty; never the context's average. The router
samples from these beliefs (Thompson sampling), so exploration comes from uncertainty and fades
where evidence is strong.

What the RouterDC replay (``benchmarks/routing.py``) decided: the prior's offset by difficulty (an
untried model at 0.5 in a context where everyone scores 0.8 was never tried again: lock-in); no
level for the model's record in *other* families (a model great at math was then tried on
everything, and one bad at code never on multiple choice); each level's evidence from its mean,
not from differences of decayed sums (which decay at different paces and stop subtracting).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ALL = "*"  # the model id of baseline rows (store.ALL)

__all__ = [
    "BETWEEN_FAMILIES",
    "DRIFT_VAR",
    "ProfileRow",
    "StatsRow",
    "belief",
    "difficulty",
    "first_look",
    "noise_of",
    "posterior",
    "residual",
]


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
    ema_quality: float = 0.0
    updated_at: float = 0.0
    total_output_tokens: int = 0


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


_NOISE_MIN, _NOISE_MAX = 0.04, 0.25
# How far a model's quality in one context may lie from the level above (variances): its prior ->
# the family, the family -> the cluster (or template). Chosen on the RouterDC replay.
DRIFT_VAR = (0.0, 0.10**2)
DIFFICULTY_PSEUDO_CALLS = 20.0  # shrinks a context's difficulty offset toward 0 while it is new
# How far a model's quality in a family it was never seen in may lie from its record elsewhere.
BETWEEN_FAMILIES = 0.15**2


def noise_of(quality: float) -> float:
    """The variance of one outcome around a mean quality (Bernoulli-like, bounded)."""
    noise = quality * (1.0 - quality)
    return _NOISE_MIN if noise < _NOISE_MIN else _NOISE_MAX if noise > _NOISE_MAX else noise


def posterior(
    mean: float, var: float, levels: Iterable[tuple[float, float, float]], noise: float
) -> tuple[float, float]:
    """The chain of the module docstring: ``levels`` are (decayed n, decayed sum, drift variance)
    from the widest context to the narrowest; returns (mean, variance)."""
    for n, total, drift in levels:
        var += drift
        if n > 1e-9:
            precision = 1.0 / var + n / noise
            mean = (mean / var + total / noise) / precision
            var = 1.0 / precision
    return mean, var


def difficulty(levels: list[dict[str, StatsRow]], priors: dict[str, float]) -> float:
    """How much better (or worse) the models observed in a context score there than their priors
    say: the offset an untried model's prior moves by. ``levels``: the rows of each of the
    request's keys by model (``*`` the baseline row), widest first; the narrowest level with calls
    decides. ``priors``: the models' prior quality for the family. Shrunk toward 0 with
    ``DIFFICULTY_PSEUDO_CALLS``. Plain (undecayed) sums, which add up exactly across rows."""
    for level in reversed(levels):
        everyone = level.get(ALL)
        if everyone is None or everyone.calls <= 0:
            continue
        expected = 0.0
        for model_id, row in level.items():
            if model_id != ALL:
                expected += row.calls * priors.get(model_id, 0.5)
        return (everyone.quality_sum - expected) / (everyone.calls + DIFFICULTY_PSEUDO_CALLS)
    return 0.0


def first_look(mean: float, var: float, profile: ProfileRow | None) -> tuple[float, float]:
    """The prior of a model never seen in a family, informed by its record in the others (its
    totals; an imported profile may hold nothing else): one more observation of its quality here,
    discounted by ``BETWEEN_FAMILIES``, so a model strong elsewhere is tried, not trusted."""
    if profile is None or profile.total_calls <= 0:
        return mean, var
    seen = profile.quality_sum / profile.total_calls if profile.quality_sum else profile.ema_quality
    obs_var = noise_of(seen) / profile.total_calls + BETWEEN_FAMILIES
    precision = 1.0 / var + 1.0 / obs_var
    return (mean / var + seen / obs_var) / precision, 1.0 / precision


def belief(mean: float, var: float, rows: list[StatsRow | None], noise: float) -> tuple[float, float, int]:
    """A model's quality belief from its prior in this context (``mean``, ``var``) and its rows for
    the request's keys (family, then family|cluster; None where it has none): (mean, variance,
    calls in the narrowest key). Each level counts what the level below it does not hold."""
    depth = len(rows)
    levels: list[tuple[float, float, float]] = []
    n = 0
    for i, row in enumerate(rows):
        if row is None:
            break
        below = rows[i + 1] if i + 1 < depth else None
        # The level's weight is the calls the level below does not hold; its evidence is its mean
        # quality (decayed rows of different keys decay at different paces, so their sums do not
        # subtract, but their means compare).
        own = row.decayed_n - (below.decayed_n if below is not None else 0.0)
        if own > 0 and row.decayed_n > 0:
            levels.append((own, own * row.decayed_sum / row.decayed_n, DRIFT_VAR[i]))
        else:
            levels.append((0.0, 0.0, DRIFT_VAR[i]))
        if i == depth - 1:
            n = row.calls
    mean, var = posterior(mean, var, levels, noise)
    var += sum(DRIFT_VAR[len(levels) : depth])  # levels never observed: drift only
    return mean, var, n
