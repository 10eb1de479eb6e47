"""Generation: route, try the chosen model then its fallbacks, and record what happened.

Per request the router decides (``RoutingDecision``: model, strategy, reason, ordered fallbacks).
Each attempt then passes three gates before it runs: the model is available, its estimated cost
fits the spend limits, its circuit breaker allows it. Each attempt is written as one outcome trace
when it is over (one store transaction, off the request path: see bookkeeping); a failure counts
toward the breaker (a 4xx client error counts double) and the next fallback runs at once; a
success closes the breaker, records latency, tokens, TTFT, spend and implicit signals; an attempt
whose consumer stopped reading (a closed stream, a cancelled task) is kept as an "abandoned" trace
and counts for nothing.
The result's ``trace_id`` is the trace of the attempt that answered, which is what feedback rates.

An explicitly named model that cannot run at all (not pulled, no key) is an error, not a reason to
answer with another model; fallbacks cover failures while running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends.base import run_blocking
from ..errors import (
    AllModelsFailed,
    CircuitOpen,
    InferenceError,
    InferenceFailed,
    ModelUnavailable,
    SpendLimitExceeded,
    TraceNotFound,
)
from ..requests import GenerateRequest, InferenceResult, TokenUsage, parse_boxes
from ..routing import InferenceTask, RoutingDecision, RoutingStrategy, detect_signals, failure_weight
from ..schema import ModelCapability, ModelSchema
from ..stream import Done, ErrorEvent, RouteEvent, StreamEvent, UsageEvent

if TYPE_CHECKING:
    from ..backends.base import GenerationOutput

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


class GenerationMixin:
    # Provided by InferenceEngine.
    config: Any
    registry: Any
    router: Any
    tracker: Any
    breakers: Any
    spend: Any
    store: Any
    bookkeeper: Any

    if TYPE_CHECKING:  # provided by InferenceEngine and the other mixins

        def _runnable(self, model: ModelSchema) -> Any: ...

    # --- routing -------------------------------------------------------------------------------

    def route(self, request: GenerateRequest) -> RoutingDecision:
        """The routing decision for ``request``: explicit model, preferred model, or adaptive."""
        return self.router.decide(request, self.registry, preferred=self.config.preferred.generate)

    async def _route_off_loop(self, request: GenerateRequest) -> RoutingDecision:
        """``route`` for the async paths: a long request may be counted on a local tokenizer
        (milliseconds, a vocabulary load the first time), so it is routed off the event loop."""
        if len(request.text_for_analysis()) < ROUTE_IN_THREAD_CHARS:
            return self.route(request)
        return await run_blocking(lambda: self.route(request))

    async def route_adaptive(self, prompt: str) -> RoutingDecision:
        """The decision for a plain prompt (the seed's ``route_adaptive``)."""
        return await self._route_off_loop(GenerateRequest(prompt=prompt))

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
        if request.tools and any(_tool_name(t) == "done" for t in request.tools):
            update["context"] = f"{request.context or ''}\n\n{DONE_TOOL_INSTRUCTION}"
        return request.model_copy(update=update) if update else request

    # --- attempts ------------------------------------------------------------------------------

    def _candidates(self, decision: RoutingDecision) -> list[ModelSchema]:
        models = [self.registry.get(m) for m in (decision.model_id, *decision.fallbacks)]
        first = models[0]
        if decision.strategy == RoutingStrategy.EXPLICIT and first is not None and not first.available:
            raise ModelUnavailable(first.id, self.registry.unavailable_reason(first))
        return [m for m in models if m is not None]

    def _open_attempt(
        self, model: ModelSchema, decision: RoutingDecision, request: GenerateRequest, *, first: bool
    ) -> tuple[Any, _Attempt]:
        """Pass the gates and open an attempt: (backend, attempt). Raises why the model is skipped.
        A model the caller chose (explicit or preferred) that would break a spend limit refuses
        the whole request; a fallback that would is skipped."""
        backend = self._runnable(model)
        if self.spend.has_limits and not model.in_process:
            estimate = model.cost.estimate(decision.estimated_input_tokens, request.params.max_tokens)
            try:
                self.spend.check(model.provider, estimate)
            except SpendLimitExceeded as exc:
                exc.refuses_request = first and decision.strategy in _CALLER_CHOSE
                raise
        if not self.breakers.allow(model.id):
            raise CircuitOpen(model.id)
        attempt = _Attempt(
            uuid.uuid4().hex,
            model.id,
            decision.task_family,
            decision.prompt_cluster,
            decision.reason,
            request.last_user_text(),
            time.time(),
        )
        return backend, attempt

    def _attempts(
        self, decision: RoutingDecision, request: GenerateRequest, attempts: list[tuple[str, InferenceError]]
    ) -> Iterator[tuple[int, ModelSchema, Any, _Attempt]]:
        """The candidates that pass the gates, as (index, model, backend, attempt); a candidate
        that does not is added to ``attempts`` with why (or refuses the whole request)."""
        for index, model in enumerate(self._candidates(decision)):
            try:
                backend, attempt = self._open_attempt(model, decision, request, first=index == 0)
            except InferenceError as exc:
                if getattr(exc, "refuses_request", False):
                    raise
                attempts.append((model.id, exc))
                continue
            yield index, model, backend, attempt

    def _failed(self, model: ModelSchema, attempt: _Attempt, exc: InferenceError) -> None:
        self.breakers.record_failure(model.id, failure_weight(exc))
        self.bookkeeper.submit(
            self._record, attempt, success=False, error_class=type(exc).__name__, message=str(exc)
        )

    def _abandoned(self, attempt: _Attempt) -> None:
        """The consumer stopped (a closed stream, a cancelled task): a trace, no verdict on the model."""
        self.bookkeeper.submit(self._record, attempt, success=None)

    def _succeeded(
        self,
        model: ModelSchema,
        attempt: _Attempt,
        request: GenerateRequest,
        result: InferenceResult,
        started: float,
    ) -> None:
        self.breakers.record_success(model.id)
        latency_ms = (time.perf_counter() - started) * 1000
        self.bookkeeper.submit(self._record_success, model, attempt, request, result, latency_ms)

    def _record(self, attempt: _Attempt, **outcome: Any) -> None:
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
        attempt: _Attempt,
        request: GenerateRequest,
        result: InferenceResult,
        latency_ms: float,
    ) -> None:
        """Deferred (see bookkeeping): the outcome, its implicit signals, and the spend."""
        usage = result.usage or TokenUsage()
        self._record(
            attempt,
            success=True,
            latency_ms=latency_ms,
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            ttft_ms=result.time_to_first_token_ms,
        )
        self.tracker.record_signals(attempt.trace_id, detect_signals(request, result))
        if usage.cost_usd:
            self.spend.record(model.provider, model.id, usage.cost_usd)

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
        start = time.perf_counter()
        decision = await self._route_off_loop(request)
        request = self._with_decision(request, decision)
        attempts: list[tuple[str, InferenceError]] = []
        for index, model, backend, attempt in self._attempts(decision, request, attempts):
            attempt_start = time.perf_counter()
            try:
                out = await backend.generate(model, self._prepare(request, model))
            except InferenceError as exc:
                self._failed(model, attempt, exc)
                attempts.append((model.id, exc))
                continue
            except asyncio.CancelledError:
                self._abandoned(attempt)
                raise
            result = _result(model, out, attempt.trace_id, start)
            result._finish_reason = out.finish_reason
            self._succeeded(model, attempt, request, result, attempt_start)
            result._routing = self._routing(decision, index, attempts)
            return result
        raise _final_error(attempts)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """Stream events: a ``RouteEvent`` first (again with strategy "fallback" if a model fails
        before its first token and the next takes over), content events, then ``Done`` carrying
        the trace id, model, latency and usage. A failure after output began ends the stream with
        an ``ErrorEvent``; a consumer that stops reading stops the generation."""
        start = time.perf_counter()
        decision = await self._route_off_loop(request)
        request = self._with_decision(request, decision)
        attempts: list[tuple[str, InferenceError]] = []
        for index, model, backend, attempt in self._attempts(decision, request, attempts):
            routing = self._routing(decision, index, attempts)
            attempt_start = time.perf_counter()
            started = finished = False
            ttft: float | None = None
            usage: TokenUsage | None = None
            try:
                yield RouteEvent(
                    model_id=model.id,
                    strategy=routing.strategy,
                    reason=routing.reason,
                    trace_id=attempt.trace_id,
                    fallbacks=list(decision.fallbacks),
                )
                events = backend.stream(model, self._prepare(request, model))
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, Done):
                            done = _finish_done(model, event, attempt.trace_id, start, ttft, usage)
                            self._succeeded(model, attempt, request, _as_result(done), attempt_start)
                            finished = True
                            yield done
                            return
                        if isinstance(event, UsageEvent):
                            usage = event.usage
                        elif ttft is None:
                            ttft = round((time.perf_counter() - start) * 1000, 3)
                        started = True
                        yield event
            except InferenceError as exc:
                self._failed(model, attempt, exc)
                if started:
                    yield ErrorEvent(message=str(exc), retryable=bool(getattr(exc, "retryable", False)))
                    return
                attempts.append((model.id, exc))
                continue
            except (GeneratorExit, asyncio.CancelledError):
                if not finished:  # a consumer that stops after Done has its answer
                    self._abandoned(attempt)
                raise
            error = InferenceFailed(f"{model.id}: the stream ended without a final event")
            self._failed(model, attempt, error)
            if started:
                yield ErrorEvent(message=str(error))
                return
            attempts.append((model.id, error))
        raise _final_error(attempts)

    # --- feedback ------------------------------------------------------------------------------

    def feedback(self, trace_id: str, score: float) -> None:
        """A quality rating (0 bad .. 1 good) for the answer of ``trace_id``; it replaces what the
        tracker inferred for that trace and moves the model's learned quality."""
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"feedback score must be within 0..1, got {score}")
        self.bookkeeper.flush()
        if self.store.trace(trace_id) is None:
            raise TraceNotFound(trace_id)
        self.tracker.record_feedback(trace_id, score)


