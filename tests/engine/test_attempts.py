"""The plain parts of a generation attempt (engine/attempts.py): which error a request fails with
when no attempt answered, whether it may be retried, and the `done` tool's name lookup. The
attempts themselves run in test_generation*.py."""

from __future__ import annotations

from car_inference.engine.attempts import final_error, retryable, tool_name
from car_inference.errors import (
    AllModelsFailed,
    CircuitOpen,
    InvalidInput,
    ModelUnavailable,
    ProviderError,
    SpendLimitExceeded,
)


def test_no_attempt_is_a_model_unavailable() -> None:
    assert isinstance(final_error([]), ModelUnavailable)


def test_one_attempt_fails_with_its_own_error() -> None:
    error = ProviderError("boom", provider="openai", model="a/m", status=500)
    assert final_error([("a/m", error)]) is error


def test_a_spend_refusal_is_said_when_nothing_else_broke() -> None:
    spend = SpendLimitExceeded("*", "daily", 1.0, 1.0, 0.1)
    assert final_error([("a/m", spend), ("b/m", CircuitOpen("b/m"))]) is spend
    broken = ProviderError("boom", provider="openai", model="a/m", status=500)
    assert isinstance(final_error([("a/m", spend), ("b/m", broken)]), AllModelsFailed)


def test_input_no_model_takes_is_the_callers_error() -> None:
    first = InvalidInput("too long")
    assert final_error([("a/m", first), ("b/m", InvalidInput("too long too"))]) is first


def test_retryable_looks_into_every_attempt() -> None:
    busy = ProviderError("busy", provider="openai", model="b/m", status=503, retryable=True)
    assert retryable(busy)
    assert retryable(AllModelsFailed([("a/m", InvalidInput("x")), ("b/m", busy)]))
    assert not retryable(InvalidInput("x"))


def test_tool_name_reads_both_tool_shapes() -> None:
    assert tool_name({"type": "function", "function": {"name": "done"}}) == "done"
    assert tool_name({"name": "done"}) == "done"
    assert tool_name({"function": "done"}) is None
