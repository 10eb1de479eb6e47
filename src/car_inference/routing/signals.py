"""Implicit quality signals: evidence that an answer was poor even when nobody rated it.

Each signal lowers the trace's quality score (1 for a success) by its weight, floored at 0;
explicit feedback, when given, replaces the score and signals no longer change it.

- ``quick_retry``: the same prompt was sent again within the retry window (120 s by default): the
  user did not like the answer. Detected by the tracker at ``record_start``.
- ``tool_json_invalid``: a tool call's arguments did not parse (``ToolCall.invalid_arguments``).
- ``code_compile_failed``: a Python code block in the answer does not compile.
- ``empty_response``: no text and no tool calls.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from ..requests import GenerateRequest, InferenceResult, ToolCall

__all__ = ["DEFAULT_WEIGHTS", "ImplicitSignal", "ImplicitSignalType", "answer_signals", "detect_signals"]


class ImplicitSignalType(StrEnum):
    QUICK_RETRY = "quick_retry"
    TOOL_JSON_INVALID = "tool_json_invalid"
    CODE_COMPILE_FAILED = "code_compile_failed"
    EMPTY_RESPONSE = "empty_response"


DEFAULT_WEIGHTS: dict[ImplicitSignalType, float] = {
    ImplicitSignalType.QUICK_RETRY: 0.5,
    ImplicitSignalType.TOOL_JSON_INVALID: 0.6,
    ImplicitSignalType.CODE_COMPILE_FAILED: 0.5,
    ImplicitSignalType.EMPTY_RESPONSE: 1.0,
}


@dataclass(frozen=True, slots=True)
class ImplicitSignal:
    type: ImplicitSignalType
    weight: float = -1.0  # -1: the type's default weight

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ImplicitSignalType(self.type))
        if self.weight < 0:
            object.__setattr__(self, "weight", DEFAULT_WEIGHTS[self.type])
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"signal weight must be within 0..1, got {self.weight}")


_PY_BLOCK = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def _python_blocks_fail(text: str) -> bool:
    for block in _PY_BLOCK.findall(text):
        if not block.strip() or ">>>" in block:  # doctest-style transcripts are not programs
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes is not a failure
                compile(block, "<answer>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            return True
    return False


def detect_signals(request: GenerateRequest | None, result: InferenceResult) -> list[ImplicitSignal]:
    """The implicit signals one result shows (quick retries are detected by the tracker)."""
    return answer_signals(result.text, result.tool_calls)


def answer_signals(text: str, tool_calls: Sequence[ToolCall]) -> list[ImplicitSignal]:
    """The implicit signals of an answer's text and tool calls (what ``detect_signals`` reads)."""
    signals: list[ImplicitSignal] = []
    if any(call.invalid_arguments is not None for call in tool_calls):
        signals.append(ImplicitSignal(ImplicitSignalType.TOOL_JSON_INVALID))
    if not text.strip() and not tool_calls:
        signals.append(ImplicitSignal(ImplicitSignalType.EMPTY_RESPONSE))
    elif "```" in text and _python_blocks_fail(text):
        signals.append(ImplicitSignal(ImplicitSignalType.CODE_COMPILE_FAILED))
    return signals
