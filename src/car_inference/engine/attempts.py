"""The parts of a generation attempt that are plain data and functions (engine/generation.py runs
them): one attempt's record, how a stream's part ended, the result built from a backend's output,
the tracing fields, and the error a request fails with when no attempt answered."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import tracing
from ..errors import (
    AllModelsFailed,
    CircuitOpen,
    InferenceError,
    InvalidInput,
    ModelUnavailable,
    SpendLimitExceeded,
    UnsupportedMode,
)
from ..grounding import answer_boxes
from ..requests import InferenceResult, TokenUsage
from ..routing import RoutingDecision
from ..routing.complexity import estimate_tokens
from ..schema import ModelSchema
from ..stream import Done, StreamEvent
from .meter import with_cost

if TYPE_CHECKING:
    from ..backends.base import GenerationOutput
    from ..routing.spend import Reservation

__all__ = [
    "Attempt",
    "Partial",
    "StreamOutcome",
    "answer_fields",
    "final_error",
    "finish_done",
    "on_event",
    "result_of",
    "retryable",
    "route_fields",
    "tool_name",
]


@dataclass(slots=True)
class StreamOutcome:
    """How one model's part of a stream ended: the error that stopped it, None when it finished."""

    error: InferenceError | None = None


@dataclass(slots=True)
class Attempt:
    """One model's try at a request: written as one trace when it is over (bookkeeping)."""

    trace_id: str
    model_id: str
    family: str
    cluster: str | None
    reason: str
    prompt: str
    started_at: float  # wall clock, for the trace
    reservation: Reservation | None = None  # its estimate, held against the spend limits
    span: Any = None  # its tracing span (None: tracing is off)
    est_input: int = 0  # the router's estimate of its prompt tokens
    spends: bool = True  # what it costs is the engine owner's spend (GenerationMixin._spends)


@dataclass(slots=True)
class Partial:
    """What a call cut short had cost its provider when it stopped: the prompt, once ``sent``,
    and ``written``, the text it had streamed; ``usage``, what the provider said so far (an
    Anthropic stream reports the prompt's tokens in its first event)."""

    sent: bool = False
    written: str = ""
    usage: TokenUsage | None = None

    def cost(self, model: ModelSchema, est_input: int) -> float:
        """At the catalog's prices, the provider's counts where it gave them, else estimates."""
        usage = self.usage
        if usage is not None and usage.cost_usd:
            return usage.cost_usd
        prompt = usage.prompt_tokens if usage is not None and usage.prompt_tokens else est_input
        out = usage.completion_tokens if usage is not None and usage.completion_tokens else 0
        out = max(out, estimate_tokens(self.written)) if self.written else out
        return model.cost.estimate(prompt if self.sent else 0, out)


def route_fields(decision: RoutingDecision) -> dict[str, Any]:
    return {
        "model": decision.model_id,
        "strategy": str(decision.strategy),
        "reason": decision.reason,
        "task_family": decision.task_family,
        "fallbacks": decision.fallbacks,
    }


def answer_fields(answer: InferenceResult | Done) -> dict[str, Any]:
    """The seed's ``inference.generate`` fields, from a result or a stream's final event."""
    usage = answer.usage
    return {
        "model": answer.model_used,
        "latency_ms": answer.latency_ms,
        "ttft_ms": answer.time_to_first_token_ms,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }


def on_event(span: Any, event: StreamEvent) -> None:
    if isinstance(event, Done):
        tracing.set_attributes(span, **answer_fields(event))


def tool_name(tool: dict[str, Any]) -> str | None:
    fn = tool.get("function", tool)
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def result_of(model: ModelSchema, out: GenerationOutput, trace_id: str, start: float) -> InferenceResult:
    return InferenceResult(
        text=out.text,
        tool_calls=out.tool_calls,
        bounding_boxes=answer_boxes(out.text, model),
        trace_id=trace_id,
        model_used=model.id,
        latency_ms=round((time.perf_counter() - start) * 1000, 3),
        time_to_first_token_ms=_ms(out.time_to_first_token_ms),
        usage=with_cost(model, out.usage),
        provider_output_items=out.provider_output_items,
        thinking=out.thinking,
        finish_reason=out.finish_reason,
    )


def _ms(value: float | None) -> float | None:
    """Milliseconds to the microsecond, as ``latency_ms`` (a backend's own measure may be raw)."""
    return None if value is None else round(value, 3)


def finish_done(
    model: ModelSchema, done: Done, trace: str, start: float, ttft: float | None, usage: TokenUsage | None
) -> Done:
    return done.model_copy(
        update={
            "model_used": model.id,
            "trace_id": trace,
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
            "time_to_first_token_ms": _ms(ttft),
            "usage": with_cost(model, done.usage or usage),
        }
    )


def retryable(error: InferenceError) -> bool:
    if isinstance(error, AllModelsFailed):
        return any(getattr(e, "retryable", False) for _, e in error.attempts)
    return bool(getattr(error, "retryable", False))


def final_error(attempts: list[tuple[str, InferenceError]]) -> InferenceError:
    if not attempts:
        return ModelUnavailable("generate", "no model could take the request")
    errors = [e for _, e in attempts]
    spend = [e for e in errors if isinstance(e, SpendLimitExceeded)]
    if spend and all(isinstance(e, SpendLimitExceeded | CircuitOpen | ModelUnavailable) for e in errors):
        return spend[0]  # refused by policy, not broken: say so
    if len(attempts) == 1:
        return errors[0]
    if all(isinstance(e, InvalidInput | UnsupportedMode) for e in errors):
        return errors[0]  # no model could take this input: the caller's to fix (a 4xx), not an outage
    return AllModelsFailed(attempts)
