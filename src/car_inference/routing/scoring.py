"""The router's scoring loop: each candidate's belief about its quality, expected cost and latency,
and one Thompson sample of its utility.

Score of a candidate, higher is better::

    score = wq * Q + wl * L + wc * C,  weights normalised to sum to 1
    Q = a draw from the model's quality belief in this context (``estimate.belief``): mean +
        exploration * sd * z, clamped to 0..1; with ``exploration = 0`` the mean itself. The
        candidates' z share part of their noise: z = sqrt(ρ)·Z + sqrt(1-ρ)·N(0, 1) with one Z per
        decision, ρ = ``DRAW_CORRELATION`` (see below); exploration = ``[routing] exploration``
        times the context's width (``exploration_width``: 1, then ``settled_width`` once the
        context has ``settle_after`` outcomes; see "Settling" below)
    L = 1 - min(1, log10(latency / fastest candidate's latency) / 2)      # 100x slower -> 0
    C = 1 - min(1, log10((cost + 1e-5) / (cheapest cost + 1e-5)) / 3)      # 1000x dearer -> 0
    wq = quality_weight * {simple: 0.75, medium: 1, complex: 1.5}
    wl = latency_weight * {simple: 1.5, medium: 1, complex: 0.5} * (interactive_latency_boost if interactive)
    wc = cost_weight    * {simple: 1.5, medium: 1, complex: 0.5}

What the weights trade: a decade of cost is worth ``wc/3`` of utility and a decade of latency
``wl/2``, so at the default weights (0.9 / 0.03 / 0.07, medium complexity) a model ten times
dearer must be 0.07/3/0.9 = 2.6 points of quality better, ten times slower 1.7 points. The earlier
defaults (0.6 / 0.25 / 0.15: 8 points per decade of cost, 21 per decade of latency) went for the
cheapest models wherever prices differ as markets set them: on the RouterDC replay with prices
spread 0.05..3.20 $/M they scored 0.36 against the best single model's 0.475 and the new defaults'
0.494 (at a quarter of its cost); with prices within 10 % of each other the new defaults lose
0.002 (0.4978 against 0.4996, 6 seeds), still above the labelled bandit at the same weights (0.4949).

Latency is the observed p50 (3+ successful calls), else the benchmark's latency for the family,
else the catalog's. Cost is the price of the input tokens plus the *expected* output tokens,
never more than ``max_tokens``. The task, more than the model, decides whether an answer is a
letter or a program, so the prior of a model's answer length is the context's: everyone's mean
in the narrowest of the request's keys with counted answers, shrunk toward
``TYPICAL_OUTPUT_TOKENS``; the model's own answers there move it, each shrinkage with
``OUTPUT_PRIOR_CALLS`` pseudo-calls. Where the context counted nothing: the model's mean over
all its calls, else ``TYPICAL_OUTPUT_TOKENS``. (Spend limits, in ``router._candidates``, still
assume the worst case, all of ``max_tokens``.)

Models new to a context used to be priced at the typical 256 tokens: on the RouterDC replay,
where multiple-choice answers are 12 tokens, that made them look 20x dearer, and the cost-aware
weights never tried them (0.4768 against 0.4978 now, 6 seeds; the labelled bandit 0.4958).
With one pseudo-call instead of five behind the context's length, the default weights lost
0.003 (0.4966 against 0.4997, 6 seeds): untried models in new contexts looked as cheap as the
tried one at once and were explored more, which does not pay on this data.

The loop computes ``wq*Q - wl/2*log10(latency) - wc/3*log10(cost + 1e-5)`` in one pass, gives back
what lies past a cap for the few candidates over 100x the fastest latency or 1000x the cheapest
cost, and adds the shared constant only where scores are shown (it does not change the order).

Correlated draws: with independent draws (ρ = 0), among seven candidates some draw is lucky on
most decisions, so a well-known leader kept losing requests to models known to be a few points
worse (on RouterDC's MMLU, 25 % of decisions explored after warm-up). With a shared part, the
candidates lean together, optimistic or pessimistic, and a leader is displaced mostly when the
lean favours uncertainty and only by models whose uncertainty is large enough to matter.
RouterDC replay, default weights after warm-up, 12 seeds: ρ = 0 0.4945, ρ = 0.75 0.4988 (labelled
bandit 0.4976 on the same seeds); 6 seeds: ρ = 0.5 0.4965, ρ = 0.9 0.4966 and ρ = 1 0.4978, each
with a seed that locked in (0.485): some independent noise is what keeps every model reachable.

Settling: plain Thompson sampling keeps exploring close models for as long as their beliefs
overlap, which is what minimises regret over an unbounded horizon but over-explores over a finite
one (Chapelle and Li, "An Empirical Evaluation of Thompson Sampling", 2011, found narrower
posteriors better in practice). So a context explores with whole beliefs for its first
``settle_after`` outcomes (1,500) and then draws at ``settled_width`` (a quarter) of each belief's
width: a model still gets tried where its belief overlaps the leader's by more than about a
quarter of its uncertainty, and a leader known to be a few points ahead keeps its requests. The
count is the narrowest level's (a template's own outcomes for a templated request), so a new
template explores in full even inside a well-known cluster. A template settles after half as many
(``TEMPLATE_SETTLE_SHARE``): its requests are one application's, one task, and its beliefs start
from its family's and cluster's, while a family|cluster context mixes tasks, where settling early
let some seeds lock in on a runner-up (below). With a shared prefix per benchmark (every prompt
templated), 12 seeds: 0.5017 settling templates after 1,500, 0.5033 after 750 (500: a seed
locked in); without prefixes templates are few and small and nothing changed. RouterDC replay,
default weights after warm-up, size prices, 12 seeds: 0.4975 with whole beliefs throughout,
0.5022 settling after 1,500 (0.5005 after 1,000, 0.5017 after 2,000; 600 and 300 let some seeds lock in on a
runner-up: 0.4977 ± 0.011 and 0.4989 ± 0.006 on 6 seeds); width 0.1 / 0.25 / 0.5: 0.5021 /
0.5027 / 0.5019 (6 seeds). It helps the whole stream, warm-up included, not only the held-out
part (all 20,600 prompts: 0.5124 -> 0.5159; the labelled Thompson bandit 0.5060 -> 0.5119 when
it settles as a template does, ``routing_seeds.py --labelled --settle``), and from cold (0.4874 ->
0.4903), quality only (0.4938 -> 0.4984), cost-aware (0.4978 -> 0.5031), with a shared prefix
per benchmark (0.4985 -> 0.5026). The price is slower discovery of a model that improves later:
a settled context still follows its leader's decaying mean, but a runner-up's belief must overlap
it by more before it is tried again.

Newcomers: a model that joins a context after it has settled (a new release added to the catalog,
say) has not had the whole-belief exploration the others had, so it is not held to the settled
width (``is_newcomer``): while it has no outcome there, and then until the context has had
``settle_after`` outcomes since its first (``task_stats.joined_at``, the key's baseline count when
the model's row was made), as long as every other model had, its draws above its mean are whole
and those below it at the settled width (optimistic: a newcomer that already looks better keeps
its requests as a settled leader would). Held to the settled width, a better model unlucky in its
first few tries froze below the leader for good: RouterDC replay with zephyr (the best model of
MMLU's main context) added after the warm-up, 12 seeds, 0.4893 ± 0.009 -> 0.4987 ± 0.0026 (seed 2:
0.4756 -> 0.4973; zephyr had taken 5 of that context's 3,144 held-out prompts). Whole draws both
ways gave 0.4974 ± 0.0040, with a seed where zephyr, ahead but drawn wide, got 190 of those
prompts and settled behind (0.4884; optimistic 0.4998). When every model is there from the start
nothing changes (0.5028, and 0.5443 on the swapped split, exactly as before). What it costs when
the newcomer is no better where it is tried (chinese-mistral, mistral or dolphin-2.9 added late, 6
seeds): 0.4964 -> 0.4959, 0.4995 -> 0.4979, 0.5010 -> 0.4996.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..config import RoutingSettings
from ..requests import RoutingWorkload
from .complexity import TaskComplexity
from .decision import _SCORE, _Row
from .estimate import (
    ALL,
    DRIFT_VAR,
    ProfileRow,
    StatsRow,
    belief,
    difficulty,
    first_look,
    noise_of,
    template_shift,
)
from .outcomes import OutcomeTracker
from .pool import TYPICAL_OUTPUT_TOKENS, ModelView
from .store import is_templated

__all__ = [
    "COST_FLOOR",
    "DRAW_CORRELATION",
    "OUTPUT_PRIOR_CALLS",
    "TEMPLATE_SETTLE_SHARE",
    "Context",
    "context_length",
    "expected_output_tokens",
    "exploration_width",
    "is_newcomer",
    "score_candidates",
]

OUTPUT_PRIOR_CALLS = 5.0
# A template settles after this share of ``settle_after`` outcomes (module docstring, Settling).
TEMPLATE_SETTLE_SHARE = 0.5
# How much of each candidate's Thompson noise is shared by all candidates of a decision (above).
DRAW_CORRELATION = 0.75
_SHARED_PART, _OWN_PART = math.sqrt(DRAW_CORRELATION), math.sqrt(1.0 - DRAW_CORRELATION)
COST_FLOOR = 1e-5  # USD added to every cost before its log: free models compare, not -inf
_QUALITY_MULT = {TaskComplexity.SIMPLE: 0.75, TaskComplexity.MEDIUM: 1.0, TaskComplexity.COMPLEX: 1.5}
_SPEED_MULT = {TaskComplexity.SIMPLE: 1.5, TaskComplexity.MEDIUM: 1.0, TaskComplexity.COMPLEX: 0.5}


@dataclass(slots=True, frozen=True)
class Context:
    """Where a request is learned: its family, cluster (``coarse/template``) and complexity."""

    family: str
    cluster: str | None
    complexity: TaskComplexity


def weights(st: RoutingSettings, complexity: TaskComplexity, workload: RoutingWorkload) -> tuple[float, ...]:
    """(wq, wl, wc) for this request, normalised to sum to 1."""
    speed = _SPEED_MULT[complexity]
    wq = st.quality_weight * _QUALITY_MULT[complexity]
    wl = st.latency_weight * speed
    if workload is RoutingWorkload.INTERACTIVE:
        wl *= st.interactive_latency_boost
    wc = st.cost_weight * speed
    total = wq + wl + wc or 1.0
    return wq / total, wl / total, wc / total


def exploration_width(st: RoutingSettings, levels: list[dict[str, StatsRow]], *, templated: bool) -> float:
    """How wide the Thompson draws are in this context (its narrowest level): the whole belief
    for its first ``settle_after`` outcomes (a template: ``TEMPLATE_SETTLE_SHARE`` of them),
    ``settled_width`` of it after that (module docstring). A model new to a settled context
    still draws whole above its mean (``is_newcomer``)."""
    row = levels[-1].get(ALL) if levels else None
    return st.settled_width if row is not None and row.calls >= _settle_count(st, templated) else 1.0


def _settle_count(st: RoutingSettings, templated: bool) -> float:
    return st.settle_after * TEMPLATE_SETTLE_SHARE if templated else st.settle_after


def is_newcomer(row: StatsRow | None, context_calls: int, settle_count: float) -> bool:
    """Whether a model draws whole (upwards) in a settled context: it has no outcome there yet, or
    it joined (its first outcome) after the context settled and the context has not had
    ``settle_count`` outcomes since, as long as every model had before the context settled
    (module docstring)."""
    return row is None or (row.joined_at >= settle_count and context_calls - row.joined_at < settle_count)


def expected_output_tokens(
    total_out: int, successes: int, max_tokens: int, prior: float | None = None
) -> float:
    """Mean answer length so far, shrunk toward ``prior`` (the context's length; by default the
    typical one) with ``OUTPUT_PRIOR_CALLS`` pseudo-calls and capped at ``max_tokens``. No token
    counted at all (a caller that never reports them) means unknown, not zero."""
    prior = min(float(max_tokens), TYPICAL_OUTPUT_TOKENS if prior is None else prior)
    if total_out <= 0:
        return prior
    expected = (OUTPUT_PRIOR_CALLS * prior + total_out) / (OUTPUT_PRIOR_CALLS + successes)
    return expected if expected < max_tokens else float(max_tokens)


def context_length(levels: list[dict[str, StatsRow]], max_tokens: int) -> tuple[int, float | None]:
    """(level, everyone's expected answer length there) for the narrowest of the request's levels
    with counted answers; (-1, None) where none has any."""
    for i in range(len(levels) - 1, -1, -1):
        row = levels[i].get(ALL)
        if row is not None and row.success_count and row.total_output_tokens:
            return i, expected_output_tokens(row.total_output_tokens, row.success_count, max_tokens)
    return -1, None


def _answer_length(
    profile: ProfileRow, rows: list[StatsRow | None], max_tokens: int, level: int, ctx_len: float | None
) -> float:
    """Expected output tokens of one model: its answers at the context's ``level`` shrunk toward
    the context's length ``ctx_len``; without a context length, its totals (module docstring)."""
    if ctx_len is None:
        return expected_output_tokens(profile.total_output_tokens, profile.success_count, max_tokens)
    row = rows[level]
    if row is None or not row.success_count or not row.total_output_tokens:
        return ctx_len
    return expected_output_tokens(row.total_output_tokens, row.success_count, max_tokens, ctx_len)


def score_candidates(
    cands: list[ModelView],
    table: dict[str, tuple[float, float]],
    tracker: OutcomeTracker,
    st: RoutingSettings,
    ctx: Context,
    rng: random.Random,
    *,
    workload: RoutingWorkload,
    est_in: int,
    max_tokens: int,
) -> tuple[list[_Row], float, float, int]:
    """Score and sort the candidates, best (sampled) score first; see the module docstring.
    Returns the rows, the constant to add to their scores to show them, the draws' width
    (``exploration_width``) and how many candidates drew whole in a settled context
    (``is_newcomer``)."""
    if not cands:
        return [], 0.0, 1.0, 0
    wq, wl, wc = weights(st, ctx.complexity, workload)
    profiles, levels, p50 = tracker.views(ctx.family, ctx.cluster)
    offset = difficulty(levels, {m: e[0] for m, e in table.items()})
    prior_var = st.prior_sd * st.prior_sd
    untried_var = prior_var + sum(DRIFT_VAR[: len(levels)])
    detached = is_templated(ctx.cluster)
    shift = template_shift(levels)  # 0 for an untemplated request
    level, ctx_len = context_length(levels, max_tokens)
    default_out = expected_output_tokens(0, 0, max_tokens) if ctx_len is None else ctx_len
    width = exploration_width(st, levels, templated=detached)
    explore = st.exploration * width
    settled = (levels[-1][ALL].calls, _settle_count(st, detached)) if width < 1.0 else None
    newcomers = 0
    gauss = rng.gauss
    lean = _SHARED_PART * gauss(0.0, 1.0) if explore else 0.0  # shared by every candidate
    lat_scale, cost_scale = wl / 2, wc / 3
    log10, sqrt = math.log10, math.sqrt
    rows: list[_Row] = []
    fastest = cheapest = math.inf
    slowest = dearest = 0.0
    for v in cands:
        mid = v.model_id
        prior, latency = table[mid]
        mean = prior + offset
        latency = p50.get(mid, latency)
        p = profiles.get(mid)
        e = explore
        if p is not None and p.total_calls:
            own = [lv.get(mid) for lv in levels]
            out_tokens = _answer_length(p, own, max_tokens, level, ctx_len)
            var = prior_var
            if own[0] is None:
                mean, var = first_look(mean, var, p)
            mean, var, n = belief(mean, var, own, noise_of(mean), detached=detached, shift=shift)
            if settled is not None and is_newcomer(own[-1], *settled):
                e, newcomers = st.exploration, newcomers + 1
        else:
            out_tokens, var, n = default_out, untried_var, 0
            if settled is not None:
                e, newcomers = st.exploration, newcomers + 1
        sd = sqrt(var)
        if e:  # a newcomer (e > explore) draws whole upwards only: one that looks better stays so
            z = lean + _OWN_PART * gauss(0.0, 1.0)
            q = mean + (e if z > 0.0 else explore) * sd * z
        else:
            q = mean
        q = 0.0 if q < 0.0 else 1.0 if q > 1.0 else q
        cost = v.in_rate * est_in + v.out_rate * out_tokens
        if latency < fastest:  # noqa: PLR1730 (an if is faster than min() here)
            fastest = latency
        if latency > slowest:  # noqa: PLR1730
            slowest = latency
        if cost < cheapest:  # noqa: PLR1730
            cheapest = cost
        if cost > dearest:  # noqa: PLR1730
            dearest = cost
        score = (
            wq * q
            - lat_scale * log10(latency if latency > 1.0 else 1.0)
            - cost_scale * log10(cost + COST_FLOOR)
        )
        mean = 0.0 if mean < 0.0 else 1.0 if mean > 1.0 else mean
        rows.append((score, mean, n, latency, cost, v, sd, q, out_tokens, score + wq * (mean - q)))
    return (*_capped(rows, fastest, slowest, cheapest, dearest, wl, wc), width, newcomers)


def _capped(
    rows: list[_Row], fastest: float, slowest: float, cheapest: float, dearest: float, wl: float, wc: float
) -> tuple[list[_Row], float]:
    """Give back what lies past a penalty's cap (100x slower, 1000x dearer), sort best first, and
    return the constant that makes the shown scores the module docstring's."""
    lat_scale, cost_scale = wl / 2, wc / 3
    log10 = math.log10
    fastest = fastest if fastest > 1.0 else 1.0
    lat_cap, cost_cap = 100 * fastest, 1000 * (cheapest + COST_FLOOR)
    if slowest > lat_cap or dearest + COST_FLOOR > cost_cap:
        for i, row in enumerate(rows):
            latency, cost = row[3], row[4]
            fix = lat_scale * log10(latency / lat_cap) if latency > lat_cap else 0.0
            if cost + COST_FLOOR > cost_cap:
                fix += cost_scale * log10((cost + COST_FLOOR) / cost_cap)
            if fix:
                rows[i] = (row[0] + fix, *row[1:9], row[9] + fix)
    offset = wl + wc + lat_scale * log10(fastest) + cost_scale * log10(cheapest + COST_FLOOR)
    rows.sort(key=_SCORE, reverse=True)  # stable: ties keep catalog order
    return rows, offset
