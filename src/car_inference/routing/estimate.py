"""The quality model: what the router expects a model to score in a context, and how sure it is.

A model's quality in a request's context (its family, then its cluster, then its template where it
has one; ``OutcomeTracker.views``) is a Gaussian belief refined from the widest level to the
narrowest::

    prior     mean = the model's prior (benchmark score for the family, catalog, else 0.5) plus the
                     context's difficulty: how much the models observed there beat their own priors
                     (``difficulty``, shrunk while the context is new); var = prior_sd²
    (a model never seen in the family: its record elsewhere, discounted by BETWEEN_FAMILIES)
    family    its calls in the family's other clusters, each     drift = DRIFT_VAR[0]
              counted as its lead over everyone in its own
              cluster, re-based on this cluster's baseline
              (``family_level``: no Simpson's paradox)
    cluster   its calls in this cluster                          drift = DRIFT_VAR[1]
    template  (a templated request) its calls in the template    drift = DRIFT_VAR[2]
              (counted there alone: the family and cluster levels are the requests around it, so a
              new template starts from what they know, not from scratch; their evidence is moved
              by how much easier or harder the template is, ``template_shift``)
    at each level:  var0 = var + drift;  noise = clamp(q·(1-q), 0.04, 0.25) at the prior's q
                    var  = 1 / (1/var0 + n/noise);  mean = var · (mean/var0 + n·m/noise)

``n`` is the level's decayed count less the narrower level's (``store.QUALITY_DECAY``) and ``m`` the
level's decayed mean quality. An untried model keeps its own prior, moved only by how hard the
context is for everyone, with the widest uncertainty; never the context's average. The router
samples from these beliefs (Thompson sampling), so exploration comes from uncertainty and fades
where evidence is strong.

What the RouterDC replay (``benchmarks/routing.py``) decided: the family level in leads over each
cluster's baseline, not raw means (over 6 seeds the same mean, 0.4939, and less than half the seed
spread: sd 0.0029 instead of 0.0064; a seed where one model, picked for a hard benchmark, was
never tried on an easy one of the same family went from 0.481 to 0.492); the prior's offset by difficulty (an
untried model at 0.5 in a context where everyone scores 0.8 was never tried again: lock-in); no
level for the model's record in *other* families (a model great at math was then tried on
everything, and one bad at code never on multiple choice); each level's evidence from its mean,
not from differences of decayed sums (which decay at different paces and stop subtracting).

The levels above a template, in the template's baseline (``template_shift``): the evidence of
the family and cluster levels is moved by the template's baseline less the cluster's, as the family
level is re-based per cluster. Without it a model little tried in a template harder than its
cluster kept the cluster's level: in MMLU's moral scenarios (every model 0.1-0.27, in a cluster
where they score 0.5-0.6) such a model looked 0.2 better than the ones tried there, and
exploration took 170 of the template's 277 held-out requests (seed 0); seed 1 lost 0.0015 of the
total there, now 0.0003. The gap is shrunk with ``TEMPLATE_SHIFT_PSEUDO_CALLS`` on both sides and
taken only against a cluster (else family) with ``TEMPLATE_SHIFT_MIN_AROUND`` outcomes: with a
shared prefix per benchmark every request is templated and the cluster holds only the handful
that came before each template was recognised; measured against those, seeds locked in on a
runner-up (3 of 6 at 10 pseudo-calls and no minimum, 1 of 9 at 20). RouterDC replay, default
weights after warm-up, 12 seeds: 0.5021 -> 0.5027, 11 seeds better, one 0.0002 worse; shared
prefix unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ALL = "*"  # the model id of baseline rows (store.ALL)
EMA_ALPHA = 0.1
# Per-observation decay of the quality sums the router reads: an effective memory of about
# 1 / (1 - 0.999) = 1,000 observations per (model, family), so a model that changes is noticed.
QUALITY_DECAY = 0.999

__all__ = [
    "BETWEEN_FAMILIES",
    "DRIFT_VAR",
    "EMA_ALPHA",
    "QUALITY_DECAY",
    "TEMPLATE_SHIFT_MIN_AROUND",
    "TEMPLATE_SHIFT_PSEUDO_CALLS",
    "ProfileRow",
    "StatsRow",
    "belief",
    "difficulty",
    "family_level",
    "first_look",
    "noise_of",
    "posterior",
    "template_shift",
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

    def add(
        self, quality: float, success: bool, latency_ms: float | None, in_tok: int, out_tok: int, now: float
    ) -> None:
        """Count one outcome (the arithmetic of the store's profile upsert)."""
        self.ema_quality = (
            quality if self.total_calls == 0 else _ema(self.ema_quality, quality - self.ema_quality)
        )
        self.total_calls += 1
        self.success_count += success
        self.fail_count += not success
        self.total_latency_ms += latency_ms or 0.0
        self.total_input_tokens += in_tok
        self.total_output_tokens += out_tok
        self.quality_sum += quality
        self.updated_at = now

    def shift(self, delta: float) -> None:
        """An outcome counted before re-scored by ``delta`` (feedback, a signal)."""
        self.quality_sum += delta
        self.ema_quality = min(1.0, max(0.0, _ema(self.ema_quality, delta)))


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
    joined_at: int = 0  # the key's baseline calls before this row's first outcome (``scoring``)

    def add(self, quality: float, success: bool, latency_ms: float | None, out_tok: int, now: float) -> None:
        """Count one outcome (the arithmetic of the store's task_stats upsert)."""
        self.ema_quality = quality if self.calls == 0 else _ema(self.ema_quality, quality - self.ema_quality)
        self.calls += 1
        self.success_count += success
        self.fail_count += not success
        self.total_latency_ms += latency_ms or 0.0
        self.quality_sum += quality
        self.decayed_sum = self.decayed_sum * QUALITY_DECAY + quality
        self.decayed_n = self.decayed_n * QUALITY_DECAY + 1.0
        self.total_output_tokens += out_tok
        self.updated_at = now

    def shift(self, delta: float) -> None:
        """An outcome counted before re-scored by ``delta`` (feedback, a signal)."""
        self.quality_sum += delta
        self.decayed_sum += delta
        self.ema_quality = min(1.0, max(0.0, _ema(self.ema_quality, delta)))

    def with_decayed(self, decayed_n: float, decayed_sum: float) -> StatsRow:
        """A copy with another decayed record (``dataclasses.replace`` took 6 µs of a family
        level's ~10 per model, rebuilt after most outcomes: its fields spelt out here)."""
        return StatsRow(
            self.calls, self.success_count, self.fail_count, self.total_latency_ms, self.quality_sum,
            decayed_sum, decayed_n, self.ema_quality, self.updated_at, self.total_output_tokens,
            self.joined_at,
        )  # fmt: skip


def _ema(ema: float, step: float) -> float:
    return ema + EMA_ALPHA * step


_NOISE_MIN, _NOISE_MAX = 0.04, 0.25
# How far a model's quality in one context may lie from the level above (variances): its prior ->
# the family, the family -> the cluster, the cluster -> a template. Chosen on the RouterDC replay.
DRIFT_VAR = (0.0, 0.10**2, 0.10**2)
DIFFICULTY_PSEUDO_CALLS = 20.0  # shrinks a context's difficulty offset toward 0 while it is new
# Shrinks a cluster's baseline toward its family's while the cluster is new (``family_level``).
FAMILY_BASE_PSEUDO_CALLS = 10.0
# How far a model's quality in a family it was never seen in may lie from its record elsewhere.
BETWEEN_FAMILIES = 0.15**2
# A template is measured against the requests around it (``template_shift``) once these hold this
# many outcomes; both baselines are shrunk toward each other with this many pseudo-calls.
TEMPLATE_SHIFT_MIN_AROUND = 100.0
TEMPLATE_SHIFT_PSEUDO_CALLS = 20.0


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


def family_level(
    family: dict[str, StatsRow], here: dict[str, StatsRow], siblings: Iterable[dict[str, StatsRow]]
) -> dict[str, StatsRow]:
    """The family level as beliefs read it: each model's record in the family's *other* clusters
    (``siblings``, this cluster's rows ``here`` excluded), every observation counted as how much
    better than everyone it did in its own cluster, re-based on this cluster's baseline. Raw family
    means mix clusters in proportions that differ per model (Simpson's paradox): on RouterDC a model
    mostly picked for a hard Chinese benchmark looked weak on an easy English one of the same family
    and was not tried there again. Rows keep the family's counts and answer lengths; their decayed
    mean is replaced, and their decayed count is the siblings' plus this cluster's (``belief``
    subtracts the latter)."""
    here_all, family_all = here.get(ALL), family.get(ALL)
    base = 0.5
    if family_all is not None and family_all.decayed_n > 0:
        base = family_all.decayed_sum / family_all.decayed_n
    if here_all is not None and here_all.decayed_n > 0:
        base = (FAMILY_BASE_PSEUDO_CALLS * base + here_all.decayed_sum) / (
            FAMILY_BASE_PSEUDO_CALLS + here_all.decayed_n
        )
    weight: dict[str, float] = {}
    lead: dict[str, float] = {}
    for rows in siblings:
        everyone = rows.get(ALL)
        if rows is here or everyone is None or everyone.decayed_n <= 0:
            continue
        cluster_base = everyone.decayed_sum / everyone.decayed_n
        for model_id, row in rows.items():
            if model_id != ALL and row.decayed_n > 0:
                weight[model_id] = weight.get(model_id, 0.0) + row.decayed_n
                lead[model_id] = lead.get(model_id, 0.0) + row.decayed_sum - row.decayed_n * cluster_base
    out: dict[str, StatsRow] = {}
    for model_id, row in family.items():
        if model_id == ALL:
            out[model_id] = row
            continue
        below = here.get(model_id)
        n = weight.get(model_id, 0.0) + (below.decayed_n if below is not None else 0.0)
        w = weight.get(model_id)
        seen = base + lead[model_id] / w if w else base
        seen = 0.0 if seen < 0.0 else 1.0 if seen > 1.0 else seen
        out[model_id] = row.with_decayed(n, n * seen)
    return out


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


def template_shift(levels: list[dict[str, StatsRow]]) -> float:
    """How much easier (positive) or harder than the requests around it a template is: its
    baseline (everyone's decayed mean) less its cluster's (else its family's), shrunk toward 0 with
    ``TEMPLATE_SHIFT_PSEUDO_CALLS`` on both sides; 0 for an untemplated request and where the
    baseline around it has fewer than ``TEMPLATE_SHIFT_MIN_AROUND`` outcomes (module docstring)."""
    if len(levels) < 3:
        return 0.0
    here = levels[2].get(ALL)
    if here is None or here.decayed_n <= 0:
        return 0.0
    around = levels[1].get(ALL)
    if around is None or around.decayed_n <= 0:
        around = levels[0].get(ALL)
    if around is None or around.decayed_n < TEMPLATE_SHIFT_MIN_AROUND:
        return 0.0
    k = TEMPLATE_SHIFT_PSEUDO_CALLS
    gap = here.decayed_sum / here.decayed_n - around.decayed_sum / around.decayed_n
    return gap * (here.decayed_n / (here.decayed_n + k)) * (around.decayed_n / (around.decayed_n + k))


def belief(
    mean: float,
    var: float,
    rows: list[StatsRow | None],
    noise: float,
    *,
    detached: bool = False,
    shift: float = 0.0,
) -> tuple[float, float, int]:
    """A model's quality belief from its prior in this context (``mean``, ``var``) and its rows for
    the request's keys (family, then family|cluster, then for a templated request its template;
    None where it has none): (mean, variance, calls in the narrowest key). Each level counts what
    the level below it does not hold; ``detached``: the last row (a template's) is counted under
    no other key, so the level above it keeps all its own calls, and ``shift``
    (``template_shift``) moves the evidence of the levels above it to the template's baseline."""
    depth = len(rows)
    levels: list[tuple[float, float, float]] = []
    n = 0
    for i, row in enumerate(rows):
        if row is None:
            levels.append((0.0, 0.0, DRIFT_VAR[i]))  # never observed here: drift only
            continue
        below = rows[i + 1] if i + 1 < depth and not (detached and i + 2 == depth) else None
        # The level's weight is the calls the level below does not hold; its evidence is its mean
        # quality (decayed rows of different keys decay at different paces, so their sums do not
        # subtract, but their means compare).
        own = row.decayed_n - (below.decayed_n if below is not None else 0.0)
        if own > 0 and row.decayed_n > 0:
            seen = row.decayed_sum / row.decayed_n
            if detached and i < depth - 1:
                seen += shift
            levels.append((own, own * seen, DRIFT_VAR[i]))
        else:
            levels.append((0.0, 0.0, DRIFT_VAR[i]))
        if i == depth - 1:
            n = row.calls
    mean, var = posterior(mean, var, levels, noise)
    return mean, var, n
