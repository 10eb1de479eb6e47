"""Route-only use: the caller runs the model itself and tells the router how it went.

RouteLLM-style users ask for a decision, call the model on their own, and report the outcome; a
replay of logged outcomes drives the learning the same way. ``report`` records the outcome of a
decision in one store transaction (the trace, its explicit score, the counters), exactly what the
engine records for an answer it produced itself, so the router learns from it identically.
``open_trace`` keeps a pending trace for a decision whose outcome comes later by trace id (``POST
/v1/route`` then ``POST /v1/feedback``): ``feedback`` on a pending trace completes it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import InvalidInput, TraceNotFound, expect, validation_summary
from ..requests import GenerateParams, GenerateRequest
from ..routing import OutcomeTracker, RoutingDecision
from ..routing.estimate import ALL
from ..routing.outcomes import InferenceTask
from ..routing.store_api import compact_old_spend, forget_dormant_templates, prune_old_traces
from ..schema import ModelCapability, ModelSchema
from ..textcheck import unpaired_surrogate
from .lifecycle import Lifecycle

if TYPE_CHECKING:
    from ..config import CarConfig
    from ..registry import UnifiedRegistry
    from ..routing import SpendControl, StateStore
    from .bookkeeping import Bookkeeper

__all__ = ["SHARED_TRACE_WAIT_S", "LearningMixin"]

log = logging.getLogger(__name__)

# How long feedback on a trace not in a shared store yet waits for another replica to write it.
SHARED_TRACE_WAIT_S = 2.0
HANDED_ON_KEPT = 10_000  # broken streams whose feedback is passed on to the trace that finished them
HANDED_ON_HOPS = 8


class LearningMixin(Lifecycle):
    if TYPE_CHECKING:  # provided by InferenceEngine
        config: CarConfig
        tracker: OutcomeTracker
        store: StateStore
        spend: SpendControl
        bookkeeper: Bookkeeper
        registry: UnifiedRegistry
        _handed: OrderedDict[str, str]  # broken stream's trace -> the trace that finished it

        async def _route_off_loop(self, request: GenerateRequest) -> RoutingDecision: ...
        def resolve(self, name: str) -> ModelSchema: ...

    async def route_async(self, request: GenerateRequest) -> RoutingDecision:
        """``route`` for async callers: a long request is routed off the event loop."""
        self._check_open()
        expect(request, GenerateRequest, "route_async")
        return await self._route_off_loop(request)

    async def route_adaptive(self, prompt: str, **params: Any) -> RoutingDecision:
        """The decision for a plain prompt (the seed's ``route_adaptive``); ``params`` are
        ``GenerateParams`` fields that change it (``max_tokens``, ``workload``, ``thinking``...)."""
        self._check_open()
        try:
            request = GenerateRequest(prompt=prompt, params=GenerateParams.model_validate(params))
        except ValidationError as exc:
            raise InvalidInput(f"route_adaptive: {validation_summary(exc)}") from None
        return await self._route_off_loop(request)

    def report(
        self,
        decision: RoutingDecision,
        *,
        success: bool = True,
        score: float | None = None,
        cost_usd: float | None = None,
        latency_ms: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int = 0,
        model_id: str | None = None,
        prompt: str | None = None,
    ) -> str:
        """Record the outcome of ``decision`` when the caller executed it: ``success`` (the call
        answered), ``score`` (0..1, its quality when known: replaces success's 1/0), what it
        cost and how long it took, its output tokens (they teach the router answer lengths, hence
        expected costs), and ``model_id`` when the caller ran another model than the chosen one.
        ``prompt`` enables the quick-retry signal. Returns the trace id. A value that cannot be
        an outcome (a negative or infinite cost, latency or token count, a score outside 0..1, a
        model not in the catalog) is ``InvalidInput`` (``ModelNotFound``), and nothing is recorded:
        the learned state and the spend ledger keep no number they cannot use."""
        self._check_open()
        if not isinstance(success, bool):
            raise InvalidInput(f"report: success must be True or False, not {success!r}")
        score = _measure("score", score, high=1.0)
        if not success and score:  # it counted as a good outcome of a call recorded as failed
            raise InvalidInput(
                f"report: a failed call (success=False) has no answer to score, got score={score!r}"
            )
        cost_usd = _measure("cost_usd", cost_usd, high=MAX_CALL_USD)
        latency_ms = _measure("latency_ms", latency_ms, high=MAX_LATENCY_MS)
        input_tokens = _count("input_tokens", input_tokens)
        output_tokens = _count("output_tokens", output_tokens) or 0
        prompt = _text("prompt", prompt)
        chosen = self._decided_model(decision, "report", model_id)
        trace_id = uuid.uuid4().hex
        now = time.time()
        self.bookkeeper.flush()  # keep this process's records in order
        # One transaction: the trace, its counters and its spend, or none of them (a retry after
        # a failure counted the outcome twice, and a kill between them lost its spend).
        with self._all_or_nothing():
            self.tracker.record_attempt(
                chosen, InferenceTask.GENERATE, decision.task_family, decision.reason, prompt,
                trace_id=trace_id, started_at=now - (latency_ms or 0.0) / 1000, success=success,
                cluster=decision.prompt_cluster, latency_ms=latency_ms,
                input_tokens=decision.estimated_input_tokens if input_tokens is None else input_tokens,
                output_tokens=output_tokens, error_class=None if success else "reported_failure", score=score,
            )  # fmt: skip
            self._caller_spent(chosen, cost_usd)
        return trace_id

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """The writes inside in one store transaction; when one fails the store rolls them all
        back, and the router's and the spend limits' copies are read again from it (they had
        taken the writes made before the failure)."""
        try:
            with self.store.batch():
                yield
        except BaseException:
            try:
                self.tracker.reload(full=True)
                self.spend.reload()
            except Exception:  # the failure in flight says what is wrong; this one is logged
                log.exception("re-reading the learned state after a failed write failed")
            raise

    def _caller_spent(self, model_id: str, cost_usd: float | None) -> None:
        """What a call the caller made itself cost, in the spend ledger."""
        if cost_usd:
            schema = self.registry.get(model_id)
            provider = schema.provider if schema is not None else "unknown"
            # The caller made this call: no estimate of ours was held for it, none is settled.
            self.spend.record(provider, model_id, cost_usd, settles=False)

    def open_trace(self, decision: RoutingDecision) -> str:
        """A pending trace for ``decision``, completed later by ``feedback(trace_id, score)``. Its
        model is checked as ``report`` checks it: a decision rebuilt from JSON naming "*" (the
        baselines' id: every later ``car profiles export`` failed on it), an unknown or an
        embedding model is ``InvalidInput`` / ``ModelNotFound`` / ``UnsupportedMode``."""
        self._check_open()
        chosen = self._decided_model(decision, "open_trace")
        return self.tracker.record_start(
            chosen, InferenceTask.GENERATE, decision.task_family, decision.reason,
            cluster=decision.prompt_cluster,
        )  # fmt: skip

    def _decided_model(self, decision: RoutingDecision, method: str, model_id: str | None = None) -> str:
        """The catalog id of the model a route-only outcome is about: ``decision``'s (which a caller
        may have rebuilt from JSON: "*", an unknown or an embedding model was recorded, and "*"
        counted twice in the baselines), or the ``model_id`` the caller ran instead."""
        if not isinstance(decision, RoutingDecision):
            raise InvalidInput(f"{method}: decision must be a RoutingDecision, not {type(decision).__name__}")
        schema = self.resolve(decision.model_id if model_id is None else model_id)
        schema.require(ModelCapability.GENERATE, method)
        return schema.id

    def feedback(
        self,
        trace_id: str,
        score: float,
        *,
        latency_ms: float | None = None,
        output_tokens: int | None = None,
        cost_usd: float | None = None,
        success: bool = True,
    ) -> None:
        """A quality rating (0 bad .. 1 good) for the answer of ``trace_id``; it replaces what the
        tracker inferred for that trace and moves the model's learned quality. A trace still
        pending (a route-only decision from ``open_trace``) is completed as answered first, with
        what the caller measured of its call: ``latency_ms``, ``output_tokens`` (they teach answer
        lengths, hence expected costs) and ``cost_usd`` (into the spend ledger); a latency not
        given stays unknown (the time until the rating is not the model's). Those three are
        ``InvalidInput`` for a trace already complete: its outcome was recorded when it ended.
        ``success=False`` (score 0) completes a pending trace as a failed call instead, as
        ``report(decision, success=False)`` records one: a route-only caller over HTTP could only
        rate its failed call 0, which counted as an answer."""
        self._check_open()
        rating = _measure("feedback score", score, high=1.0)
        if rating is None:
            raise InvalidInput("feedback score must be a number from 0 (bad) to 1 (good), not None")
        if not isinstance(success, bool):
            raise InvalidInput(f"feedback success must be True or False, not {success!r}", param="success")
        if not success and rating:
            raise InvalidInput(
                f"feedback: a failed call (success=False) has no answer to score, got score={score!r}",
                param="score",
            )
        if not isinstance(trace_id, str) or not trace_id:
            raise InvalidInput(f"feedback trace_id must be a trace id string, not {trace_id!r}")
        _text("feedback trace_id", trace_id)
        latency_ms = _measure("latency_ms", latency_ms, high=MAX_LATENCY_MS)
        output_tokens = _count("output_tokens", output_tokens)
        cost_usd = _measure("cost_usd", cost_usd, high=MAX_CALL_USD)
        measured = {"latency_ms": latency_ms, "output_tokens": output_tokens, "cost_usd": cost_usd}
        self.bookkeeper.flush()
        trace = self._shared_trace(trace_id)
        if trace is None:
            raise TraceNotFound(trace_id, self._not_shared_yet())
        trace_id, trace = self._answering(trace_id, trace)
        given = [name for name, value in measured.items() if value is not None]
        given += [] if success else ["success"]
        if given and trace["outcome"] != "pending":
            raise InvalidInput(
                f"feedback: {', '.join(given)} complete a route-only decision (a pending trace from "
                f"open_trace or POST /v1/route); trace {trace_id} is {trace['outcome']} already",
                param=given[0],
            )
        with self._all_or_nothing():  # completion, spend and score together, or none (as ``report``)
            # Spent only by the call that completed it: two at once (a retry the 503 advises) both
            # saw it pending, and a $1 call was $2 in the ledger.
            pending = trace["outcome"] == "pending"
            if not success:
                if self.tracker.record_failure(trace_id, "reported_failure", latency_ms=latency_ms):
                    self._caller_spent(trace["model_id"], cost_usd)
                return
            tokens = output_tokens or 0
            if pending and self.tracker.record_complete(trace_id, latency_ms, output_tokens=tokens):
                self._caller_spent(trace["model_id"], cost_usd)
            self.tracker.record_feedback(trace_id, rating)

    def _hand_on(self, broken: str, taker: str) -> None:
        """A stream broke on trace ``broken`` after its content went out, and ``taker`` finished
        the answer: the client holds ``broken``'s id (the headers had gone), so feedback on it goes
        to ``taker``. Kept for the last ``HANDED_ON_KEPT`` such streams, in this process."""
        self._handed[broken] = taker
        while len(self._handed) > HANDED_ON_KEPT:
            self._handed.popitem(last=False)

    def _answering(self, trace_id: str, trace: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The trace whose model answered: a broken stream's is followed to the one that finished
        it; any other failed call has no answer to score (a rating of one was recorded as that
        failed model's quality: 1.0 for an answer another model wrote)."""
        for _ in range(HANDED_ON_HOPS):
            taker = self._handed.get(trace_id) if trace["outcome"] == "failure" else None
            followed = self._shared_trace(taker) if taker else None
            if followed is None:
                break
            trace_id, trace = taker, followed  # type: ignore[assignment]
        if trace["outcome"] == "failure":
            raise InvalidInput(
                f"trace {trace_id} is a failed call ({trace.get('error_class') or 'an error'}): it has"
                " no answer to score",
                param="trace_id",
            )
        return trace_id, trace

    def _shared_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace; in a store other processes write (PostgreSQL: replicas), one not there yet
        is waited for up to ``SHARED_TRACE_WAIT_S``: feedback a load balancer sends to another
        replica than the one that answered arrives before that one's writer commits the trace
        (50 ms later by default), and 15 of 17 such feedbacks were a 404 that says not to retry."""
        trace = self.store.trace(trace_id)
        if trace is not None or self.store.backend != "postgresql":
            return trace
        deadline = time.monotonic() + SHARED_TRACE_WAIT_S
        while trace is None and time.monotonic() < deadline:
            time.sleep(0.05)
            trace = self.store.trace(trace_id)
        return trace

    def _not_shared_yet(self) -> str:
        """What a trace missing from a shared store after the wait may be: a 404 said only "no
        such trace", while the replica that answered held it in memory (its database away)."""
        if self.store.backend != "postgresql":
            return ""
        return (
            f"not in the shared store after {SHARED_TRACE_WAIT_S:g} s; if another replica answered"
            " it while its database was away, it is written when the database returns: send the"
            " feedback again then"
        )

    def prune_traces(
        self, older_than_days: float | None = None, *, stop: threading.Event | None = None
    ) -> int:
        """Delete the traces (and their feedback) started more than ``older_than_days`` ago
        (default: ``[state] trace_retention_days``; 0 keeps them all), a chunk per transaction,
        until none is left or ``stop`` is set (``routing.store_api.prune_old_traces``). The learned
        counters and the spend ledger stay. Returns how many went."""
        self._check_open()
        days = self.config.state.trace_retention_days if older_than_days is None else older_than_days
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 <= days < math.inf:
            raise InvalidInput(f"prune_traces: older_than_days must be a number >= 0, not {days!r}")
        return prune_old_traces(self.store, days, stop=stop)

    def forget_templates(
        self, older_than_days: float | None = None, *, stop: threading.Event | None = None
    ) -> int:
        """Delete the learned rows of the templates not seen for ``older_than_days`` (default:
        ``[state] template_retention_days``; 0 keeps them all), in the store and in this process's
        router (``routing.store_api.forget_dormant_templates``); other replicas drop them with their
        next full reload. Returns how many templates went."""
        self._check_open()
        days = self.config.state.template_retention_days if older_than_days is None else older_than_days
        now = time.time()
        keys = forget_dormant_templates(self.store, days, stop=stop, now=now)
        self.tracker.forget(keys, now - days * 86_400)
        return len(keys)

    def forget_model(self, name: str) -> tuple[str, int]:
        """Forget what the router learned about a model (after it was upgraded behind the same
        name, say): its profile and its rows in every context go, in the store and in this
        process's router, and it is tried again as a new model is. ``name``: a model the router
        learned about, or any name the registry resolves (``ModelNotFound`` otherwise, with close
        matches). Returns its id and how many rows went (0: nothing was learned about it). Other
        replicas drop its profile at their next reload and its rows at their next full one."""
        self._check_open()
        expect(name, str, "forget_model")
        if name == ALL:  # the baselines' rows: every context's, which no model upgrade concerns
            raise InvalidInput(f"forget_model: {ALL!r} names the contexts' baselines, not a model")
        model_id = name if name in self.tracker.model_ids() else self.resolve(name).id
        self.bookkeeper.flush()  # its queued outcomes first, or they would bring rows back
        gone = self.store.forget_model(model_id)
        self.tracker.forget_model(model_id)
        return model_id, gone

    def compact_spend(self, *, stop: threading.Event | None = None) -> int:
        """Roll the spend ledger's entries of past UTC days into one per day, provider and model
        (``routing.store_api.compact_old_spend``); the limits' totals stay. Returns how many
        entries went."""
        self._check_open()
        return compact_old_spend(self.store, stop=stop)


# What one call can be said to have cost or taken: two reports of 1e308 dollars made the day's
# spend inf, and every paid model stayed refused for the rest of the month (a report of another
# client's decision counts as spend for everyone).
MAX_CALL_USD = 10_000.0
MAX_LATENCY_MS = 86_400_000.0  # a day
# Tokens one call can read or write (ten times the largest context windows): two reports of
# 2**63 - 1 overflowed the context's sums to REAL, every model there was then priced at all of
# max_tokens, and `car profiles export` failed for good (profiles hold at most 2**50).
MAX_CALL_TOKENS = 20_000_000


def _measure(name: str, value: object, *, high: float) -> float | None:
    """``value`` as a finite float within 0..``high`` (None stays None), else ``InvalidInput``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number, not {type(value).__name__}", param=_field(name))
    number = float(value)
    if not 0.0 <= number <= high:  # NaN and inf fail it too
        bound = "0..1" if high == 1.0 else f"a number from 0 to {high:,.0f}"
        raise InvalidInput(f"{name} must be {bound}, got {value!r}", param=_field(name))
    return number


def _count(name: str, value: object) -> int | None:
    """``value`` as a token count one call can have (None stays None), else ``InvalidInput``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CALL_TOKENS:
        raise InvalidInput(
            f"{name} must be a whole number from 0 to {MAX_CALL_TOKENS:,} (one call's tokens), got {value!r}",
            param=name,
        )
    return value


def _field(name: str) -> str:
    """The request field a check's name is about ("feedback score": score)."""
    return name.rsplit(" ", 1)[-1]


def _text(name: str, value: object) -> str | None:
    """``value`` as text a database can hold (None stays None), else ``InvalidInput``: a lone
    surrogate raised UnicodeEncodeError from the store, or was stored in a record."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a str, not {type(value).__name__}")
    bad = unpaired_surrogate(value)
    if bad is not None:
        raise InvalidInput(f"{name} holds an unpaired surrogate ({bad}), which no encoder can write")
    return value