@dataclass(slots=True)
class _Attempt:
    """One model's try at a request: written as one trace when it is over (bookkeeping)."""

    trace_id: str
    model_id: str
    family: str
    cluster: str | None
    reason: str
    prompt: str
    started_at: float  # wall clock, for the trace


def _tool_name(tool: dict[str, Any]) -> str | None:
    fn = tool.get("function", tool)
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def _with_cost(model: ModelSchema, usage: TokenUsage | None) -> TokenUsage | None:
    """Usage with ``cost_usd`` from the catalog's prices, unless the backend already set it."""
    if usage is None or usage.cost_usd is not None:
        return usage
    cost = model.cost.estimate(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens or 0)
    return usage.model_copy(update={"cost_usd": cost})


def _result(model: ModelSchema, out: GenerationOutput, trace_id: str, start: float) -> InferenceResult:
    return InferenceResult(
        text=out.text,
        tool_calls=out.tool_calls,
        bounding_boxes=parse_boxes(out.text) if model.has_capability(ModelCapability.GROUNDING) else [],
        trace_id=trace_id,
        model_used=model.id,
        latency_ms=round((time.perf_counter() - start) * 1000, 3),
        time_to_first_token_ms=out.time_to_first_token_ms,
        usage=_with_cost(model, out.usage),
        provider_output_items=out.provider_output_items,
        thinking=out.thinking,
    )


