"""AdaptiveRouter: pick the model for a generate request, with ordered fallbacks, in microseconds.

Order of precedence: ``request.model`` (strategy explicit) > the configured preferred model
(strategy preferred, when it has the capabilities the request needs) > adaptive routing.

An explicit model pays for no routing: no candidate is filtered or scored, the request is counted on
a tokenizer only when the model is local and its window is within the estimate's error band, and
the decision carries no fallbacks (the engine adds only those the user configured for that model).

Candidates (adaptive, preferred's fallbacks): models that have every needed capability (generate;
tool_use with tools; vision with images; ``intent.require``), are available, whose context window
(0 = unknown, taken as fitting) holds the input + ``max_tokens``, whose circuit is not open, and
whose worst-case cost (all of ``max_tokens``) stays within spend limits. With ``prefer_local``
(settings or intent) only local candidates remain when any qualify. Every excluded model is listed
with its reason. When nothing fits the context window, or every circuit is open, those filters are
relaxed in that order (strategy fallback) rather than lose the request.

Input tokens: a calibrated estimate from the text (``complexity._estimate``, about 2 µs), except
that a local model whose window lies within the estimate's error band (``EXACT_BAND``) gets the
request counted exactly on its own tokenizer through the engine's ``PromptMeter`` (never a request
over ``METER_MAX_CHARS``: beyond that the estimate decides, so counting stays cheap).

Context: the task family and cluster of ``complexity.py``, or, for a request whose prefix many
requests share, its template (``context.TemplateIndex``: ``prompt_cluster = "coarse/p<hash>"``);
outcomes are counted per family and family|cluster, or per template alone (``store.stat_keys``). Scoring
(``scoring.py``): each candidate's quality belief (``estimate.belief``: its prior refined by its
outcomes, level by level) is sampled once (Thompson sampling) and traded against expected cost and
latency; the best draw wins. Strategy ``adaptive`` when the winner also has the best score at its
mean quality, ``explore`` when its draw beat a model whose mean looks better (uncertainty, not a
coin, decides to explore, and it fades as evidence grows).
Fallbacks: the next best candidates, up to ``max_fallbacks``, one per provider first so that one
provider's outage cannot take them all.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter

from ..config import RoutingSettings
from ..errors import ModelUnavailable
from ..registry import UnifiedRegistry
from ..requests import GenerateRequest, ThinkingMode
from ..schema import ModelCapability, ModelSchema
from .breaker import CircuitBreakerRegistry
from .complexity import TaskComplexity, TextFeatures, _estimate, cluster_of, complexity_of, family_of
from .context import TemplateIndex, template_key
from .decision import _MEAN_SCORE, RoutingDecision, RoutingStrategy, ScoredCandidate, _construct, _Row
from .outcomes import InferenceTask, OutcomeTracker
from .pool import LOCAL_FIRST, CatalogView, ModelPool, ModelView, PromptMeter
from .scoring import Context, score_candidates
from .spend import SpendControl

__all__ = ["AdaptiveRouter", "RoutingDecision", "RoutingStrategy", "ScoredCandidate"]

AUTO_THINKING_BUDGET = 8000
TOKENS_PER_IMAGE = 800
# How far off the calibrated estimate may be (code, non-Latin scripts): a local model whose window
# is below est * EXACT_BAND + max_tokens gets the request counted on its own tokenizer.
EXACT_BAND = 2.0
# Beyond this many characters of text (or messages) a request is never tokenized for routing: the
# estimate decides. Counting 20,000 messages through a chat template took seconds.
METER_MAX_CHARS = 200_000
METER_MAX_MESSAGES = 1_000
PREFERRED_REASON = "preferred generation model override"
EXPLICIT_REASON = "explicit model"


_Measure = Callable[[ModelView, int, int], int]  # (model, estimated input, max_tokens) -> input tokens


@dataclass(slots=True)
class _Analysis:
    """What the router reads from a request before it looks at any model."""

    ctx: Context
    required: frozenset[str]
    est_in: int
    prefer_local: bool


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
        """``use_clusters=False`` learns per task family only (cluster and template off).
        ``meter`` gives real context windows and exact local token counts (see ``pool``)."""
        self.settings = settings or RoutingSettings()
        self.use_clusters = use_clusters
        self.tracker = tracker
        self.breakers = breakers
        self.spend = spend
        self._rng = random.Random(rng_seed if rng_seed is not None else self.settings.seed)
        self.meter = meter
        self.templates = TemplateIndex()
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

    def _expected_quality(self, model_id: str, ctx: Context) -> float:
        """The mean of a model's quality belief in this context (``estimate``)."""
        priors = {m: e[0] for m, e in self._family_table(ctx.family).items()}
        prior = self.prior(model_id, ctx.family)
        quality, _n = self.tracker.quality(model_id, ctx.family, prior, cluster=ctx.cluster, priors=priors)
        return quality

    # --- deciding ------------------------------------------------------------------------------

    @property
    def rng(self) -> random.Random:
        """The router's random source (Thompson draws), seeded by ``[routing] seed``."""
        return self._rng

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
        pinned = registry.resolve(request.model, ModelCapability.GENERATE) if request.model else None
        a = self._analyse(request, estimated_input_tokens)
        if pinned is not None:
            return self._explicit(request, pinned, a)
        strategy, note = RoutingStrategy.ADAPTIVE, ""
        if preferred:
            pinned, note = self._preferred(preferred, registry, a, request.params.max_tokens)
            if pinned is not None:
                strategy = RoutingStrategy.PREFERRED
        exact: dict[str, int] = {}  # model id -> prompt tokens on its own tokenizer
        measure = self._measurer(request, exact)
        pool = self._catalog.pool(a.required)
        excluded = dict(pool.excluded)
        cands, relaxed, over_budget = self._candidates(
            pool, excluded=excluded, est_in=a.est_in, max_tokens=request.params.max_tokens,
            prefer_local=a.prefer_local, skip=pinned.id if pinned is not None else None, measure=measure,
        )  # fmt: skip
        if pinned is None and not cands:
            if over_budget and self.spend is not None:  # name the limit, as the engine's check would
                view, estimate = min(over_budget, key=itemgetter(1))
                self.spend.check(view.provider, estimate)
            raise _no_candidates(set(a.required), excluded)
        rows, offset, width, newcomers = score_candidates(
            cands, self._family_table(a.ctx.family), self.tracker, self.settings, a.ctx, self._rng,
            workload=request.params.workload, est_in=a.est_in, max_tokens=request.params.max_tokens,
        )  # fmt: skip
        notes: dict[str, str] = {}
        if pinned is not None:
            quality = self._expected_quality(pinned.id, a.ctx)
            chosen_id, reason = pinned.id, PREFERRED_REASON + (f"; {note}" if note else "")
        else:
            pick = rows[0]
            best_mean = max(rows, key=_MEAN_SCORE)
            if relaxed:
                strategy = RoutingStrategy.FALLBACK
            elif pick is not best_mean:
                strategy = RoutingStrategy.EXPLORE
                notes[pick[5].model_id] = (
                    f"chosen: drew {pick[7]:.2f} (quality {pick[1]:.2f} ± {pick[6]:.2f}); "
                    f"{best_mean[5].model_id} scores best at its mean"
                )
            chosen_id, quality = pick[5].model_id, pick[1]
            if width < 1.0:
                note = f"{note}; " if note else ""
                note += f"settled context: draws at {width:.2f} of the uncertainty"
                if newcomers:
                    note += f" ({newcomers} new here: whole)"
            reason = _reason(strategy, a.ctx, pick, len(rows), len(excluded), relaxed, note)
        return self._decision(request, a, rows, offset, notes, chosen_id, strategy, reason, quality,
                              measure, exact, excluded, registry)  # fmt: skip

    def _template_learned(self, signature: str) -> bool:
        return self.tracker.has_rows(template_key(signature))

    def _analyse(self, request: GenerateRequest, est_in: int | None) -> _Analysis:
        """Family, cluster and template, complexity, needed capabilities and estimated input."""
        feats = TextFeatures(request.last_user_text())
        has_tools = request.calls_tools()
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
        cluster = None
        if self.use_clusters:
            cluster = cluster_of(feats)
            template = self.templates.signature(request, feats.text, self._template_learned)
            if template is not None:
                cluster += "/" + template
        required = {"generate"}
        if has_tools:
            required.add("tool_use")
        if has_vision:
            required.add("vision")
        if intent is not None:
            required.update(c.value for c in intent.require)
        return _Analysis(
            ctx=Context(family, cluster, complexity_of(feats, has_tools=has_tools, has_vision=has_vision)),
            required=frozenset(required),
            est_in=est_in if est_in is not None else self._estimate_input(request, feats),
            prefer_local=self.settings.prefer_local or (intent is not None and intent.prefer_local),
        )

    def _preferred(
        self, name: str, registry: UnifiedRegistry, a: _Analysis, max_tokens: int
    ) -> tuple[ModelSchema | None, str]:
        """The ``[preferred]`` model when it can take this request, else (None, why it is passed
        over: the request is routed, and the decision says so). One whose circuit is open is passed
        over, as the engine would (it was "chosen" and then skipped for a fallback); one this
        request would take past a spend limit refuses it, as the engine does (``SpendLimitExceeded``:
        the decision listed fallbacks that never ran)."""
        found = registry.find(name)
        why = (
            "not in catalog"
            if found is None
            else "not available"
            if not found.available
            else "lacks a capability"
            if not a.required <= {c.value for c in found.capabilities}
            else "circuit open"
            if found.id in self.breakers.blocked()
            else None
        )
        if why is not None or found is None:
            return None, f"preferred {name} {why}"
        self._within_limits(found, a, max_tokens)
        return found, ""

    def _within_limits(self, model: ModelSchema, a: _Analysis, max_tokens: int) -> None:
        """Raise ``SpendLimitExceeded`` where this request would take the caller's chosen model past
        a spend limit, as the engine refuses it before the call (there is no other model to route
        to). ``car route -m`` and ``POST /v1/route`` approved it, and a route-only client ran it."""
        if self.spend is not None and not model.in_process:
            breach = self.spend.breach(model.provider, model.cost.estimate(a.est_in, max_tokens))
            if breach is not None:
                raise breach

    def _explicit(self, request: GenerateRequest, pinned: ModelSchema, a: _Analysis) -> RoutingDecision:
        """The caller named the model: no candidates, no scoring, no fallbacks (the engine adds
        the ones configured for it). Its predicted quality is the mean of its belief here. One this
        request would take past a spend limit is refused here (an open circuit is not: the engine
        then tries the model's own fallbacks)."""
        self._within_limits(pinned, a, request.params.max_tokens)
        quality = self._expected_quality(pinned.id, a.ctx)
        exact: dict[str, int] = {}
        return self._decision(request, a, [], 0.0, {}, pinned.id, RoutingStrategy.EXPLICIT,
                              EXPLICIT_REASON, quality, self._measurer(request, exact), exact, {}, None,
                              pinned=pinned)  # fmt: skip

    def _decision(
        self,
        request: GenerateRequest,
        a: _Analysis,
        rows: list[_Row],
        offset: float,
        notes: dict[str, str],
        chosen_id: str,
        strategy: RoutingStrategy,
        reason: str,
        quality: float,
        measure: _Measure | None,
        exact: dict[str, int],
        excluded: dict[str, str],
        registry: UnifiedRegistry | None,
        *,
        pinned: ModelSchema | None = None,
    ) -> RoutingDecision:
        """The decision object: thinking budget, the chosen model's window and exact count."""
        params = request.params
        view = self._catalog.models.get(chosen_id)
        schema = pinned if pinned is not None else view.schema if view is not None else None
        if schema is None:  # a preferred model outside the synced catalog view
            assert registry is not None
            schema = registry.resolve(chosen_id)
        budget = params.budget_tokens
        if (
            budget == 0
            and a.ctx.complexity is TaskComplexity.COMPLEX
            and params.thinking is not ThinkingMode.OFF
            and view is not None
            and view.supports_thinking
        ):
            budget = AUTO_THINKING_BUDGET
        context_length = view.context_length if view is not None else schema.context_length
        if measure is not None and view is not None and chosen_id not in exact:
            measure(view, a.est_in, params.max_tokens)
        input_tokens = exact.get(chosen_id, a.est_in)
        fallbacks = (
            [] if strategy is RoutingStrategy.EXPLICIT else self._fallbacks(rows, chosen_id, schema.provider)
        )
        return _construct(
            rows, notes, offset, model_id=chosen_id, model_name=schema.name, task=InferenceTask.GENERATE,
            task_family=a.ctx.family, prompt_cluster=a.ctx.cluster, complexity=a.ctx.complexity,
            strategy=strategy, reason=reason, predicted_quality=quality, fallbacks=fallbacks,
            context_length=context_length, needs_compaction=0 < context_length < input_tokens,
            estimated_input_tokens=input_tokens, thinking_budget=budget, excluded=excluded,
        )  # fmt: skip

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

    def _measurer(self, request: GenerateRequest, exact: dict[str, int]) -> _Measure | None:
        """Exact prompt tokens for a local model whose window the estimate cannot settle (below
        ``est * EXACT_BAND + max_tokens``), remembered in ``exact``; else the estimate. None
        without a meter, or for a request too large to count cheaply (``METER_MAX_CHARS``)."""
        meter = self.meter
        if meter is None or len(request.messages or ()) > METER_MAX_MESSAGES:
            return None
        if (
            len(request.prompt)
            + len(request.context or "")
            + sum(len(m.text()) for m in request.messages or ())
            > METER_MAX_CHARS
        ):
            return None

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


def _reason(
    strategy: RoutingStrategy, ctx: Context, pick: _Row, n_rows: int, n_excluded: int, relaxed: str, note: str
) -> str:
    _score, quality, obs, latency, cost, view, sd, _drawn, tokens, _ms = pick
    reason = (
        f"{strategy}: {ctx.family}/{ctx.complexity} -> {view.model_id} (quality {quality:.2f} ± {sd:.2f} "
        f"from {obs} obs, {latency:.0f} ms, ${cost:.5f} for ~{tokens:.0f} output tokens); {n_rows} "
        f"candidates, {n_excluded} excluded"
    )
    if relaxed:
        reason += f" ({relaxed})"
    if note:
        reason += f"; {note}"
    return reason


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
