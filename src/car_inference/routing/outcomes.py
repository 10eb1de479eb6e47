"""OutcomeTracker: what happened to each request, and what it says about each model.

The tracker keeps an in-memory mirror of the per-model profiles and per-(model, family) stats so the
router reads them without I/O, and writes every change through to the ``OutcomeStore`` (when there
is one) as one SQLite transaction. ``reload()`` re-reads the store to pick up other processes' work.

Quality signal per trace: 1 for a success, 0 for a failure; explicit feedback (0..1) replaces it;
implicit signals (``signals.py``) lower it.

Predicted quality (``quality``): see ``estimate.py``.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from statistics import median
from typing import Any

from ..config import RoutingSettings
from .estimate import (
    ProfileRow,
    StatsRow,
    belief,
    difficulty,
    family_level,
    first_look,
    noise_of,
    template_shift,
)
from .priors import BenchmarkPrior
from .profiles import (
    ModelProfile,
    TaskStats,
    export_profile,
    export_stats,
    imported_profile,
    mean_latencies,
    parsed_profiles,
    replace_models,
    row_fields,
    sum_rows,
)
from .reload import StoreReader
from .signals import ImplicitSignal, ImplicitSignalType
from .store import (
    ALL,
    TraceRow,
    baseline_rows,
    is_templated,
    stat_keys,
    trace_quality,
)
from .store_api import StateStore

__all__ = ["InferenceTask", "ModelProfile", "OutcomeTracker", "TaskStats"]

LATENCY_WINDOW = 256
MIN_LATENCY_SAMPLES = 3
_MAX_MEMORY_TRACES = 50_000


class InferenceTask(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"
    CLASSIFY = "classify"
    RERANK = "rerank"
    GROUND = "ground"
    TOKENIZE = "tokenize"
    TRANSCRIBE = "transcribe"
    SYNTHESIZE = "synthesize"
    GENERATE_IMAGE = "generate_image"
    GENERATE_VIDEO = "generate_video"


@dataclass(slots=True)
class _Trace:
    model_id: str
    family: str
    cluster: str | None
    prompt_hash: str | None
    started_at: float
    outcome: str = "pending"
    base: float | None = None
    penalty: float = 0.0
    feedback: float | None = None
    quality: float | None = None
    signals: list[str] = field(default_factory=list)


def prompt_hash(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode("utf-8", "replace"), digest_size=12).hexdigest()


class OutcomeTracker:
    def __init__(
        self,
        store: StateStore | None = None,
        settings: RoutingSettings | None = None,
        *,
        quick_retry_window_s: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings or RoutingSettings()
        self.quick_retry_window_s = quick_retry_window_s
        self._clock = clock
        self._lock = threading.RLock()
        self._profiles: dict[str, ProfileRow] = {}
        self._stats: dict[str, dict[str, StatsRow]] = {}  # key -> model_id -> stats
        self._latencies: dict[str, deque[float]] = {}
        self._p50: dict[str, float] = {}  # only models with MIN_LATENCY_SAMPLES or more
        self._priors: dict[str, BenchmarkPrior] = {}
        self._traces: OrderedDict[str, _Trace] = OrderedDict()  # only without a store
        self._recent_prompts: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.priors_version = 0  # bumped when benchmark priors change, for the router's caches
        self._version = 0  # bumped when the stats are replaced (reload, import): every family's view
        self._family_gen: dict[str, int] = {}  # bumped by a change under a family: its view only
        self._family_views: dict[str, tuple[tuple[int, int], dict[str, StatsRow]]] = {}
        self._siblings: dict[str, list[str]] = {}  # family -> its family|cluster keys
        self._indexed = -1  # len(self._stats) when _siblings was built
        # Called after each change written to the store: a fleet tells the other replicas, which
        # then call reload() (routing/coord.py).
        self.on_change: Callable[[], None] | None = None
        self._reader = StoreReader(store, LATENCY_WINDOW) if store is not None else None
        if store is not None:
            self.reload()

    # --- recording -----------------------------------------------------------------------------

    def record_start(
        self,
        model_id: str,
        task: InferenceTask | str = InferenceTask.GENERATE,
        family: str = "chat",
        reason: str = "",
        prompt: str | None = None,
        *,
        cluster: str | None = None,
        trace_id: str | None = None,
        started_at: float | None = None,
    ) -> str:
        """Open a trace for one attempt; returns its id (``trace_id`` when the caller chose it, as
        the engine does to record off the request path). With ``prompt``, a repeat of the same
        prompt within ``quick_retry_window_s`` marks the earlier trace with a quick_retry signal."""
        trace_id = trace_id or uuid.uuid4().hex
        now = started_at if started_at is not None else self._clock()
        phash = prompt_hash(prompt) if prompt else None
        previous: str | None = None
        if self.store is not None:
            row = TraceRow(trace_id, model_id, str(task), family, cluster, reason, phash, now)
            previous = self.store.start_trace(
                row, retry_window_s=self.quick_retry_window_s if phash else None
            )
        else:
            with self._lock:
                self._traces[trace_id] = _Trace(model_id, family, cluster, phash, now)
                if len(self._traces) > _MAX_MEMORY_TRACES:
                    self._traces.popitem(last=False)
                if phash:
                    hit = self._recent_prompts.pop(phash, None)
                    if hit is not None and now - hit[1] <= self.quick_retry_window_s:
                        earlier = self._traces.get(hit[0])
                        if earlier is not None and earlier.outcome != "failure":  # as the store does
                            previous = hit[0]
                    self._recent_prompts[phash] = (trace_id, now)
                    if len(self._recent_prompts) > 10_000:
                        self._recent_prompts.popitem(last=False)
        if previous is not None and previous != trace_id:
            self.record_signal(previous, ImplicitSignal(ImplicitSignalType.QUICK_RETRY))
        return trace_id

    def record_attempt(
        self,
        model_id: str,
        task: InferenceTask | str = InferenceTask.GENERATE,
        family: str = "chat",
        reason: str = "",
        prompt: str | None = None,
        *,
        trace_id: str,
        started_at: float,
        success: bool | None,
        cluster: str | None = None,
        latency_ms: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        ttft_ms: float | None = None,
        error_class: str | None = None,
        message: str = "",
        score: float | None = None,
    ) -> None:
        """A whole attempt, recorded once it is over: ``record_start`` then ``record_complete`` /
        ``record_failure``, in one store transaction instead of two. ``success=None`` records an
        abandoned attempt (its consumer stopped reading): kept as a trace, counted nowhere.
        ``score``: its explicit quality, when already known (``record_feedback`` at once)."""
        if score is not None and not 0.0 <= score <= 1.0:
            raise ValueError(f"score must be within 0..1, got {score}")
        if self.store is None:
            self.record_start(
                model_id, task, family, reason, prompt, cluster=cluster, trace_id=trace_id,
                started_at=started_at,
            )  # fmt: skip
            if success is None:
                with self._lock:
                    trace = self._traces.get(trace_id)
                    if trace is not None:
                        trace.outcome = "abandoned"
            elif success:  # an unknown latency stays unknown: 0 would make the model look instant
                self.record_complete(trace_id, latency_ms, input_tokens, output_tokens, ttft_ms)
            else:
                self.record_failure(trace_id, error_class or "error", message)
            if score is not None and success is not None:
                self.record_feedback(trace_id, score)
            return
        phash = prompt_hash(prompt) if prompt else None
        row = TraceRow(trace_id, model_id, str(task), family, cluster, reason, phash, started_at)
        now = self._clock()
        previous, quality = self.store.record_trace(
            row, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
            output_tokens=output_tokens, ttft_ms=ttft_ms, error_class=error_class,
            error=message[:500] if error_class else None, now=now,
            retry_window_s=self.quick_retry_window_s if phash else None, score=score,
        )  # fmt: skip
        if success is not None:
            with self._lock:
                self._observe(
                    model_id, family=family, cluster=cluster, success=success, latency_ms=latency_ms,
                    input_tokens=input_tokens, output_tokens=output_tokens, quality=quality, now=now,
                )  # fmt: skip
        if previous is not None and previous != trace_id:
            self.record_signal(previous, ImplicitSignal(ImplicitSignalType.QUICK_RETRY))

    def record_complete(
        self, trace_id: str, latency_ms: float | None, input_tokens: int = 0, output_tokens: int = 0,
        ttft_ms: float | None = None,
    ) -> bool:  # fmt: skip
        """The attempt succeeded. A trace is counted once; later calls for it are ignored (False:
        this call did not complete it)."""
        return self._finish(
            trace_id, True, latency_ms=latency_ms, input_tokens=input_tokens, output_tokens=output_tokens,
            ttft_ms=ttft_ms, error_class=None, message=None,
        )  # fmt: skip

    def record_failure(
        self, trace_id: str, error_class: str, message: str = "", *, latency_ms: float | None = None
    ) -> bool:
        """The attempt failed (``error_class``: the exception's class name, or an HTTP status);
        False when the trace was unknown or complete already."""
        return self._finish(
            trace_id, False, latency_ms=latency_ms, input_tokens=0, output_tokens=0, ttft_ms=None,
            error_class=error_class, message=message[:500],
        )  # fmt: skip

    def _finish(
        self,
        trace_id: str,
        success: bool,
        *,
        latency_ms: float | None,
        input_tokens: int,
        output_tokens: int,
        ttft_ms: float | None,
        error_class: str | None,
        message: str | None,
    ) -> bool:
        now = self._clock()
        if self.store is not None:
            done = self.store.finish_trace(
                trace_id, success=success, latency_ms=latency_ms, input_tokens=input_tokens,
                output_tokens=output_tokens, ttft_ms=ttft_ms, error_class=error_class, error=message, now=now,
            )  # fmt: skip
            if done is None:
                return False
            row, quality = done
            model_id, family, cluster = row.model_id, row.family, row.cluster
        else:
            with self._lock:
                t = self._traces.get(trace_id)
                if t is None or t.outcome != "pending":
                    return False
                t.outcome = "success" if success else "failure"
                t.base = 1.0 if success else 0.0
                t.quality = trace_quality(t.base, t.penalty, t.feedback)
                quality = t.base if t.quality is None else t.quality
                model_id, family, cluster = t.model_id, t.family, t.cluster
        with self._lock:
            self._observe(
                model_id, family=family, cluster=cluster, success=success, latency_ms=latency_ms,
                input_tokens=input_tokens, output_tokens=output_tokens, quality=quality, now=now,
            )  # fmt: skip
        return True

    def _observe(
        self,
        model_id: str,
        *,
        family: str,
        cluster: str | None,
        success: bool,
        latency_ms: float | None,
        input_tokens: int,
        output_tokens: int,
        quality: float,
        now: float,
    ) -> None:
        """The mirror's copy of the store's upserts (same arithmetic)."""
        if self.on_change is not None:
            self.on_change()
        p = self._profiles.get(model_id)
        if p is None:
            p = self._profiles[model_id] = ProfileRow()
        p.add(quality, success, latency_ms, input_tokens, output_tokens, now)
        rows = [(model_id, key) for key in stat_keys(family, cluster)]
        rows += list(baseline_rows(family, cluster))
        for row_model, key in rows:
            by_model = self._stats.get(key)
            if by_model is None:
                by_model = self._stats[key] = {}
            s = by_model.get(row_model)
            if s is None:  # joined now: after the key's outcomes so far (its baseline comes last)
                base = by_model.get(ALL)
                s = by_model[row_model] = StatsRow(joined_at=base.calls if base is not None else 0)
            s.add(quality, success, latency_ms, output_tokens, now)
        if not is_templated(cluster):  # a template's rows are in no family's view
            self._family_gen[family] = self._family_gen.get(family, 0) + 1
        if success and latency_ms is not None:
            window = self._latencies.get(model_id)
            if window is None:
                window = self._latencies[model_id] = deque(maxlen=LATENCY_WINDOW)
            window.append(float(latency_ms))
            if len(window) >= MIN_LATENCY_SAMPLES:
                self._p50[model_id] = median(window)

    def record_feedback(self, trace_id: str, score: float) -> None:
        """Explicit feedback, 0 (bad) .. 1 (good): replaces the trace's quality score."""
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"feedback score must be within 0..1, got {score}")
        self._adjust(trace_id, "explicit", float(score), explicit=True)

    def record_signal(self, trace_id: str, signal: ImplicitSignal) -> None:
        """An implicit signal: lowers the trace's quality by its weight (unless rated explicitly)."""
        self._adjust(trace_id, str(signal.type), signal.weight, explicit=False)

    def record_signals(self, trace_id: str, signals: Iterable[ImplicitSignal]) -> None:
        for signal in signals:
            self.record_signal(trace_id, signal)

    def _adjust(self, trace_id: str, kind: str, value: float, *, explicit: bool) -> None:
        now = self._clock()
        if self.store is not None:
            change = self.store.adjust_quality(trace_id, kind, value, explicit=explicit, now=now)
            if change is None:
                return
            model_id, keys, delta = change.model_id, change.keys, change.delta
        else:
            with self._lock:
                t = self._traces.get(trace_id)
                if t is None:
                    return
                t.signals.append(kind)
                if explicit:
                    t.feedback = value
                else:
                    t.penalty += value
                new = trace_quality(t.base, t.penalty, t.feedback)
                old, t.quality = t.quality, new
                if old is None or new is None or new == old:
                    return
                model_id, keys, delta = t.model_id, stat_keys(t.family, t.cluster), new - old
        with self._lock:
            p = self._profiles.get(model_id)
            if p is not None:
                p.shift(delta)
            family, cluster = keys[0], keys[-1].split("|", 1)[1] if len(keys) > 1 else None
            rows = [(model_id, key) for key in keys]
            rows += list(baseline_rows(family, cluster))
            for row_model, key in rows:
                s = self._stats.get(key, {}).get(row_model)
                if s is not None:
                    s.shift(delta)
            if not family.startswith("template|"):
                self._family_gen[family] = self._family_gen.get(family, 0) + 1
        if self.on_change is not None:
            self.on_change()

    # --- reading -------------------------------------------------------------------------------

    def quality(
        self,
        model_id: str,
        family: str,
        prior: float,
        *,
        cluster: str | None = None,
        priors: dict[str, float] | None = None,
    ) -> tuple[float, int]:
        """Predicted quality for ``model_id`` in this context (``estimate``'s belief, its mean)
        and how many of its calls were in the narrowest key (cluster, template or family)."""
        mean, _var, n = self.belief(model_id, family, prior, cluster=cluster, priors=priors)
        return mean, n

    def belief(
        self,
        model_id: str,
        family: str,
        prior: float,
        *,
        cluster: str | None = None,
        priors: dict[str, float] | None = None,
    ) -> tuple[float, float, int]:
        """(mean, variance, calls in the narrowest key) of the model's quality in this context,
        from its ``prior`` for the family. ``priors``: the other models' priors, which the
        context's difficulty is measured against (0.5 for those not given)."""
        _profiles, levels, _p50 = self.views(family, cluster)
        mean = prior + difficulty(levels, priors if priors is not None else {model_id: prior})
        rows = [lv.get(model_id) for lv in levels]
        var = self.settings.prior_sd**2
        if rows and rows[0] is None:
            mean, var = first_look(mean, var, self._profiles.get(model_id))
        detached, shift = is_templated(cluster), template_shift(levels)
        mean, var, n = belief(mean, var, rows, noise_of(mean), detached=detached, shift=shift)
        return (0.0 if mean < 0.0 else 1.0 if mean > 1.0 else mean), var, n

    def observations(self, model_id: str, family: str) -> int:
        by_model = self._stats.get(family)
        s = by_model.get(model_id) if by_model is not None else None
        return s.calls if s is not None else 0

    def latency_p50(self, model_id: str) -> float | None:
        """Median of the last successful latencies (ms); None before ``MIN_LATENCY_SAMPLES``."""
        return self._p50.get(model_id)

    def views(
        self, family: str, cluster: str | None
    ) -> tuple[dict[str, ProfileRow], list[dict[str, StatsRow]], dict[str, float]]:
        """Read-only views for the router's scoring loop: the profiles, the rows of each level of
        the request's context (family, then family|cluster, then for a templated request
        ``coarse/<signature>`` its template, which ``stat_keys`` counts under no other key), and the
        latency p50s."""
        empty: dict[str, StatsRow] = {}
        if not cluster:
            return self._profiles, [self._stats.get(family, empty)], self._p50
        coarse, sep, _ = cluster.partition("/")
        key = f"{family}|{coarse}"
        levels = [self._family_view(family, key), self._stats.get(key, empty)]
        if sep:
            levels.append(self._stats.get(stat_keys(family, cluster)[0], empty))
        return self._profiles, levels, self._p50

    def _family_view(self, family: str, key: str) -> dict[str, StatsRow]:
        """The family level of requests counted under ``key`` (``estimate.family_level``), kept
        until the family's stats change: an outcome in another family keeps it (under load nearly
        every decision followed some outcome, and rebuilding doubled a decision's p50)."""
        version = (self._version, self._family_gen.get(family, 0))
        cached = self._family_views.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        stats = self._stats
        empty: dict[str, StatsRow] = {}
        if self._indexed != len(stats):
            siblings: dict[str, list[str]] = {}
            for k in list(stats):  # list(): a copy made without releasing the GIL
                head, sep, _ = k.partition("|")
                if sep and head != "template":
                    siblings.setdefault(head, []).append(k)
            self._siblings, self._indexed = siblings, len(stats)
        here = stats.get(key, empty)
        level = family_level(
            stats.get(family, empty), here, [stats.get(k, empty) for k in self._siblings.get(family, ())]
        )
        self._family_views[key] = (version, level)
        return level

    def benchmark_prior(self, model_id: str) -> BenchmarkPrior | None:
        return self._priors.get(model_id)

    def add_benchmark_prior(self, prior: BenchmarkPrior) -> bool:
        """Keep ``prior`` for routing; create a prior-only profile when the model has no observed
        one (returns True then). Observed profiles are never touched."""
        with self._lock:
            self._priors[prior.model_id] = prior
            self.priors_version += 1
            existing = self._profiles.get(prior.model_id)
            if existing is not None and existing.total_calls > 0:
                return False
            self._profiles[prior.model_id] = ProfileRow(
                ema_quality=prior.overall_score, updated_at=self._clock()
            )
            return True

    def profile(self, model_id: str) -> ModelProfile | None:
        with self._lock:
            p = self._profiles.get(model_id)
            return None if p is None else export_profile(model_id, p, self._stats)

    def task_stats(self, model_id: str, family: str) -> TaskStats | None:
        s = self._stats.get(family, {}).get(model_id)
        return None if s is None else export_stats(s)

    def has_rows(self, key: str) -> bool:
        """Whether anything was learned under ``key`` (here, or in the store at the last load)."""
        return bool(self._stats.get(key))

    def model_ids(self) -> list[str]:
        with self._lock:  # the engine's record writer may add a profile meanwhile
            return sorted(self._profiles)

    def export_profiles(self) -> list[ModelProfile]:
        with self._lock:
            return [export_profile(m, p, self._stats) for m, p in sorted(self._profiles.items())]

    def import_profiles(self, profiles: Iterable[ModelProfile | dict[str, Any]]) -> int:
        """Restore profiles (the ``outcome_profiles.json`` shape): each replaces the model's profile
        and task stats, in memory and in the store; baselines are rebuilt from all models' stats.
        Returns how many were imported."""
        parsed = parsed_profiles(profiles)
        ids = {mp.model_id for mp in parsed}
        # The baselines written below are sums of this process's copy: read it fresh first (a
        # long-lived engine's stale copy erased other processes' outcomes from every baseline).
        self.reload(full=True)
        with self._lock:
            touched = replace_models(self._stats, parsed)
            self._rebuild_baselines()
            self._version += 1  # every family's view is stale
            model_rows = []
            for mp in parsed:
                p = self._profiles[mp.model_id] = imported_profile(mp, self._stats)
                model_rows.append({"model_id": mp.model_id, **row_fields(p)})
            self._p50.update(mean_latencies(self._profiles, self._p50.keys(), MIN_LATENCY_SAMPLES))
            task_rows = [  # the imported models' rows, and the baselines of the keys they change
                {"model_id": model_id, "key": key, **row_fields(s)}
                for key in touched
                for model_id, s in self._stats.get(key, {}).items()
                if model_id in ids or model_id == ALL
            ]
        if self.store is not None:
            self.store.replace_profiles(model_rows, task_rows)
            if self.on_change is not None:
                self.on_change()
        return len(parsed)

    def forget(self, keys: Iterable[str], older_than: float) -> None:
        """Drop the rows of ``keys`` (templates the store forgot: ``StateStore.forget_templates``)
        from the mirror, unless one of them was updated since ``older_than`` (counted here and
        not yet in the store)."""
        with self._lock:
            for key in keys:
                by_model = self._stats.get(key)
                if by_model is not None and all(s.updated_at < older_than for s in by_model.values()):
                    del self._stats[key]
            self._indexed = -1  # the sibling index is rebuilt from the keys left

    def forget_model(self, model_id: str) -> None:
        """Drop what was learned about ``model_id`` (``StateStore.forget_model``): its profile
        (back to its benchmark prior, if any) and its rows under every key. It is then tried as
        a new model is, in full even where a context has settled (``scoring.is_newcomer``)."""
        with self._lock:
            prior = self._priors.get(model_id)
            self._profiles.pop(model_id, None)
            if prior is not None:
                self._profiles[model_id] = ProfileRow(ema_quality=prior.overall_score)
            for by_model in self._stats.values():
                by_model.pop(model_id, None)
            self._latencies.pop(model_id, None)  # a new process knew none; this one kept its p50
            self._p50.pop(model_id, None)
            self._version += 1  # every family's view is stale
        if self.on_change is not None:
            self.on_change()

    def _rebuild_baselines(self) -> None:
        """Baseline rows as the sums of every model's rows."""
        for by_model in self._stats.values():
            by_model[ALL] = sum_rows(s for model_id, s in by_model.items() if model_id != ALL)

    def reload(self, *, full: bool = False) -> None:
        """Re-read what other processes wrote: profiles and the stats that changed (everything,
        recent latencies included, when ``full``, the first time and now and then: ``reload.py``)."""
        if self._reader is None:
            return
        got = self._reader.read(self._stats, full=full)
        profiles = got.profiles
        with self._lock:
            for model_id, prior in self._priors.items():
                if model_id not in profiles:
                    profiles[model_id] = ProfileRow(ema_quality=prior.overall_score)
            if got.latencies is not None:
                self._latencies = got.latencies
                self._p50 = {m: median(w) for m, w in got.latencies.items() if len(w) >= MIN_LATENCY_SAMPLES}
            self._profiles, self._stats = profiles, got.stats
            self._p50.update(mean_latencies(self._profiles, self._p50.keys(), MIN_LATENCY_SAMPLES))
            self._version += 1
            self._indexed = -1
