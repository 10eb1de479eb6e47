"""Generation: route, try the chosen model then its fallbacks, and record what happened.

Per request the router decides (``RoutingDecision``: model, strategy, reason, ordered fallbacks).
Each attempt then passes four gates before it runs: the model is available, it can take the
request's input (media need ``vision`` on a local model), its estimated cost fits the spend
limits, its circuit breaker allows it. Each attempt is written as one outcome trace when it is over (one store
transaction, off the request path: see bookkeeping); a failure counts toward the breaker (a
provider's 401/403/404 counts double) and the next fallback runs at once; a success closes the
breaker, records latency, tokens, TTFT, spend and implicit signals. An attempt whose consumer
stopped reading (a closed stream, a cancelled task), and one that failed because of the request
itself (``InvalidInput``, ``UnsupportedMode``, a provider's 400/413/422), is kept as a trace that
counts for nothing: one client's bad requests must not open a circuit for the others.
The result's ``trace_id`` is the trace of the attempt that answered, which is what feedback rates.

A named model is never silently replaced: a request naming one gets only the fallbacks the user
configured for it (``ModelSchema.fallbacks``, e.g. in models.toml), and one that cannot run at all
(not pulled, no key) is an error. Adaptive decisions try the model's configured fallbacks, then the
router's. A stream that breaks after text went out continues on the next candidate from that text
(see resume.py), unless a tool call was half sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import tracing
from ..backends.base import TextGenerator, run_blocking
from ..errors import (
    CircuitOpen,
    InferenceError,
    InferenceFailed,
    ModelNotFound,
    ModelUnavailable,
    SpendLimitExceeded,
    UnsupportedMode,
    expect,
)
from ..requests import GenerateRequest, InferenceResult, ThinkingMode, TokenUsage, ToolCall
from ..routing import InferenceTask, RoutingDecision, RoutingStrategy, answer_signals, failure_weight
from ..schema import ModelCapability, ModelSchema
from ..stream import Done, ErrorEvent, RouteEvent, StreamEvent, UsageEvent
from .attempts import (
    Attempt,
    Partial,
    StreamOutcome,
    answer_fields,
    final_error,
    finish_done,
    on_event,
    result_of,
    retryable,
    route_fields,
    tool_name,
)
from .lifecycle import Lifecycle
from .meter import unmetered_cost
from .resume import Sent, continuation, join_text, joined

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..backends.delegated import RunnerTable
    from ..config import CarConfig
    from ..registry import UnifiedRegistry
    from ..routing import (
        AdaptiveRouter,
        CircuitBreakerRegistry,
        OutcomeTracker,
        SpendControl,
        StateStore,
    )
    from .bookkeeping import Bookkeeper

__all__ = ["DONE_TOOL_INSTRUCTION", "GenerationMixin", "Routing"]

DONE_TOOL_INSTRUCTION = (
    "IMPORTANT: When calling the `done` tool, the `result` field MUST contain a DETAILED summary of "
    "everything you found and did. This is the ONLY output the user sees. Do NOT just say 'completed' "
    "— include specific findings, data, and conclusions."
)


@dataclass
class Routing:
    """How a result came about: the router's decision, the strategy that finally answered
    ("fallback" when the first choice failed), and every attempt that failed before."""

    decision: RoutingDecision
    strategy: str
    reason: str
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (model id, error)

    @property
    def fallbacks_used(self) -> int:
        return len(self.attempts)


# A spend limit that the model the caller asked for would break refuses the request.
_CALLER_CHOSE = (RoutingStrategy.EXPLICIT, RoutingStrategy.PREFERRED)
# Requests at least this long may be counted on a local tokenizer while routing: off the loop.
ROUTE_IN_THREAD_CHARS = 8000


class GenerationMixin(Lifecycle):
    # Provided by InferenceEngine.
    config: CarConfig
    registry: UnifiedRegistry
    router: AdaptiveRouter
    tracker: OutcomeTracker
    breakers: CircuitBreakerRegistry
    spend: SpendControl
    store: StateStore
    bookkeeper: Bookkeeper
    runners: RunnerTable

    if TYPE_CHECKING:  # provided by InferenceEngine and the other mixins

        def _runnable(self, model: ModelSchema) -> Backend: ...
        def _hand_on(self, broken: str, taker: str) -> None: ...

    # --- routing -------------------------------------------------------------------------------

    def route(self, request: GenerateRequest) -> RoutingDecision:
        """The routing decision for ``request``: explicit model, preferred model, or adaptive.
        Its ``fallbacks`` are the ones that will run (see ``_fallback_policy``)."""
        self._check_open()
        expect(request, GenerateRequest, "route")
        self._keys_fresh()
        decision = self.router.decide(request, self.registry, preferred=self.config.preferred.generate)
        chosen = self.registry.get(decision.model_id)
        if chosen is not None:  # a named model that cannot answer: its call's error, not a decision
            chosen.require(ModelCapability.GENERATE)
        return self._fallback_policy(decision)

    def _fallback_policy(self, decision: RoutingDecision) -> RoutingDecision:
        """A named model gets only the fallbacks configured for it; any other decision tries the
        chosen model's configured fallbacks first, then the router's."""
        chosen = self.registry.get(decision.model_id)
        configured = [self._model_id(name) for name in (chosen.fallbacks if chosen is not None else ())]
        if decision.strategy == RoutingStrategy.EXPLICIT:
            decision.fallbacks = configured
        elif configured:
            decision.fallbacks = list(dict.fromkeys([*configured, *decision.fallbacks]))
        if decision.model_id in decision.fallbacks:
            decision.fallbacks = [m for m in decision.fallbacks if m != decision.model_id]
        return decision

    def _model_id(self, name: str) -> str:
        """The id of the model ``name`` (id, name or alias); the name itself when none matches
        (its attempt then says so, with close names)."""
        found = self.registry.find(name)
        return found.id if found is not None else name

    async def _route_off_loop(self, request: GenerateRequest) -> RoutingDecision:
        """``route`` for the async paths: a long request may be counted on a local tokenizer
        (milliseconds, a vocabulary load the first time), so it is routed off the event loop."""
        with tracing.span(tracing.ROUTE) as span:
            if len(request.text_for_analysis()) < ROUTE_IN_THREAD_CHARS:
                decision = self.route(request)
            else:
                decision = await run_blocking(lambda: self.route(request))
            if span is not None:
                tracing.set_attributes(span, **route_fields(decision))
            return decision

    def _with_decision(self, request: GenerateRequest, decision: RoutingDecision) -> GenerateRequest:
        if request.params.budget_tokens == 0 and decision.thinking_budget > 0:
            params = request.params.model_copy(update={"budget_tokens": decision.thinking_budget})
            return request.model_copy(update={"params": params})
        return request

    def _prepare(self, request: GenerateRequest, model: ModelSchema) -> GenerateRequest:
        """Apply the model's sampling defaults (explicit request values win) and the seed's
        ``done``-tool instruction."""
        update: dict[str, Any] = {}
        if model.default_params:
            given = request.params.model_fields_set
            defaults = {k: v for k, v in model.default_params.items() if k not in given}
            if defaults:
                update["params"] = request.params.model_copy(update=defaults)
        if request.tools and any(tool_name(t) == "done" for t in request.tools):
            update["context"] = f"{request.context or ''}\n\n{DONE_TOOL_INSTRUCTION}"
        return request.model_copy(update=update) if update else request

    # --- attempts ------------------------------------------------------------------------------

    def _candidates(
        self, decision: RoutingDecision, attempts: list[tuple[str, InferenceError]]
    ) -> Iterator[ModelSchema]:
        """The chosen model, then its fallbacks as the decision lists them. A fallback name that
        is in no catalog is added to ``attempts`` (with close names) when its turn comes."""
        first = self.registry.get(decision.model_id)
        if decision.strategy == RoutingStrategy.EXPLICIT and first is not None and not first.available:
            why = self.registry.recheck(first)  # None: it can run now, its flag was stale
            if why is not None:
                raise ModelUnavailable(first.id, why)
        for name in (decision.model_id, *decision.fallbacks):
            try:
                yield self.registry.get(name) or self.registry.resolve(name)
            except ModelNotFound as exc:
                attempts.append((name, exc))

    def _open_attempt(
        self, model: ModelSchema, decision: RoutingDecision, request: GenerateRequest, *, first: bool
    ) -> tuple[TextGenerator, Attempt]:
        """Pass the gates and open an attempt: (backend, attempt). Raises why the model is skipped.
        A model the caller chose (explicit or preferred) that would break a spend limit refuses
        the whole request; a fallback that would is skipped."""
        backend = self._runnable(model)
        if not isinstance(backend, TextGenerator):
            raise UnsupportedMode("generate", model.kind, f"the {model.kind} backend does not generate text")
        # Media: a local model without vision is refused before it loads; any model without it is
        # refused images (an endpoint's text-only server dropped them and answered anyway); other
        # media to a hosted model are its provider's to judge.
        media = request.media_types()
        unseen = model.in_process or "image" in media
        if media and unseen and not model.has_capability(ModelCapability.VISION):
            kinds = sorted(media)
            why = f"{model.id} reads text only: no {' or '.join(kinds)} input"
            raise UnsupportedMode("/".join(kinds) + "-input", model.kind, why, param="messages")
        if request.params.asks_thinking and not model.has_thinking_mode():  # it was ignored
            why = f"{model.id} has no thinking mode: leave thinking and reasoning_effort unset"
            asked = "thinking" if request.params.thinking is ThinkingMode.ON else "reasoning_effort"
            raise UnsupportedMode("thinking", model.kind, why, param=asked)  # the field the client sent
        reservation = None  # the estimate held against the fleet's spend limits until recorded
        spends = self._spends(model)  # decided now: a runner may be gone when the spend is recorded
        if self.spend.has_limits and spends:
            estimate = model.cost.estimate(decision.estimated_input_tokens, request.params.max_tokens)
            try:
                reservation = self.spend.reserve(model.provider, estimate)
            except SpendLimitExceeded as exc:
                exc.refuses_request = first and decision.strategy in _CALLER_CHOSE
                raise
        if not self.breakers.allow(model.id):
            self.spend.release(reservation)
            raise CircuitOpen(model.id)
        attempt = Attempt(
            uuid.uuid4().hex,
            model.id,
            decision.task_family,
            decision.prompt_cluster,
            decision.reason,
            request.last_user_text(),
            time.time(),
            reservation,
            est_input=decision.estimated_input_tokens,
            spends=spends,
        )
        attempt.span = tracing.start(tracing.ATTEMPT, model=model.id, trace_id=attempt.trace_id, first=first)
        return backend, attempt

    def _attempts(
        self, decision: RoutingDecision, request: GenerateRequest, attempts: list[tuple[str, InferenceError]]
    ) -> Iterator[tuple[int, ModelSchema, TextGenerator, Attempt]]:
        """The candidates that pass the gates, as (index, model, backend, attempt); a candidate
        that does not is added to ``attempts`` with why (or refuses the whole request)."""
        for index, model in enumerate(self._candidates(decision, attempts)):
            try:
                backend, attempt = self._open_attempt(model, decision, request, first=index == 0)
            except InferenceError as exc:
                if getattr(exc, "refuses_request", False):
                    raise
                attempts.append((model.id, exc))
                continue
            yield index, model, backend, attempt

    def _failed(
        self, model: ModelSchema, attempt: Attempt, exc: InferenceError, cut: Partial | None = None
    ) -> None:
        """A failed attempt. One the request caused (weight 0) is kept as a trace with its error
        but counts nowhere: not toward the breaker (a half-open probe is handed on), not against
        the model's learned quality. ``cut``: what a stream had produced when it broke, spent."""
        weight = failure_weight(exc)
        tracing.end(attempt.span, exc, outcome="failure" if weight else "refused")
        self.breakers.record_failure(model.id, weight)
        self._settle_cut(model, attempt, cut)
        self.bookkeeper.submit(
            self._record,
            attempt,
            success=False if weight else None,
            error_class=type(exc).__name__,
            message=str(exc),
        )

    def _abandoned(self, model: ModelSchema, attempt: Attempt, cut: Partial) -> None:
        """The consumer stopped (a closed stream, a cancelled task): a trace, no verdict on the
        model, and what the provider was asked for so far as spend (``_settle_cut``)."""
        tracing.end(attempt.span, outcome="abandoned")
        self._settle_cut(model, attempt, cut)
        self.bookkeeper.submit(self._record, attempt, success=None)

    def _spends(self, model: ModelSchema) -> bool:
        """Whether what ``model`` costs is this engine's spend: not a local model, nor a model a
        client's runner serves (its reported cost is not the owner's money)."""
        return not model.in_process and self.runners.spends(model.id)

    def _settle_cut(self, model: ModelSchema, attempt: Attempt, cut: Partial | None) -> None:
        """A call cut short (the consumer went, the stream broke) was billed by its provider for
        the prompt and what it had written: that much is spent, at least (it was released, and
        a client that disconnected early spent past every limit). A call that failed before it
        wrote anything costs nothing. Deferred, as the success's spend."""
        cost = cut.cost(model, attempt.est_input) if cut is not None and attempt.spends else 0.0
        if cost:
            self.bookkeeper.submit(
                self.spend.record, model.provider, model.id, cost, reservation=attempt.reservation
            )
        else:
            self.spend.release(attempt.reservation)

    def _succeeded(
        self,
        model: ModelSchema,
        attempt: Attempt,
        result: InferenceResult,
        started: float,
    ) -> None:
        self.breakers.record_success(model.id)
        latency_ms = (time.perf_counter() - started) * 1000
        tracing.end(attempt.span, outcome="success", latency_ms=latency_ms)
        # What the record needs, not the request and result: a backlog of records (a slow store)
        # then holds each answer's text, not its conversation, images and routing explanation.
        usage, ttft_ms = result.usage or TokenUsage(), result.time_to_first_token_ms
        self.bookkeeper.submit(
            self._record_success, model, attempt, usage, ttft_ms, result.text, result.tool_calls, latency_ms
        )

    def _record(self, attempt: Attempt, **outcome: Any) -> None:
        with tracing.span(tracing.RECORD, attempt.span, model=attempt.model_id, trace_id=attempt.trace_id):
            self.tracker.record_attempt(
                attempt.model_id,
                InferenceTask.GENERATE,
                attempt.family,
                attempt.reason,
                attempt.prompt,
                trace_id=attempt.trace_id,
                started_at=attempt.started_at,
                cluster=attempt.cluster,
                **outcome,
            )

    def _record_success(
        self,
        model: ModelSchema,
        attempt: Attempt,
        usage: TokenUsage,
        ttft_ms: float | None,
        text: str,
        tool_calls: list[ToolCall],
        latency_ms: float,
    ) -> None:
        """Deferred (see bookkeeping): the outcome, its implicit signals, and the spend."""
        self._record(
            attempt,
            success=True,
            latency_ms=latency_ms,
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            ttft_ms=ttft_ms,
        )
        self.tracker.record_signals(attempt.trace_id, answer_signals(text, tool_calls))
        cost = usage.cost_usd
        if cost is None and not usage.total_tokens and not model.in_process:  # the answer had no usage
            cost = unmetered_cost(model, attempt.est_input, text, tool_calls)
        if cost and attempt.spends:
            self.spend.record(model.provider, model.id, cost, reservation=attempt.reservation)
        else:
            self.spend.release(attempt.reservation)

    @staticmethod
    def _routing(
        decision: RoutingDecision, index: int, attempts: list[tuple[str, InferenceError]]
    ) -> Routing:
        if index == 0:
            return Routing(decision, str(decision.strategy), decision.reason)
        failed = "; ".join(f"{m}: {type(e).__name__}" for m, e in attempts)
        return Routing(
            decision,
            RoutingStrategy.FALLBACK.value,
            f"fallback {index} after {failed}",
            [(m, str(e)) for m, e in attempts],
        )

    # --- generate ------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> InferenceResult:
        """Generate text. Routes when ``request.model`` is None; falls back on failure. Raises
        ``AllModelsFailed`` (listing every attempt) when no candidate answers."""
        self._check_open()
        expect(request, GenerateRequest, "generate")
        with tracing.span(tracing.GENERATE, max_tokens=request.params.max_tokens) as span:
            result = await self._generate(request)
            if span is not None:
                tracing.set_attributes(span, **answer_fields(result))
            return result

    async def _generate(self, request: GenerateRequest) -> InferenceResult:
        start = time.perf_counter()
        decision = await self._route_off_loop(request)
        request = self._with_decision(request, decision)
        attempts: list[tuple[str, InferenceError]] = []
        for index, model, backend, attempt in self._attempts(decision, request, attempts):
            attempt_start = time.perf_counter()
            try:
                with tracing.span(
                    tracing.PROVIDER_CALL, attempt.span, model=model.id, provider=model.provider
                ):
                    out = await backend.generate(model, self._prepare(request, model))
            except InferenceError as exc:
                self._failed(model, attempt, exc)
                attempts.append((model.id, exc))
                continue
            except asyncio.CancelledError:
                self._abandoned(model, attempt, Partial(sent=True))  # the prompt was sent, at least
                raise
            result = result_of(model, out, attempt.trace_id, start)
            self._succeeded(model, attempt, result, attempt_start)
            result._routing = self._routing(decision, index, attempts)
            return result
        raise final_error(attempts)

    def stream(self, request: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream events: a ``RouteEvent`` first, content events, then ``Done`` carrying the trace
        id, model, latency, usage and the whole text. When a model fails the next candidate takes
        over, announced by another ``RouteEvent`` (strategy "fallback"); after text went out it
        continues from that text (``RouteEvent.continues_from``), so the answer still completes.
        A failure with no candidate left, or in a tool call or JSON answer (no other model can
        finish those), ends the stream with an ``ErrorEvent``; a consumer that stops reading stops
        the generation."""
        self._check_open()
        expect(request, GenerateRequest, "stream")
        events = self._stream(request)
        return tracing.traced_stream(
            tracing.GENERATE, events, current=True, on_item=on_event, max_tokens=request.params.max_tokens
        )

    async def _stream(self, request: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        start = time.perf_counter()
        decision = await self._route_off_loop(request)
        request = self._with_decision(request, decision)
        attempts: list[tuple[str, InferenceError]] = []
        sent = Sent(start=start)
        broke = handed = ""  # the last model whose stream broke; its trace, if its content went out
        for index, model, backend, attempt in self._attempts(decision, request, attempts):
            if handed:  # the client holds that trace's id: its feedback is this one's
                self._hand_on(handed, attempt.trace_id)
            if sent.text:
                attempt.reason += (
                    f"; resumes after {len(sent.prefix)} characters, the stream broken on {broke}"
                )
            outcome = StreamOutcome()
            run = self._stream_attempt(
                model, backend, attempt, self._routing(decision, index, attempts), request, sent, outcome
            )
            async with contextlib.aclosing(run):
                async for event in run:
                    yield event
            if outcome.error is None:
                return
            attempts.append((model.id, outcome.error))
            broke, handed = model.id, (attempt.trace_id if sent.any else "")
            unfinishable = sent.unfinishable(request)
            if unfinishable:
                why = f"the stream broke in {unfinishable}, which no other model can finish: {outcome.error}"
                yield ErrorEvent(message=why, retryable=retryable(outcome.error))
                return
        error = final_error(attempts)
        if not sent.any:
            raise error
        yield ErrorEvent(message=str(error), retryable=retryable(error))

    async def _stream_attempt(
        self,
        model: ModelSchema,
        backend: TextGenerator,
        attempt: Attempt,
        routing: Routing,
        request: GenerateRequest,
        sent: Sent,
        outcome: StreamOutcome,
    ) -> AsyncGenerator[StreamEvent, None]:
        """One model's part of a stream; ``outcome.error`` says why it failed (None: it finished).
        After text went out it is asked to continue that text (resume.py)."""
        attempt_start = time.perf_counter()
        prefix = sent.prefix
        usage: TokenUsage | None = None
        finished = False
        try:
            yield RouteEvent(
                model_id=model.id,
                strategy=routing.strategy,
                reason=routing.reason,
                trace_id=attempt.trace_id,
                fallbacks=list(routing.decision.fallbacks),
                continues_from=len(prefix) if prefix else None,
            )
            prefill = bool(getattr(backend, "assistant_prefill", False))
            prepared = self._prepare(continuation(request, prefix, prefill=prefill), model)
            events = tracing.traced_stream(
                tracing.PROVIDER_CALL, backend.stream(model, prepared), parent=attempt.span, model=model.id,
                provider=model.provider,
            )  # fmt: skip
            async with contextlib.aclosing(joined(events, prefix) if prefix else events) as events:
                async for event in events:
                    if isinstance(event, Done):
                        whole = event.model_copy(update={"text": join_text(prefix, event.text)})
                        done = finish_done(model, whole, attempt.trace_id, sent.start, sent.ttft_ms, usage)
                        self._succeeded(model, attempt, done.result(), attempt_start)
                        finished = True
                        yield done
                        return
                    if isinstance(event, UsageEvent):
                        usage = event.usage
                    else:
                        sent.push(event)
                    yield event
        except InferenceError as exc:
            outcome.error = exc
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:  # a consumer that stops after Done has its answer
                self._abandoned(model, attempt, Partial(True, sent.prefix[len(prefix) :], usage))
            raise
        else:
            outcome.error = InferenceFailed(f"{model.id}: the stream ended without a final event")
        written = sent.prefix[len(prefix) :]
        cut = Partial(True, written, usage) if written or usage is not None else None
        self._failed(model, attempt, outcome.error, cut)
