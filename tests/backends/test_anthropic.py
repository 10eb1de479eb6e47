"""The Anthropic Messages backend, driving the real ``anthropic`` SDK against the loopback fake."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from car_inference.backends.anthropic import AnthropicBackend
from car_inference.catalog import load_builtin
from car_inference.errors import ProviderError, UnsupportedMode
from car_inference.requests import (
    AudioBlock,
    ContentBlock,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    Message,
    ResponseFormat,
    TextBlock,
    ThinkingMode,
    ToolCall,
)
from car_inference.schema import ModelSchema
from car_inference.stream import Done, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart
from fakes import FakeProviderServer, Fault, Reply, ToolCallSpec
from fakes.remote_kit import PNG, WEATHER, keep_alive_alone_times_out, remote_backend

CATALOG = {m.id: m for m in load_builtin().models}
KEY = "sk-ant-test-key-000001"
EPHEMERAL = {"type": "ephemeral"}


def make(tmp_path: Path, env: dict[str, str] | None = None, **remote: Any) -> AnthropicBackend:
    return remote_backend(AnthropicBackend, tmp_path, env or {"ANTHROPIC_API_KEY": KEY}, **remote)


@pytest.fixture
def be(tmp_path: Path) -> AnthropicBackend:
    return make(tmp_path)


def model(
    fake: FakeProviderServer, model_id: str = "anthropic/claude-haiku-5-5", **update: Any
) -> ModelSchema:
    schema = CATALOG[model_id]
    source = schema.source.model_copy(update={"base_url": fake.anthropic_base_url})
    return schema.model_copy(update={"source": source, **update})


def budget_model(fake: FakeProviderServer) -> ModelSchema:
    """An older Claude in a user's catalog: budgeted thinking, sampling params, JSON output."""
    params = [
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "stop",
        "tools",
        "tool_choice",
        "response_format",
    ]
    return model(fake, supported_params=[*params, "extended_thinking"], id="anthropic/claude-older")


def sent(fake: FakeProviderServer) -> dict[str, Any]:
    return fake.requests[-1].json


async def events_of(be: AnthropicBackend, schema: ModelSchema, request: GenerateRequest) -> list[Any]:
    return [e async for e in be.stream(schema, request)]


# --- requests ------------------------------------------------------------------------------------


async def test_text_with_system_and_usage(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    fake.queue(
        Reply(text="Hi!", prompt_tokens=5, completion_tokens=9, cached_tokens=4, cache_creation_tokens=2)
    )
    out = await be.generate(model(fake), GenerateRequest(prompt="hello", context="be brief"))
    assert out.text == "Hi!"
    body = sent(fake)
    assert fake.requests[-1].path == "/v1/messages" and fake.requests[-1].api_key == KEY
    assert body["system"] == [{"type": "text", "text": "be brief"}]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert body["model"] == "claude-haiku-5-5" and body["max_tokens"] == 1024 and body["stream"] is True
    usage = out.usage
    assert usage is not None
    # Anthropic's input_tokens leave cached ones out: prompt = 5 + 4 read + 2 written
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 9, 20)
    assert usage.cached_prompt_tokens == 4 and usage.cache_write_prompt_tokens == 2
    assert usage.context_window == 1_000_000
    assert out.time_to_first_token_ms is not None


async def test_multi_turn_with_tool_results(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    history = [
        Message(role="system", content="you check weather"),
        Message(role="user", content="Paris and Rome?"),
        Message(
            role="assistant",
            content="Checking.",
            tool_calls=[
                ToolCall(id="toolu_a", name="get_weather", arguments={"city": "Paris"}),
                ToolCall(name="get_weather", arguments={"city": "Rome"}),
            ],
        ),
        Message(role="tool", tool_call_id="toolu_a", content="sunny"),
        Message(role="tool", content="rainy"),
    ]
    await be.generate(model(fake), GenerateRequest(messages=history, prompt="so?", tools=[WEATHER]))
    body = sent(fake)
    assert body["system"] == [{"type": "text", "text": "you check weather"}]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",  # both results and the new prompt in one user turn
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_1", "content": "rainy"},
                {"type": "text", "text": "so?"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER["function"]["parameters"],
        }
    ]


