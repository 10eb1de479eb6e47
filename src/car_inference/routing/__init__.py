"""Routing and learning: which model serves a request, and what its outcomes teach.

Pure Python, no I/O except the outcome store: SQLite (``OutcomeStore``) or, with ``[state] url``,
PostgreSQL (``PgOutcomeStore``). The engine owns one of each::

    store = open_store(config.state.url, config.paths.state_db)
    tracker = OutcomeTracker(store, config.routing)
    apply_benchmark_priors(tracker, load_all_benchmark_priors(config.home))
    breakers = CircuitBreakerRegistry(config.breaker)
    spend = SpendControl(config.spend, store)
    router = AdaptiveRouter(config.routing, tracker, breakers, spend)

and per generate request::

    decision = router.decide(request, registry, preferred=config.preferred.generate)
    for model_id in [decision.model_id, *decision.fallbacks]:
        if not breakers.allow(model_id): continue          # claims a half-open probe
        spend.check(provider, cost_estimate)                # raises SpendLimitExceeded
        trace = tracker.record_start(model_id, InferenceTask.GENERATE, decision.task_family,
                                     decision.reason, prompt, cluster=decision.prompt_cluster)
        try: result = run(model_id)
        except InferenceError as exc:
            breakers.record_failure(model_id, failure_weight(exc))
            tracker.record_failure(trace, type(exc).__name__, str(exc)); continue
        breakers.record_success(model_id)
        tracker.record_complete(trace, latency_ms, input_tokens, output_tokens, ttft_ms)
        tracker.record_signals(trace, detect_signals(request, result))
        spend.record(provider, model_id, cost_usd)
        return result

``tracker.record_feedback(trace_id, score)`` takes a user's rating later.
"""

from __future__ import annotations

from .breaker import CircuitBreakerRegistry, CircuitState, failure_weight
from .complexity import TaskComplexity, assess_complexity, estimate_tokens, prompt_cluster, task_family
from .outcomes import InferenceTask, ModelProfile, OutcomeTracker, TaskStats
from .priors import (
    BenchmarkPrior,
    apply_benchmark_priors,
    benchmark_priors_paths,
    load_all_benchmark_priors,
    load_benchmark_priors,
)
from .router import AdaptiveRouter, RoutingDecision, RoutingStrategy, ScoredCandidate
from .signals import ImplicitSignal, ImplicitSignalType, answer_signals, detect_signals
from .spend import SpendControl, SpendPeriodStatus, SpendStatus
from .store import OutcomeStore
from .store_api import StateHealth, StateStore, open_store, state_health, went_unanswered

__all__ = [
    "AdaptiveRouter",
    "BenchmarkPrior",
    "CircuitBreakerRegistry",
    "CircuitState",
    "ImplicitSignal",
    "ImplicitSignalType",
    "InferenceTask",
    "ModelProfile",
    "OutcomeStore",
    "OutcomeTracker",
    "RoutingDecision",
    "RoutingStrategy",
    "ScoredCandidate",
    "SpendControl",
    "SpendPeriodStatus",
    "SpendStatus",
    "StateHealth",
    "StateStore",
    "TaskComplexity",
    "TaskStats",
    "answer_signals",
    "apply_benchmark_priors",
    "assess_complexity",
    "benchmark_priors_paths",
    "detect_signals",
    "estimate_tokens",
    "failure_weight",
    "load_all_benchmark_priors",
    "load_benchmark_priors",
    "open_store",
    "prompt_cluster",
    "state_health",
    "task_family",
    "went_unanswered",
]
