"""Streaming events and the accumulator that folds them into a final answer.

A stream is a sequence of ``StreamEvent``s ending in exactly one ``Done`` (or an ``Error``).
Tool calls arrive as ``ToolCallStart`` then any number of ``ToolCallDelta`` pieces of JSON
arguments, keyed by ``index``; ``StreamAccumulator`` assembles them into complete ``ToolCall``s.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .requests import InferenceResult, TokenUsage, ToolCall

__all__ = [
    "Done",
    "ErrorEvent",
    "RouteEvent",
    "StreamAccumulator",
    "StreamEvent",
    "TextDelta",
    "ThinkingDelta",
    "ToolCallDelta",
    "ToolCallStart",
    "UsageEvent",
    "parse_tool_arguments",
]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteEvent(_Event):
    """First event of an engine stream: which model will answer and why. Sent again with strategy
    "fallback" when a model fails and the next one takes over; when text had already gone out,
    ``continues_from`` is its length in characters, and the new model continues that text."""

    type: Literal["route"] = "route"
    model_id: str
    strategy: str
    reason: str
    trace_id: str
    fallbacks: list[str] = Field(default_factory=list)
    continues_from: int | None = None


class TextDelta(_Event):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(_Event):
    type: Literal["thinking_delta"] = "thinking_delta"
    text: str


class ToolCallStart(_Event):
    type: Literal["tool_call_start"] = "tool_call_start"
    index: int
    id: str | None = None
    name: str


class ToolCallDelta(_Event):
    type: Literal["tool_call_delta"] = "tool_call_delta"
    index: int
    arguments: str


class UsageEvent(_Event):
    type: Literal["usage"] = "usage"
    usage: TokenUsage


class Done(_Event):
    """The end of a stream: the whole text and the assembled tool calls."""

    type: Literal["done"] = "done"
    text: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    thinking: str | None = None
    model_used: str | None = None
    trace_id: str | None = None
    latency_ms: float | None = None
    time_to_first_token_ms: float | None = None
    usage: TokenUsage | None = None
    finish_reason: str | None = None
    # Opaque items the provider needs back with this turn (Anthropic thinking blocks and their
    # signatures): give them to the next request as the assistant message's ``provider_items``.
    provider_output_items: list[dict[str, Any]] = Field(default_factory=list)

    def result(self) -> InferenceResult:
        """The answer as ``generate`` gives it (no bounding boxes: those are parsed per model)."""
        return InferenceResult.model_construct(
            text=self.text,
            tool_calls=list(self.tool_calls),
            bounding_boxes=[],
            trace_id=self.trace_id or "",
            model_used=self.model_used or "",
            latency_ms=self.latency_ms or 0.0,
            time_to_first_token_ms=self.time_to_first_token_ms,
            usage=self.usage,
            provider_output_items=list(self.provider_output_items),
            thinking=self.thinking,
            finish_reason=self.finish_reason,
        )


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    message: str
    retryable: bool = False


StreamEvent = Annotated[
    RouteEvent | TextDelta | ThinkingDelta | ToolCallStart | ToolCallDelta | UsageEvent | Done | ErrorEvent,
    Field(discriminator="type"),
]


def parse_tool_arguments(raw: str | None) -> tuple[dict[str, object], str | None]:
    """Parse a tool call's JSON arguments. Returns (arguments, None) or ({}, raw) when the text is
    not a JSON object, so that a malformed call is kept, visible, and counted as a signal."""
    if raw is None or not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except ValueError:
        return {}, raw
    if not isinstance(value, dict):
        return {}, raw
    return value, None


class StreamAccumulator:
    """Folds events into (text, tool_calls); also keeps thinking text and the last usage."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._thinking: list[str] = []
        self._calls: dict[int, tuple[str | None, str, list[str]]] = {}
        self.usage: TokenUsage | None = None
        self.done: Done | None = None

    def push(self, event: StreamEvent) -> None:
        match event:
            case TextDelta(text=t):
                self._text.append(t)
            case ThinkingDelta(text=t):
                self._thinking.append(t)
            case ToolCallStart(index=i, id=call_id, name=name):
                self._calls[i] = (call_id, name, [])
            case ToolCallDelta(index=i, arguments=piece):
                if i not in self._calls:
                    self._calls[i] = (None, "", [])
                self._calls[i][2].append(piece)
            case UsageEvent(usage=u):
                self.usage = u
            case Done():
                self.done = event
                if event.usage is not None:
                    self.usage = event.usage
            case _:
                pass

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def thinking(self) -> str | None:
        return "".join(self._thinking) or None

    def tool_calls(self) -> list[ToolCall]:
        calls = []
        for index in sorted(self._calls):
            call_id, name, pieces = self._calls[index]
            args, invalid = parse_tool_arguments("".join(pieces))
            calls.append(ToolCall(id=call_id, name=name, arguments=args, invalid_arguments=invalid))
        return calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text, tool_calls): the ``Done`` event's when one arrived, else what was accumulated."""
        if self.done is not None:
            return self.done.text, list(self.done.tool_calls)
        return self.text, self.tool_calls()
