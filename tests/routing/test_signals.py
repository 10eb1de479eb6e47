from __future__ import annotations

import pytest

from car_inference.requests import GenerateRequest, InferenceResult, ToolCall
from car_inference.routing.signals import DEFAULT_WEIGHTS, ImplicitSignal, ImplicitSignalType, detect_signals

REQ = GenerateRequest(prompt="Write a function")


def result(text: str = "", tool_calls: list[ToolCall] | None = None) -> InferenceResult:
    return InferenceResult(text=text, tool_calls=tool_calls or [], trace_id="t", model_used="m", latency_ms=1)


def kinds(res: InferenceResult) -> list[ImplicitSignalType]:
    return [s.type for s in detect_signals(REQ, res)]


def test_clean_answers_have_no_signals() -> None:
    assert kinds(result("Sure.\n```python\ndef f(x):\n    return x + 1\n```")) == []
    assert kinds(result("", [ToolCall(name="get_weather", arguments={"city": "Boston"})])) == []
    assert kinds(result("```js\nconst x = ;\n```")) == []  # only Python is compiled


def test_invalid_tool_json() -> None:
    call = ToolCall(name="get_weather", invalid_arguments='{"city": "Bos')
    assert kinds(result("", [call])) == [ImplicitSignalType.TOOL_JSON_INVALID]


def test_python_that_does_not_compile() -> None:
    assert kinds(result("Here:\n```python\ndef f(x)\n    return x\n```")) == [
        ImplicitSignalType.CODE_COMPILE_FAILED
    ]
    assert kinds(result("```py\nprint('a'\n```")) == [ImplicitSignalType.CODE_COMPILE_FAILED]
    assert kinds(result("```python\n>>> f(\n```")) == []  # a doctest transcript is not a program


def test_empty_response() -> None:
    assert kinds(result("   \n")) == [ImplicitSignalType.EMPTY_RESPONSE]


def test_weights() -> None:
    assert (
        ImplicitSignal(ImplicitSignalType.QUICK_RETRY).weight
        == DEFAULT_WEIGHTS[ImplicitSignalType.QUICK_RETRY]
    )
    assert ImplicitSignal("empty_response", 0.3).weight == 0.3  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ImplicitSignal(ImplicitSignalType.QUICK_RETRY, 2.0)
