"""AdaptiveRouter: pick the model for a generate request, with ordered fallbacks, in microseconds.

Order of precedence: ``request.model`` (strategy explicit) > the configured preferred model
(strategy preferred, when it has the capabilities the request needs) > adaptive routing.

Candidates (adaptive, and the fallbacks of every strategy): models that have every needed capability
(generate; tool_use with tools; vision with images; ``intent.require``), are available, whose context
window (0 = unknown, taken as fitting) holds the input + ``max_tokens``, whose circuit is not
open, and whose estimated cost stays within spend limits. With ``prefer_local`` (settings or intent)
only local candidates remain when any qualify. Every excluded model is listed with its reason. When
nothing fits the context window, or every circuit is open, those filters are relaxed in that order
(strategy fallback) rather than lose the request.

Input tokens: a calibrated estimate from the text (``complexity._estimate``, about 2 µs), except
that a local model whose window lies within the estimate's error band (``EXACT_BAND``) gets the
request counted exactly on its own tokenizer through the engine's ``PromptMeter``: the windows that
matter are decided by real counts, and short prompts never pay for tokenizing.

Score of a candidate, higher is better::

    score = wq * Q + wl * L + wc * C,  weights normalised to sum to 1
    Q = predicted quality 0..1: OutcomeTracker.quality(model, family, prior, cluster, prior_mean), a
        baseline for the family and prompt cluster plus the model's learned advantage (estimate.py);
        the prior is the benchmark score for the family, else the benchmark overall, else the catalog
        quality, else 0.5; prior_mean is the mean prior of the available models with the capabilities
    L = 1 - min(1, log10(latency / fastest candidate's latency) / 2)      # 100x slower -> 0
    C = 1 - min(1, log10((cost + 1e-5) / (cheapest cost + 1e-5)) / 3)      # 1000x dearer -> 0
    wq = quality_weight * {simple: 0.75, medium: 1, complex: 1.5}
    wl = latency_weight * {simple: 1.5, medium: 1, complex: 0.5} * (interactive_latency_boost if interactive)
    wc = cost_weight    * {simple: 1.5, medium: 1, complex: 0.5}

The scoring loop computes ``wq*Q - wl/2*log10(latency) - wc/3*log10(cost + 1e-5)`` in one pass,
gives back what lies past a cap for the few candidates over 100x the fastest latency or 1000x the
cheapest cost, and adds the shared constant only where scores are shown (it does not change the order).

Latency is the observed p50 (3+ successful calls), else the benchmark's latency for the family,
else the catalog's ``latency_p50_ms``, else time to first token + 256 tokens at the catalog's (or
a default by locality and size) tokens per second. Cost is the CostModel price of the estimated
input tokens plus ``max_tokens`` of output.

Observations are counted per family and prompt cluster (per family with ``use_clusters=False``).
Cold start: when the best-scored candidate has fewer than ``bootstrap_min_task_observations`` calls
there and ``quality_first_cold_start`` is set, the candidate with the highest predicted
quality among those at or above ``bootstrap_quality_floor`` wins (strategy cold_start). Otherwise,
with probability ``exploration_rate`` (a seeded ``random.Random``), one of the least-observed
candidates is chosen (strategy explore). Fallbacks: the next best candidates, up to
``max_fallbacks``, taking one per provider first so that one provider's outage cannot take them all.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from operator import itemgetter

from ..config import RoutingSettings
from ..errors import ModelUnavailable
from ..registry import UnifiedRegistry
from ..requests import GenerateRequest, RoutingWorkload, ThinkingMode
from ..schema import ModelSchema
from .breaker import CircuitBreakerRegistry
from .complexity import TaskComplexity, TextFeatures, _estimate, cluster_of, complexity_of, family_of
from .decision import _QUALITY, _SCORE, RoutingDecision, RoutingStrategy, ScoredCandidate, _construct, _Row
from .outcomes import InferenceTask, OutcomeTracker
from .pool import LOCAL_FIRST, CatalogView, ModelPool, ModelView, PromptMeter
from .spend import SpendControl
from .store import ALL

__all__ = ["AdaptiveRouter", "RoutingDecision", "RoutingStrategy", "ScoredCandidate"]

AUTO_THINKING_BUDGET = 8000
TOKENS_PER_IMAGE = 800
# How far off the calibrated estimate may be (code, non-Latin scripts): a local model whose window
# is below est * EXACT_BAND + max_tokens gets the request counted on its own tokenizer.
EXACT_BAND = 2.0
PREFERRED_REASON = "preferred generation model override"
EXPLICIT_REASON = "explicit model"
_COST_FLOOR = 1e-5
_QUALITY_MULT = {TaskComplexity.SIMPLE: 0.75, TaskComplexity.MEDIUM: 1.0, TaskComplexity.COMPLEX: 1.5}
_SPEED_MULT = {TaskComplexity.SIMPLE: 1.5, TaskComplexity.MEDIUM: 1.0, TaskComplexity.COMPLEX: 0.5}


_Measure = Callable[[ModelView, int, int], int]  # (model, estimated input, max_tokens) -> input tokens


class AdaptiveRouter:
    def __init__(
        self,
        settings: RoutingSettings | None,
        tracker: OutcomeTracker,
        breakers: CircuitBreakerRegistry,
        spend: SpendControl | None = None,
        rng_seed: int | None = None,
        *,
        use_clusters: bool = True,
        meter: PromptMeter | None = None,
    ) -> None:
        """``use_clusters=False`` learns per task family only (the prompt-cluster refinement off).
        ``meter`` gives real context windows and exact local token counts (see ``pool``)."""
        self.settings = settings or RoutingSettings()
        self.use_clusters = use_clusters
        self.tracker = tracker
        self.breakers = breakers
        self.spend = spend
        self._rng = random.Random(rng_seed if rng_seed is not None else self.settings.seed)
        self.meter = meter
        self._catalog = CatalogView(meter)
        self._tables: dict[str, dict[str, tuple[float, float]]] = {}
        self._tables_key = (-1, -1)

    # --- per-family static data ----------------------------------------------------------------

    def _family_table(self, family: str) -> dict[str, tuple[float, float]]:
        """Per model: (prior quality, latency when none is observed) for this family."""
        key = (self._catalog.version, self.tracker.priors_version)
        if key != self._tables_key:
            self._tables_key, self._tables = key, {}
        table = self._tables.get(family)
        if table is None:
            table = self._tables[family] = {}
            for mid, v in self._catalog.models.items():
                bench = self.tracker.benchmark_prior(mid)
                if bench is not None:
                    prior = bench.score_for(family)
                    latency = (
                        bench.task_latency_ms.get(family) or bench.overall_latency_ms or v.default_latency_ms
                    )
                else:
                    prior = v.catalog_quality if v.catalog_quality is not None else 0.5
                    latency = v.default_latency_ms
                table[mid] = (prior, latency)
        return table

    def prior(self, model_id: str, family: str) -> float:
        """The prior quality of a model for a family: benchmark task score, benchmark overall,
        catalog quality, else 0.5."""
        entry = self._family_table(family).get(model_id)
        if entry is not None:
            return entry[0]
        bench = self.tracker.benchmark_prior(model_id)
        return bench.score_for(family) if bench is not None else 0.5

    # --- deciding ------------------------------------------------------------------------------

    def decide(
        self,
        request: GenerateRequest,
        registry: UnifiedRegistry,
        *,
        preferred: str | None = None,
        estimated_input_tokens: int | None = None,
    ) -> RoutingDecision:
        """Route one generate request (see the module docstring). Raises ``ModelNotFound`` for an
        unknown ``request.model``, ``SpendLimitExceeded`` when only spend limits stand in the way,
        and ``ModelUnavailable`` when no model can serve it."""
        self._catalog.sync(registry)
        ask = request.last_user_text()
        feats = TextFeatures(ask)
        has_tools = bool(request.tools)
        has_vision = bool(request.images or request.messages) and "image" in request.media_types()
        intent = request.intent
        if intent is not None and intent.task is not None:
            family = intent.task.value
        elif has_tools:
            family = "tool_use"
        elif has_vision:
            family = "vision"
        else:
            family = family_of(feats)
        cluster = cluster_of(feats) if self.use_clusters else None
        complexity = complexity_of(feats, has_tools=has_tools, has_vision=has_vision)
        if estimated_input_tokens is None:
            estimated_input_tokens = self._estimate_input(request, feats)
        params = request.params

        required = {"generate"}
        if has_tools:
            required.add("tool_use")
        if has_vision:
            required.add("vision")
        if intent is not None:
            required.update(c.value for c in intent.require)
        pool = self._catalog.pool(frozenset(required))

        pinned: ModelSchema | None = None
        strategy = RoutingStrategy.ADAPTIVE
        note = ""
        if request.model:
            pinned = registry.resolve(request.model)
            strategy = RoutingStrategy.EXPLICIT
        elif preferred:
            found = registry.find(preferred)
            if found is not None and required <= {c.value for c in found.capabilities}:
                pinned, strategy = found, RoutingStrategy.PREFERRED
            else:
                note = f"preferred {preferred} " + (
                    "not in catalog" if found is None else "lacks a capability"
                )

        exact: dict[str, int] = {}  # model id -> prompt tokens on its own tokenizer
        measure = self._measurer(request, exact) if self.meter is not None else None
        excluded = dict(pool.excluded)
        cands, relaxed, over_budget = self._candidates(
            pool,
            excluded=excluded,
            est_in=estimated_input_tokens,
            max_tokens=params.max_tokens,
            prefer_local=self.settings.prefer_local or (intent is not None and intent.prefer_local),
            skip=pinned.id if pinned is not None else None,
            measure=measure,
        )
        if pinned is None and not cands:
            if over_budget and self.spend is not None:  # name the limit, as the engine's check would
                view, estimate = min(over_budget, key=itemgetter(1))
                self.spend.check(view.provider, estimate)
            raise _no_candidates(required, excluded)
        rows, offset = self._score(
            cands,
            pool,
            family=family,
            cluster=cluster,
            complexity=complexity,
            workload=params.workload,
            est_in=estimated_input_tokens,
            max_tokens=params.max_tokens,
        )

        notes: dict[str, str] = {}
        if pinned is not None:
            chosen_id, schema = pinned.id, pinned
            quality, _obs = self.tracker.quality(
                chosen_id, family, self.prior(chosen_id, family), cluster=cluster
            )
            reason = EXPLICIT_REASON if strategy is RoutingStrategy.EXPLICIT else PREFERRED_REASON
        else:
            pick, strategy = self._pick(rows)
            if relaxed:
                strategy = RoutingStrategy.FALLBACK
            _score, quality, obs, latency, cost, view = pick
            chosen_id, schema = view.model_id, view.schema
            if pick is not rows[0]:
                notes[chosen_id] = strategy.value
            source = "p50" if self.tracker.latency_p50(chosen_id) is not None else "est"
            reason = (
                f"{strategy}: {family}/{complexity} -> {chosen_id} (quality {quality:.2f} from {obs} obs, "
                f"{source} {latency:.0f} ms, ${cost:.4f}); {len(rows)} candidates, {len(excluded)} excluded"
            )
            if relaxed:
                reason += f" ({relaxed})"
            if note:
                reason += f"; {note}"

        budget = params.budget_tokens
        if budget == 0 and complexity is TaskComplexity.COMPLEX and params.thinking is not ThinkingMode.OFF:
            view = self._catalog.models.get(chosen_id)
            if view is not None and view.supports_thinking:
                budget = AUTO_THINKING_BUDGET
        view = self._catalog.models.get(chosen_id)
        context_length = view.context_length if view is not None else schema.context_length
        if measure is not None and view is not None and chosen_id not in exact:
            measure(view, estimated_input_tokens, params.max_tokens)
        input_tokens = exact.get(chosen_id, estimated_input_tokens)
        return _construct(
            rows,
            notes,
            offset,
            model_id=chosen_id,
            model_name=schema.name,
            task=InferenceTask.GENERATE,
            task_family=family,
            prompt_cluster=cluster,
            complexity=complexity,
            strategy=strategy,
            reason=reason,
            predicted_quality=quality,
            fallbacks=self._fallbacks(rows, chosen_id, schema.provider),
            context_length=context_length,
            needs_compaction=0 < context_length < input_tokens,
            estimated_input_tokens=input_tokens,
            thinking_budget=budget,
            excluded=excluded,
        )

    @staticmethod
    def _estimate_input(request: GenerateRequest, feats: TextFeatures) -> int:
        """Tokens of the whole request: text (+4 per message for the chat template), tools' JSON
        schemas, and ``TOKENS_PER_IMAGE`` per image."""
        if request.messages is None and not request.context:
            tokens = _estimate(feats) + 4
        else:
            text = request.text_for_analysis()
            tokens = _estimate(TextFeatures(text)) + 4 * (len(request.messages or ()) + 2)
        if request.tools:
            tokens += _estimate(TextFeatures(json.dumps(request.tools)))
        if request.images or request.messages:
            images = len(request.images or ()) + sum(len(m.media()) for m in request.messages or ())
            tokens += TOKENS_PER_IMAGE * images
        return tokens

    def _measurer(self, request: GenerateRequest, exact: dict[str, int]) -> _Measure:
        """Exact prompt tokens for a local model whose window the estimate cannot settle (below
        ``est * EXACT_BAND + max_tokens``), remembered in ``exact``; else the estimate."""
        meter = self.meter
        assert meter is not None

        def measure(v: ModelView, est_in: int, max_tokens: int) -> int:
            if not v.is_local or not v.context_length or v.context_length >= est_in * EXACT_BAND + max_tokens:
                return est_in
            found = exact.get(v.model_id)
            if found is None:
                counted = meter.count(v.schema, request)
                if counted is None:
                    return est_in
                found = exact[v.model_id] = counted
            return found

        return measure

    def _candidates(
        self,
        pool: ModelPool,
        *,
        excluded: dict[str, str],
        est_in: int,
        max_tokens: int,
        prefer_local: bool,
        skip: str | None,
        measure: _Measure | None = None,
    ) -> tuple[list[ModelView], str, list[tuple[ModelView, float]]]:
        """Filter the pool: the candidates, the filter that had to be relaxed (if any), and the
        models refused for spend with their cost estimates."""
        blocked = self.breakers.blocked()
        spend = self.spend if self.spend is not None and self.spend.has_limits else None
        needed_ctx = est_in + max_tokens
        # With a meter, a local window within the estimate's error band is measured, not guessed.
        needed_hi = int(est_in * EXACT_BAND) + max_tokens if measure is not None else needed_ctx
        if not blocked and spend is None and skip is None and needed_hi <= pool.min_context:
            ok = pool.models  # nothing to filter: the common case
        else:
            ok, too_small, tripped, over_budget = [], [], [], []
            headroom: dict[str, float] = {}  # per provider, read once per decision
            for v in pool.models:
                mid = v.model_id
                if mid == skip:
                    continue
                if spend is not None and (v.in_rate or v.out_rate):
                    estimate = v.in_rate * est_in + v.out_rate * max_tokens
                    room = headroom.get(v.provider)
                    if room is None:
                        room = headroom[v.provider] = spend.headroom(v.provider)
                    if estimate > room + 1e-12:
                        excluded[mid] = f"spend limit (estimate ${estimate:.4f})"
                        over_budget.append((v, estimate))
                        continue
                if mid in blocked:
                    excluded[mid] = f"circuit {blocked[mid]}"
                    tripped.append(v)
                elif (
                    v.context_length
                    and v.context_length < needed_hi
                    and (
                        need := (measure(v, est_in, max_tokens) if measure is not None else est_in)
                        + max_tokens
                    )
                    > v.context_length
                ):
                    excluded[mid] = f"context {v.context_length} < {need} tokens needed"
                    too_small.append(v)
                else:
                    ok.append(v)
            if not ok and skip is None and (too_small or tripped):
                if too_small:  # the largest window, with needs_compaction
                    ok, relaxed = [max(too_small, key=_context_length)], "no context window fits"
                else:
                    ok, relaxed = tripped, "every circuit is open"
                for v in ok:
                    del excluded[v.model_id]
                return ok, relaxed, over_budget
            if prefer_local and ok:
                local = [v for v in ok if v.is_local]
                if local and len(local) < len(ok):
                    excluded.update({v.model_id: LOCAL_FIRST for v in ok if not v.is_local})
                    ok = local
            return ok, "", over_budget
        if prefer_local and pool.local and len(pool.local) < len(ok):
            excluded.update(pool.remote_excluded)
            ok = pool.local
        return ok, "", []

    def _score(
        self,
        cands: list[ModelView],
        pool: ModelPool,
        *,
        family: str,
        cluster: str | None,
        complexity: TaskComplexity,
        workload: RoutingWorkload,
        est_in: int,
        max_tokens: int,
    ) -> tuple[list[_Row], float]:
        """Score and sort the candidates, best first (the formula is in the module docstring).
        Returns the rows and the constant to add to their scores to show them."""
        if not cands:
            return [], 0.0
        st = self.settings
        speed = _SPEED_MULT[complexity]
        wq = st.quality_weight * _QUALITY_MULT[complexity]
        wl = st.latency_weight * speed
        if workload is RoutingWorkload.INTERACTIVE:
            wl *= st.interactive_latency_boost
        wc = st.cost_weight * speed
        total = wq + wl + wc or 1.0
        wq, wl, wc = wq / total, wl / total, wc / total

        table = self._family_table(family)
        profiles, fam_stats, cluster_stats, p50 = self.tracker.views(family, cluster)
        key = (family, self.tracker.priors_version)
        prior_mean = pool.prior_means.get(key) if cands is pool.models else None
        if prior_mean is None:
            prior_mean = sum(table[v.model_id][0] for v in cands) / len(cands)
            if cands is pool.models:
                pool.prior_means[key] = prior_mean
        k = st.prior_strength
        fam_all = fam_stats.get(ALL)
        fam_s, fam_n = (fam_all.decayed_sum, fam_all.decayed_n) if fam_all is not None else (0.0, 0.0)
        clu_all = cluster_stats.get(ALL)
        clu_s, clu_n = (clu_all.decayed_sum, clu_all.decayed_n) if clu_all is not None else (0.0, 0.0)
        use_cluster = cluster is not None
        lat_scale, cost_scale = wl / 2, wc / 3
        log10 = math.log10
        # One pass: estimate.predict inlined (this loop is the hot path) and the score without its
        # constant terms: wq*q - lat_scale*log10(latency) - cost_scale*log10(cost + floor). Adding
        # the constants (which need the fastest and cheapest candidate) does not change the order.
        rows: list[_Row] = []
        fastest = cheapest = math.inf
        slowest = dearest = 0.0
        for v in cands:
            mid = v.model_id
            prior, latency = table[mid]
            latency = p50.get(mid, latency)
            cost = v.in_rate * est_in + v.out_rate * max_tokens
            delta = prior - prior_mean
            base = prior_mean
            n = 0
            p = profiles.get(mid)
            if p is not None and p.total_calls:
                delta = (k * delta + p.resid_sum) / (k + p.total_calls)
            fs = fam_stats.get(mid)
            if fs is None:
                if fam_n > 1e-9:
                    base = (k * base + fam_s) / (k + fam_n)
                if clu_n > 1e-9:
                    base = (k * base + clu_s) / (k + clu_n)
            else:
                n = 0 if use_cluster else fs.calls
                others = fam_n - fs.decayed_n
                if others > 1e-9:
                    base = (k * base + fam_s - fs.decayed_sum) / (k + others)
                if use_cluster:
                    if fs.decayed_n > 0:
                        delta = (k * delta + fs.resid_sum) / (k + fs.decayed_n)
                    cs = cluster_stats.get(mid)
                    if cs is None:
                        if clu_n > 1e-9:
                            base = (k * base + clu_s) / (k + clu_n)
                    else:
                        n = cs.calls
                        others = clu_n - cs.decayed_n
                        if others > 1e-9:
                            base = (k * base + clu_s - cs.decayed_sum) / (k + others)
                        if cs.decayed_n > 0:
                            delta = (k * delta + cs.decayed_sum - cs.decayed_n * base) / (k + cs.decayed_n)
                elif fs.decayed_n > 0:
                    delta = (k * delta + fs.decayed_sum - fs.decayed_n * base) / (k + fs.decayed_n)
            q = base + delta
            q = 0.0 if q < 0.0 else 1.0 if q > 1.0 else q
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
                - cost_scale * log10(cost + _COST_FLOOR)
            )
            rows.append((score, q, n, latency, cost, v))
        fastest = fastest if fastest > 1.0 else 1.0
        lat_cap, cost_cap = 100 * fastest, 1000 * (cheapest + _COST_FLOOR)
        if slowest > lat_cap or dearest + _COST_FLOOR > cost_cap:
            # A penalty reaches its cap (100x slower, 1000x dearer): give back what is past it.
            for i, (score, q, n, latency, cost, v) in enumerate(rows):
                fix = lat_scale * log10(latency / lat_cap) if latency > lat_cap else 0.0
                if cost + _COST_FLOOR > cost_cap:
                    fix += cost_scale * log10((cost + _COST_FLOOR) / cost_cap)
                if fix:
                    rows[i] = (score + fix, q, n, latency, cost, v)
        # The constant terms, added where scores are shown (RoutingDecision.candidates).
        offset = wl + wc + lat_scale * log10(fastest) + cost_scale * log10(cheapest + _COST_FLOOR)
        rows.sort(key=_SCORE, reverse=True)  # stable: ties keep catalog order
        return rows, offset

    def _pick(self, rows: list[_Row]) -> tuple[_Row, RoutingStrategy]:
        st = self.settings
        roll = self._rng.random()
        best = rows[0]
        if st.quality_first_cold_start and best[2] < st.bootstrap_min_task_observations:
            floor = st.bootstrap_quality_floor
            eligible = [r for r in rows if r[1] >= floor]
            if eligible:
                return max(eligible, key=_QUALITY), RoutingStrategy.COLD_START
        if roll < st.exploration_rate and len(rows) > 1:
            fewest = min(r[2] for r in rows)
            return self._rng.choice([r for r in rows if r[2] == fewest]), RoutingStrategy.EXPLORE
        return best, RoutingStrategy.ADAPTIVE

    def _fallbacks(self, rows: list[_Row], chosen_id: str, chosen_provider: str) -> list[str]:
        """Next best candidates: the best of each other provider first, then the rest by score."""
        limit = self.settings.max_fallbacks
        if limit <= 0:
            return []
        seen = {chosen_provider}
        first: list[str] = []
        later: list[str] = []
        for row in rows:
            v = row[5]
            if v.model_id == chosen_id:
                continue
            if v.provider not in seen:
                seen.add(v.provider)
                first.append(v.model_id)
                if len(first) == limit:
                    break
            elif len(later) < limit:
                later.append(v.model_id)
        return (first + later)[:limit]


def _context_length(v: ModelView) -> int:
    return v.context_length


def _no_candidates(required: set[str], excluded: dict[str, str]) -> ModelUnavailable:
    counts: dict[str, int] = {}
    for why in excluded.values():
        key = why.split(" (")[0].split(" <")[0]
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1])[:4])
    return ModelUnavailable(
        f"(any {'+'.join(sorted(required))} model)", f"no candidate: {summary or 'no models'}"
    )
