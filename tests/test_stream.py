from __future__ import annotations

from pydantic import TypeAdapter

from car_inference.requests import TokenUsage
from car_inference.stream import (
    Done,
    StreamAccumulator,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageEvent,
    parse_tool_arguments,
)


def test_accumulator_assembles_text_thinking_and_tool_calls_by_index() -> None:
    acc = StreamAccumulator()
    events: list[StreamEvent] = [
        ThinkingDelta(text="let me "),
        ThinkingDelta(text="think"),
        TextDelta(text="Hel"),
        TextDelta(text="lo"),
        ToolCallStart(index=1, id="b", name="second"),
        ToolCallStart(index=0, id="a", name="first"),
        ToolCallDelta(index=0, arguments='{"x": '),
        ToolCallDelta(index=1, arguments="{}"),
        ToolCallDelta(index=0, arguments="1}"),
        UsageEvent(usage=TokenUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5)),
    ]
    for event in events:
        acc.push(event)
    text, calls = acc.finish()
    assert text == "Hello"
    assert acc.thinking == "let me think"
    assert [(c.id, c.name, c.arguments) for c in calls] == [("a", "first", {"x": 1}), ("b", "second", {})]
    assert acc.usage is not None and acc.usage.total_tokens == 5


def test_done_wins_over_accumulated_pieces() -> None:
    acc = StreamAccumulator()
    acc.push(TextDelta(text="partial"))
    acc.push(Done(text="final"))
    assert acc.finish() == ("final", [])


def test_malformed_tool_arguments_are_kept_not_lost() -> None:
    acc = StreamAccumulator()
    acc.push(ToolCallStart(index=0, name="f"))
    acc.push(ToolCallDelta(index=0, arguments='{"x": 1'))
    (call,) = acc.tool_calls()
    assert call.arguments == {} and call.invalid_arguments == '{"x": 1'
    assert parse_tool_arguments("[1, 2]") == ({}, "[1, 2]")
    assert parse_tool_arguments("") == ({}, None)


def test_events_round_trip_through_json_by_type() -> None:
    adapter = TypeAdapter(StreamEvent)
    events: list[StreamEvent] = [
        TextDelta(text="a"),
        ToolCallStart(index=0, name="f"),
        Done(text="x", model_used="m"),
    ]
    for event in events:
        assert adapter.validate_json(adapter.dump_json(event)) == event