async def test_images_and_unsupported_media(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    images: list[ContentBlock] = [
        ImageBlock(data=PNG, media_type="image/png"),
        ImageBlock(url="https://example.com/cat.jpg"),
        ImageBlock(url=f"data:image/webp;base64,{PNG}"),
    ]
    await be.generate(model(fake), GenerateRequest(prompt="describe", images=images))
    assert sent(fake)["messages"][0]["content"] == [
        {"type": "text", "text": "describe"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": PNG}},
    ]
    for block in (
        AudioBlock(data="AAAA", media_type="audio/wav"),
        ImageBlock(data=PNG, media_type="image/bmp"),
    ):
        message = Message(role="user", content=[TextBlock(text="x"), block])
        with pytest.raises(UnsupportedMode):
            await be.generate(model(fake), GenerateRequest(messages=[message]))
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("choice", "parallel", "wire"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ("get_weather", None, {"type": "tool", "name": "get_weather"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
    ],
)
async def test_tool_choice_and_parallel_calls(
    fake: FakeProviderServer, be: AnthropicBackend, choice: str | None, parallel: bool | None, wire: Any
) -> None:
    params = GenerateParams(tool_choice=choice, parallel_tool_calls=parallel)
    await be.generate(model(fake), GenerateRequest(prompt="weather?", tools=[WEATHER], params=params))
    assert sent(fake)["tool_choice"] == wire


async def test_json_output(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "answer", "schema": schema})
    out = await be.generate(budget_model(fake), GenerateRequest(prompt="q", response_format=fmt))
    assert sent(fake)["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert json.loads(out.text) == {"answer": "q"}
    # Haiku 5.5 declares no response_format, and json_object has no native form: an instruction
    for schema_model, request_fmt in (
        (model(fake), fmt),
        (budget_model(fake), ResponseFormat(type="json_object")),
    ):
        await be.generate(schema_model, GenerateRequest(prompt="q", response_format=request_fmt))
        body = sent(fake)
        assert "output_config" not in body and "JSON" in body["system"][0]["text"]


async def test_params_omitted_when_unsupported(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    params = GenerateParams(temperature=0.3, top_p=0.9, top_k=20, max_tokens=64, stop=["END"], seed=7)
    await be.generate(model(fake), GenerateRequest(prompt="x", params=params))
    body = sent(fake)
    assert {"temperature", "top_p", "top_k", "seed"}.isdisjoint(body)
    assert body["max_tokens"] == 64 and body["stop_sequences"] == ["END"]
    await be.generate(budget_model(fake), GenerateRequest(prompt="x", params=params))
    body = sent(fake)
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.3, 0.9, 20) and "seed" not in body


@pytest.mark.parametrize(
    ("params", "thinking", "output_config"),
    [
        ({}, None, None),
        ({"thinking": "on"}, {"type": "adaptive"}, None),
        ({"budget_tokens": 3000}, {"type": "adaptive"}, {"effort": "medium"}),
        ({"reasoning_effort": "high"}, {"type": "adaptive"}, {"effort": "high"}),
        ({"reasoning_effort": "minimal"}, {"type": "adaptive"}, {"effort": "low"}),
        ({"thinking": "off"}, None, {"effort": "low"}),
    ],
)
async def test_adaptive_thinking_mapping(
    fake: FakeProviderServer, be: AnthropicBackend, params: dict[str, Any], thinking: Any, output_config: Any
) -> None:
    await be.generate(model(fake), GenerateRequest(prompt="x", params=GenerateParams.model_validate(params)))
    body = sent(fake)
    assert body.get("thinking") == thinking and body.get("output_config") == output_config


async def test_budget_thinking_mapping(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    request = GenerateRequest(
        prompt="x", params=GenerateParams(budget_tokens=4000, max_tokens=1000, temperature=0.2)
    )
    await be.generate(budget_model(fake), request)
    body = sent(fake)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4000}
    assert body["max_tokens"] == 5000 and "temperature" not in body  # thinking fixes the temperature
    await be.generate(
        budget_model(fake),
        GenerateRequest(prompt="x", params=GenerateParams(thinking=ThinkingMode.ON, budget_tokens=10)),
    )
    assert sent(fake)["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    await be.generate(
        budget_model(fake), GenerateRequest(prompt="x", params=GenerateParams(thinking=ThinkingMode.ON))
    )
    assert sent(fake)["thinking"] == {"type": "enabled", "budget_tokens": 8000}  # medium effort
    assert sent(fake)["max_tokens"] == 8000 + 1024
    await be.generate(
        budget_model(fake), GenerateRequest(prompt="x", params=GenerateParams(thinking=ThinkingMode.OFF))
    )
    assert sent(fake)["thinking"] == {"type": "disabled"}


async def test_thinking_kept_apart(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    fake.queue(Reply(text="42", thinking="let me think"), Reply(text="42", thinking="let me think"))
    events = await events_of(
        be, model(fake), GenerateRequest(prompt="x", params=GenerateParams(thinking=ThinkingMode.ON))
    )
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "let me think"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "42"
    done = events[-1]
    assert isinstance(done, Done) and (done.text, done.thinking) == ("42", "let me think")
    out = await be.generate(
        model(fake), GenerateRequest(prompt="x", params=GenerateParams(thinking=ThinkingMode.OFF))
    )
    assert (out.text, out.thinking) == ("42", None)


async def test_tool_loop_with_thinking_sends_the_signed_blocks_back(
    fake: FakeProviderServer, be: AnthropicBackend
) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    fake.queue(
        Reply(thinking="I should look it up", tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"})]),
        Reply(thinking="It is cold", text="3 °C in Oslo"),
        Reply(text="never reached"),
    )
    ask = Message(role="user", content="Weather in Oslo?")
    on = GenerateParams(thinking=ThinkingMode.ON)
    first = await be.generate(model(fake), GenerateRequest(messages=[ask], tools=tools, params=on))
    assert (
        first.provider_output_items
        == [
            {
                "type": "thinking",
                "thinking": "I should look it up",
                "signature": first.provider_output_items[0]["signature"],
            }
        ]
        and first.provider_output_items[0]["signature"]
    )
    turn = Message(
        role="assistant",
        content=first.text,
        tool_calls=first.tool_calls,
        provider_items=first.provider_output_items,
    )
    result = Message(role="tool", tool_call_id=first.tool_calls[0].id, content="3 °C")
    second = await be.generate(
        model(fake), GenerateRequest(messages=[ask, turn, result], tools=tools, params=on)
    )
    assert second.text == "3 °C in Oslo"
    blocks = sent(fake)["messages"][1]["content"]
    assert [b["type"] for b in blocks] == ["thinking", "tool_use"] and blocks[
        0
    ] == first.provider_output_items[0]
    # Without the blocks the API refuses the turn (the fake enforces Anthropic's rule): a 400.
    bare = turn.model_copy(update={"provider_items": []})
    with pytest.raises(ProviderError, match="must start with a thinking block") as info:
        await be.generate(model(fake), GenerateRequest(messages=[ask, bare, result], tools=tools, params=on))
    assert info.value.status == 400 and not info.value.retryable


async def test_prompt_caching(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    history = [
        Message(role="user", content="first"),
        Message(role="assistant", content="ok"),
        Message(role="user", content=[TextBlock(text="second"), TextBlock(text="part two")]),
    ]
    await be.generate(
        model(fake), GenerateRequest(messages=history, context="long system prompt", cache_control=True)
    )
    body = sent(fake)
    assert body["system"] == [{"type": "text", "text": "long system prompt", "cache_control": EPHEMERAL}]
    assert body["messages"][-1]["content"][-1] == {
        "type": "text",
        "text": "part two",
        "cache_control": EPHEMERAL,
    }
    assert "cache_control" not in body["messages"][-1]["content"][0]
    assert "cache_control" not in body["messages"][0]["content"][0]
    await be.generate(model(fake), GenerateRequest(messages=history, context="long system prompt"))
    assert "cache_control" not in json.dumps(sent(fake))


async def test_stream_reassembles_tool_calls(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    args = {"city": "Paris", "days": [1, 2]}
    fake.queue(
        Reply(
            text="Checking.",
            thinking="call the tool",
            chunk_chars=3,
            tool_calls=[ToolCallSpec("get_weather", args, id="toolu_x"), ToolCallSpec("noop")],
        )
    )
    events = await events_of(be, model(fake), GenerateRequest(prompt="weather?", tools=[WEATHER]))
    starts = [(e.index, e.id, e.name) for e in events if isinstance(e, ToolCallStart)]
    assert starts[0] == (0, "toolu_x", "get_weather") and starts[1][::2] == (1, "noop")
    pieces = [e.arguments for e in events if isinstance(e, ToolCallDelta) and e.index == 0]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == args
    done = events[-1]
    assert isinstance(done, Done) and done.text == "Checking." and done.thinking == "call the tool"
    assert [(c.id, c.name, c.arguments) for c in done.tool_calls] == [
        ("toolu_x", "get_weather", args),
        (starts[1][1], "noop", {}),
    ]


async def test_finish_reason(fake: FakeProviderServer, be: AnthropicBackend) -> None:
    fake.queue(
        Reply(text="cut", finish_reason="length"),
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"})]),
        Reply(text="", finish_reason="refusal"),
        Reply(text="fine"),
    )
    reasons = [
        (await be.generate(model(fake), GenerateRequest(prompt="x", tools=[WEATHER]))).finish_reason
        for _ in range(4)
    ]
    assert reasons == ["length", "tool_calls", "content_filter", "stop"]


# --- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "retryable", "retry_after"),
    [
        (Fault.rate_limit(retry_after=2), 429, True, 2.0),
        (Fault.server_error(), 500, True, None),
        (Fault.server_error(529), 529, True, None),
        (Fault.unauthorized(), 401, False, None),
        (Fault.forbidden(), 403, False, None),
        (Fault.bad_request(), 400, False, None),
    ],
)
async def test_status_faults(
    fake: FakeProviderServer,
    be: AnthropicBackend,
    fault: Fault,
    status: int,
    retryable: bool,
    retry_after: float | None,
) -> None:
    fake.queue(fault)
    with pytest.raises(ProviderError) as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    err = info.value
    assert (err.status, err.retryable, err.retry_after) == (status, retryable, retry_after)
    assert err.provider == "anthropic" and len(fake.requests) == 1


async def test_keep_alive_comments_alone_time_out(fake: FakeProviderServer, tmp_path: Path) -> None:
    await keep_alive_alone_times_out(make(tmp_path, timeout_s=0.6), model(fake), fake)


async def test_hang_malformed_and_cut(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path, timeout_s=0.4)
    fake.queue(Fault.hang(10))
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert time.monotonic() - started < 3 and info.value.status is None and info.value.retryable
    assert info.value.timeout
    fake.queue(Fault.malformed_json())
    with pytest.raises(ProviderError) as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert info.value.status is None and info.value.retryable and "malformed" in str(info.value)
    fake.queue(Fault.cut_stream(2))
    received: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for event in be.stream(model(fake), GenerateRequest(prompt="hello there")):
            if isinstance(event, TextDelta):
                received.append(event.text)
    assert "".join(received) == "echo: he" and info.value.status is None and info.value.retryable


_START = b'{"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", '
_START += b'"content": [], "model": "m", "usage": {"input_tokens": 1, "output_tokens": 0}}}'


@pytest.mark.parametrize(
    "events",
    [
        [b'{"type": "message_start"}'],  # no message
        [_START, b'{"type": "content_block_start", "index": 0}'],  # no content_block
        [_START, b'{"type": "message_delta", "usage": {"output_tokens": 1}}'],  # no delta
    ],
)
async def test_a_malformed_event_is_a_provider_error(
    fake: FakeProviderServer, tmp_path: Path, events: list[bytes]
) -> None:
    """The SDK builds events without validating them: a missing field was an AttributeError (a 500
    from the server, no fallback)."""
    fake.queue(Fault.raw_stream(*events, b'{"type": "message_stop"}'))
    with pytest.raises(ProviderError, match="malformed") as info:
        await make(tmp_path).generate(model(fake), GenerateRequest(prompt="x"))
    assert info.value.retryable


async def test_rotation_to_second_key(fake: FakeProviderServer, tmp_path: Path) -> None:
    other = "sk-ant-test-key-000002"
    be = make(tmp_path, {"ANTHROPIC_API_KEYS": f"{KEY},{other}"})
    fake.set_key_behavior(KEY, Fault.unauthorized())
    assert (await be.generate(model(fake), GenerateRequest(prompt="x"))).text == "echo: x"
    await be.generate(model(fake), GenerateRequest(prompt="y"))
    assert [r.api_key for r in fake.requests] == [KEY, other, other]  # the refused key is skipped
    states = [(s.masked, s.state) for s in be.ctx.keys.stats()["ANTHROPIC_API_KEY"]]  # type: ignore[union-attr]
    assert states == [("sk-…0001", "disabled"), ("sk-…0002", "ok")]