def _finish_done(
    model: ModelSchema, done: Done, trace: str, start: float, ttft: float | None, usage: TokenUsage | None
) -> Done:
    return done.model_copy(
        update={
            "model_used": model.id,
            "trace_id": trace,
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
            "time_to_first_token_ms": ttft,
            "usage": _with_cost(model, done.usage or usage),
        }
    )


def _as_result(done: Done) -> InferenceResult:
    return InferenceResult.model_construct(
        text=done.text,
        tool_calls=list(done.tool_calls),
        bounding_boxes=[],
        trace_id=done.trace_id or "",
        model_used=done.model_used or "",
        latency_ms=done.latency_ms or 0.0,
        time_to_first_token_ms=done.time_to_first_token_ms,
        usage=done.usage,
        provider_output_items=list(done.provider_output_items),
        thinking=done.thinking,
    )


def _final_error(attempts: list[tuple[str, InferenceError]]) -> InferenceError:
    if not attempts:
        return ModelUnavailable("generate", "no model could take the request")
    errors = [e for _, e in attempts]
    spend = [e for e in errors if isinstance(e, SpendLimitExceeded)]
    if spend and all(isinstance(e, SpendLimitExceeded | CircuitOpen | ModelUnavailable) for e in errors):
        return spend[0]  # refused by policy, not broken: say so
    if len(attempts) == 1:
        return errors[0]
    return AllModelsFailed(attempts)
