"""The OpenAI Chat Completions backend, driving the real ``openai`` SDK against the loopback fake."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from car_inference.backends.openai_compat import OpenAICompatBackend
from car_inference.backends.remote import PLACEHOLDER_KEY, answer_budget
from car_inference.catalog import load_builtin
from car_inference.errors import ProviderError, UnsupportedMode
from car_inference.requests import (
    AudioBlock,
    ContentBlock,
    EmbedRequest,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    Message,
    ResponseFormat,
    TextBlock,
    ThinkingMode,
    ToolCall,
    VideoBlock,
)
from car_inference.routing import failure_weight
from car_inference.schema import ModelSchema
from car_inference.stream import Done, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart, UsageEvent
from fakes import FakeProviderServer, Fault, Reply, ToolCallSpec
from fakes.http_answer import answering
from fakes.remote_kit import PNG, WEATHER, keep_alive_alone_times_out, remote_backend

CATALOG = {m.id: m for m in load_builtin().models}
KEY = "sk-openai-test-key-0001"


def make(tmp_path: Path, env: dict[str, str] | None = None, **remote: Any) -> OpenAICompatBackend:
    keys = env or {"OPENAI_API_KEY": KEY, "OPENROUTER_API_KEY": KEY}
    return remote_backend(OpenAICompatBackend, tmp_path, keys, **remote)


@pytest.fixture
def be(tmp_path: Path) -> OpenAICompatBackend:
    return make(tmp_path)


def model(fake: FakeProviderServer, model_id: str = "openai/gpt-6-luna") -> ModelSchema:
    schema = CATALOG[model_id]
    return schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": fake.openai_base_url})}
    )


def sent(fake: FakeProviderServer) -> dict[str, Any]:
    return fake.requests[-1].json


async def events_of(be: OpenAICompatBackend, schema: ModelSchema, request: GenerateRequest) -> list[Any]:
    return [e async for e in be.stream(schema, request)]


# --- requests ------------------------------------------------------------------------------------


async def test_text_with_system_usage_and_ttft(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    fake.queue(Reply(text="Hi!", prompt_tokens=11, completion_tokens=7, cached_tokens=3))
    out = await be.generate(model(fake), GenerateRequest(prompt="hello", context="be brief"))
    assert out.text == "Hi!" and out.tool_calls == [] and out.thinking is None
    body = sent(fake)
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    assert body["model"] == "gpt-6-luna" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert fake.requests[-1].api_key == KEY
    usage = out.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)
    assert usage.cached_prompt_tokens == 3 and usage.context_window == 1050000 and usage.cost_usd is None
    assert out.time_to_first_token_ms is not None and out.time_to_first_token_ms > 0


async def test_multi_turn_with_tool_results(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    history = [
        Message(role="user", content="weather in Paris and Rome?"),
        Message(
            role="assistant",
            content="Checking.",
            tool_calls=[
                ToolCall(id="call_a", name="get_weather", arguments={"city": "Paris"}),
                ToolCall(name="get_weather", invalid_arguments='{"city": "Ro'),
            ],
        ),
        Message(role="tool", tool_call_id="call_a", content="sunny"),
        Message(role="tool", content="rainy"),
    ]
    await be.generate(model(fake), GenerateRequest(messages=history, prompt="so?", tools=[WEATHER]))
    messages = sent(fake)["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Ro'},
            },
        ],
    }
    assert messages[2] == {"role": "tool", "tool_call_id": "call_a", "content": "sunny"}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "rainy"}
    assert messages[4] == {"role": "user", "content": "so?"}


async def test_images_base64_and_urls(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    images: list[ContentBlock] = [
        ImageBlock(data=PNG, media_type="image/png", detail="low"),
        ImageBlock(url="https://example.com/cat.jpg"),
        ImageBlock(url=f"data:image/png;base64,{PNG}"),
    ]
    await be.generate(model(fake), GenerateRequest(prompt="describe", images=images))
    parts = sent(fake)["messages"][-1]["content"]
    assert parts == [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]


async def test_audio_input_and_unsupported_media(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    audio = Message(
        role="user",
        content=[TextBlock(text="transcribe"), AudioBlock(data="UklGRg==", media_type="audio/wav")],
    )
    await be.generate(model(fake), GenerateRequest(messages=[audio]))
    part = sent(fake)["messages"][-1]["content"][1]
    assert part == {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    for block in (
        AudioBlock(url="https://example.com/a.mp3"),
        AudioBlock(data="AAAA", media_type="audio/ogg"),
        VideoBlock(data="AAAA", media_type="video/mp4"),
    ):
        with pytest.raises(UnsupportedMode):
            await be.generate(model(fake), GenerateRequest(messages=[Message(role="user", content=[block])]))
    assert len(fake.requests) == 1  # refused before any request


@pytest.mark.parametrize(
    ("choice", "wire"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
async def test_tool_choice_and_parallel_calls(
    fake: FakeProviderServer, be: OpenAICompatBackend, choice: str, wire: Any
) -> None:
    request = GenerateRequest(
        prompt="weather?",
        tools=[WEATHER],
        params=GenerateParams(tool_choice=choice, parallel_tool_calls=False),
    )
    await be.generate(model(fake), request)
    body = sent(fake)
    assert body["tools"] == [WEATHER]
    assert body["tool_choice"] == wire and body["parallel_tool_calls"] is False


async def test_tools_refused_for_a_model_without_them(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    with pytest.raises(UnsupportedMode, match="tool"):
        await be.generate(model(fake, "openai/gpt-6.2-astra"), GenerateRequest(prompt="x", tools=[WEATHER]))
    assert not fake.requests
    # With tool_choice "none" they are context only: answered in text, the tools left out.
    context_only = GenerateRequest(prompt="x", tools=[WEATHER], params=GenerateParams(tool_choice="none"))
    assert (await be.generate(model(fake, "openai/gpt-6.2-astra"), context_only)).text
    assert "tools" not in sent(fake) and "tool_choice" not in sent(fake)


async def test_json_modes(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    out = await be.generate(
        model(fake), GenerateRequest(prompt="data", response_format=ResponseFormat(type="json_object"))
    )
    assert sent(fake)["response_format"] == {"type": "json_object"}
    assert json.loads(out.text) == {"echo": "data"}
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "answer", "schema": schema, "strict": True})
    out = await be.generate(model(fake), GenerateRequest(prompt="q", response_format=fmt))
    assert sent(fake)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    assert json.loads(out.text) == {"answer": "q"}
    # a model without a native JSON mode gets an instruction instead
    plain = model(fake).model_copy(update={"supported_params": ["max_tokens"]})
    await be.generate(plain, GenerateRequest(prompt="q", response_format=fmt))
    body = sent(fake)
    assert "response_format" not in body
    assert body["messages"][0]["role"] == "system" and '"answer"' in body["messages"][0]["content"]


async def test_params_omitted_when_unsupported(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    params = GenerateParams(
        temperature=0.3, top_p=0.9, top_k=20, max_tokens=64, stop=["END"], seed=7,
        frequency_penalty=0.5, presence_penalty=-0.25,
    )  # fmt: skip
    await be.generate(model(fake), GenerateRequest(prompt="x", params=params))
    body = sent(fake)
    for name in ("temperature", "top_p", "top_k", "stop", "seed", "max_tokens", "frequency_penalty"):
        assert name not in body
    assert body["max_completion_tokens"] == 64
    await be.generate(
        model(fake, "openrouter/llama-3.3-70b-instruct"), GenerateRequest(prompt="x", params=params)
    )
    body = sent(fake)
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0.3, 0.9, 20, 64)
    assert body["stop"] == ["END"] and body["seed"] == 7 and "max_completion_tokens" not in body
    assert (body["frequency_penalty"], body["presence_penalty"]) == (0.5, -0.25)
    assert "reasoning_effort" not in body
    await be.generate(model(fake, "openrouter/llama-3.3-70b-instruct"), GenerateRequest(prompt="x"))
    assert "frequency_penalty" not in sent(fake) and "presence_penalty" not in sent(fake)  # 0: unsent


async def test_stop_strings_a_model_takes_none_of_are_applied_to_its_answer(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    """OpenAI's reasoning models take no `stop`: it was dropped, and the answer ran on past the
    stop string with finish_reason "stop". The answer is cut there now, streamed or not, across
    chunk boundaries, and the upstream closed."""
    params = GenerateParams(stop=["STOP", "HALT"])
    fake.queue(Reply(text="alpha beta STOPHERE gamma delta", chunk_chars=3))
    result = await be.generate(model(fake), GenerateRequest(prompt="x", params=params))
    assert "stop" not in sent(fake)
    assert (result.text, result.finish_reason) == ("alpha beta ", "stop")
    fake.queue(Reply(text="one two HALT three", chunk_chars=2))
    events = await events_of(be, model(fake), GenerateRequest(prompt="x", params=params))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "one two "
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
    fake.queue(Reply(text="no stop string here, ST", chunk_chars=4))  # a stop's start held, then given
    done = await be.generate(model(fake), GenerateRequest(prompt="x", params=params))
    assert done.text == "no stop string here, ST"


async def test_a_sources_system_prompt_and_repeat_penalty_field(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    """What a managed llama.cpp server's model gets (runtimes.managed): the GGUF's system prompt
    for a request without one, and the repeat penalty in the server's own body field."""
    base = model(fake, "openrouter/llama-3.3-70b-instruct")
    source = base.source.model_copy(
        update={"system_prompt": "Be correct.", "repeat_penalty_field": "repeat_penalty"}
    )
    served = base.model_copy(update={"source": source})
    await be.generate(served, GenerateRequest(prompt="x", params=GenerateParams(repeat_penalty=1.1)))
    body = sent(fake)
    assert (
        body["messages"][0] == {"role": "system", "content": "Be correct."} and body["repeat_penalty"] == 1.1
    )
    await be.generate(served, GenerateRequest(prompt="x", context="Mine."))
    body = sent(fake)
    assert body["messages"][0] == {"role": "system", "content": "Mine."}, "the request's own wins"
    assert "repeat_penalty" not in body, "1.0 (off) is not sent"
    await be.generate(base, GenerateRequest(prompt="x", params=GenerateParams(repeat_penalty=1.1)))
    body = sent(fake)
    assert body["messages"][0]["role"] == "user" and "repeat_penalty" not in body, "OpenAI's API has neither"


@pytest.mark.parametrize(
    ("params", "effort"),
    [
        ({}, None),
        ({"thinking": "on"}, None),
        ({"budget_tokens": 3000}, "medium"),
        ({"thinking": "on", "budget_tokens": 20000}, "high"),
        ({"reasoning_effort": "minimal"}, "minimal"),
        ({"thinking": "off"}, "low"),
    ],
)
async def test_reasoning_effort_mapping(
    fake: FakeProviderServer, be: OpenAICompatBackend, params: dict[str, Any], effort: str | None
) -> None:
    await be.generate(model(fake), GenerateRequest(prompt="x", params=GenerateParams.model_validate(params)))
    assert sent(fake).get("reasoning_effort") == effort


async def test_thinking_kept_apart_and_dropped_when_off(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    fake.queue(Reply(text="42", thinking="let me think"), Reply(text="42", thinking="let me think"))
    events = await events_of(be, model(fake), GenerateRequest(prompt="x"))
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "let me think"
    done = events[-1]
    assert isinstance(done, Done) and done.text == "42" and done.thinking == "let me think"
    out = await be.generate(
        model(fake), GenerateRequest(prompt="x", params=GenerateParams(thinking=ThinkingMode.OFF))
    )
    assert out.text == "42" and out.thinking is None


async def test_stream_reassembles_text_and_tool_calls(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    args = {"city": "Paris", "unit": "celsius"}
    fake.queue(
        Reply(
            text="Let me check.",
            chunk_chars=3,
            tool_calls=[ToolCallSpec("get_weather", args, id="call_x"), ToolCallSpec("noop", '{"bad')],
        )
    )
    events = await events_of(be, model(fake), GenerateRequest(prompt="weather?", tools=[WEATHER]))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Let me check."
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.id, s.name) for s in starts] == [
        (0, "call_x", "get_weather"),
        (1, starts[1].id, "noop"),
    ]
    pieces = [e.arguments for e in events if isinstance(e, ToolCallDelta) and e.index == 0]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == args
    assert isinstance(events[-2], UsageEvent) and events[-2].usage.total_tokens > 0
    done = events[-1]
    assert isinstance(done, Done)
    assert done.tool_calls[0].arguments == args and done.tool_calls[0].id == "call_x"
    assert done.tool_calls[1].invalid_arguments == '{"bad' and done.tool_calls[1].arguments == {}
    assert done.usage is not None and done.usage.context_window == 1050000


async def test_finish_reason(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    fake.queue(
        Reply(text="cut", finish_reason="length"),
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"})]),
        Reply(text="", finish_reason="content_filter"),
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
        (Fault.rate_limit(retry_after=7), 429, True, 7.0),
        (Fault.server_error(), 500, True, None),
        (Fault.server_error(503), 503, True, None),
        (Fault.unauthorized(), 401, False, None),
        (Fault.forbidden(), 403, False, None),
        (Fault.bad_request("bad temperature"), 400, False, None),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_status_faults(
    fake: FakeProviderServer,
    be: OpenAICompatBackend,
    fault: Fault,
    status: int,
    retryable: bool,
    retry_after: float | None,
    streaming: bool,
) -> None:
    fake.queue(fault)
    with pytest.raises(ProviderError) as info:
        if streaming:
            await events_of(be, model(fake), GenerateRequest(prompt="x"))
        else:
            await be.generate(model(fake), GenerateRequest(prompt="x"))
    err = info.value
    assert (err.status, err.retryable, err.retry_after) == (status, retryable, retry_after)
    assert err.provider == "openai" and err.model == "openai/gpt-6-luna"
    assert len(fake.requests) == 1  # no SDK retries


async def test_rate_limit_with_http_date(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    fake.queue(Fault("status", status=429, message="slow down", headers={"Retry-After": when}))
    with pytest.raises(ProviderError) as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert info.value.retry_after is not None and 55 <= info.value.retry_after <= 61


async def test_hang_times_out(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path, timeout_s=0.4)
    fake.queue(Fault.hang(10))
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert time.monotonic() - started < 3
    assert (info.value.status, info.value.retryable) == (None, True) and "timed out" in str(info.value)
    assert info.value.timeout


async def test_a_server_that_ignores_stream_true_is_read_whole(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    """One chat.completion object where a stream was asked for failed "stream ended early: no
    finish_reason"; an HTML page said the same."""
    weather = ToolCallSpec(name="get_weather", arguments={"city": "Paris"})
    fake.queue(
        Fault.ignore_stream(Reply(text="", tool_calls=[weather], prompt_tokens=9, completion_tokens=4))
    )
    result = await be.generate(model(fake), GenerateRequest(prompt="weather?", tools=[WEATHER]))
    assert [c.name for c in result.tool_calls] == ["get_weather"] and result.tool_calls[0].arguments == {
        "city": "Paris"
    }
    assert result.usage is not None and (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 4)
    fake.queue(Fault.ignore_stream(Reply(text="whole answer")))
    assert (await be.generate(model(fake), GenerateRequest(prompt="x"))).text == "whole answer"


async def test_keep_alive_comments_alone_time_out(fake: FakeProviderServer, tmp_path: Path) -> None:
    await keep_alive_alone_times_out(make(tmp_path, timeout_s=0.6), model(fake), fake)


async def test_malformed_json(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    fake.queue(Fault.malformed_json())
    with pytest.raises(ProviderError) as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert (info.value.status, info.value.retryable) == (None, True) and "malformed" in str(info.value)


@pytest.mark.parametrize(
    ("chunk", "says"),
    [
        (b'{"choices": "none"}', "choices is str, not list"),
        (b'{"choices": [{"delta": {"content": 7}}]}', "content is int, not str"),
        (b'{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]}', "function is str"),
        (b'{"choices": [{"delta": {"content": "a"}, "finish_reason": 7}]}', "finish_reason is int"),
    ],
)
async def test_chunks_of_the_wrong_shape_are_a_provider_error(
    fake: FakeProviderServer, be: OpenAICompatBackend, chunk: bytes, says: str
) -> None:
    """An upstream's JSON of the wrong shape was an AttributeError or TypeError (a 500 through
    `car serve`, no fallback) or, for finish_reason, a 400 blamed on the client."""
    fake.queue(Fault.raw_stream(chunk, b"[DONE]"))
    with pytest.raises(ProviderError, match=f"malformed response: MalformedResponse: .*{says}") as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert info.value.retryable


async def test_usage_of_the_wrong_shape_is_left_out(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    finish = b'{"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]'
    fake.queue(
        Fault.raw_stream(finish + b', "usage": {"prompt_tokens": "3", "completion_tokens": 2}}', b"[DONE]")
    )
    out = await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert out.text == "hi" and out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (0, 2)
    # Negative counts (usage is never negative now) count as 0: the answer that came is kept.
    fake.queue(
        Fault.raw_stream(finish + b', "usage": {"prompt_tokens": -3, "completion_tokens": 2}}', b"[DONE]")
    )
    out = await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert out.text == "hi" and out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.total_tokens) == (0, 2)


async def test_an_upstream_ignoring_max_tokens_is_cut(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    """A stream that went on past max_tokens (for ever, from a broken server) was read whole:
    memory grew without end. It is cut at ``answer_budget`` and ends as "length"."""
    chunk = b'{"choices": [{"delta": {"content": "' + b"x" * 64 + b'"}}]}'
    fake.queue(Fault.raw_stream(*[chunk] * 5000, b"[DONE]"))
    out = await be.generate(model(fake), GenerateRequest(prompt="x", params=GenerateParams(max_tokens=5)))
    assert out.finish_reason == "length" and answer_budget(5) - 64 < len(out.text) <= answer_budget(5)
    # One piece past the whole budget (a server that ignores "stream" and max_tokens) keeps its head.
    fake.queue(
        Fault.raw_stream(b'{"choices": [{"delta": {"content": "' + b"y" * 50_000 + b'"}}]}', b"[DONE]")
    )
    out = await be.generate(model(fake), GenerateRequest(prompt="x", params=GenerateParams(max_tokens=5)))
    assert (out.finish_reason, out.text) == ("length", "y" * answer_budget(5))


async def test_an_error_field_that_is_null_is_no_error(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    chunk = b'{"choices": [{"delta": {"content": "fine"}, "finish_reason": "stop"}], "error": null}'
    fake.queue(Fault.raw_stream(chunk, b"[DONE]"))
    assert (await be.generate(model(fake), GenerateRequest(prompt="x"))).text == "fine"


async def test_stream_cut_midway(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    fake.queue(Fault.cut_stream(after_chunks=2), Fault.cut_stream(after_chunks=2))
    received: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for event in be.stream(model(fake), GenerateRequest(prompt="hello there")):
            if isinstance(event, TextDelta):
                received.append(event.text)
    assert "".join(received) == "echo: he"
    assert (info.value.status, info.value.retryable) == (None, True)
    with pytest.raises(ProviderError):
        await be.generate(model(fake), GenerateRequest(prompt="hello there"))


async def test_rotation_to_second_key(fake: FakeProviderServer, tmp_path: Path) -> None:
    other = "sk-openai-test-key-0002"
    be = make(tmp_path, {"OPENAI_API_KEY": KEY, "OPENAI_API_KEYS": other})
    fake.set_key_behavior(KEY, Fault.rate_limit(retry_after=9))
    assert (await be.generate(model(fake), GenerateRequest(prompt="x"))).text == "echo: x"
    assert [r.api_key for r in fake.requests] == [KEY, other]
    stats = be.ctx.keys.stats()["OPENAI_API_KEY"]  # type: ignore[union-attr]
    assert [(s.source, s.rate_limits, s.state) for s in stats] == [
        ("env", 1, "cooling"),
        ("env:OPENAI_API_KEYS", 0, "ok"),
    ]


async def test_with_every_key_resting_a_request_is_answered_429_without_a_call(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    """Each request called the provider once per key, every one resting for its Retry-After;
    then one probe a request, each a 429 that counted toward the model's circuit. While every
    key rests, the 429 is answered here, with how long the soonest rests."""
    keys = [KEY, "sk-openai-test-key-0002", "sk-openai-test-key-0003"]
    be = make(tmp_path, {"OPENAI_API_KEY": KEY, "OPENAI_API_KEYS": ",".join(keys[1:])})
    for key in keys:
        fake.set_key_behavior(key, Fault.rate_limit(retry_after=30))
    for _ in range(3):
        with pytest.raises(ProviderError) as info:
            await be.generate(model(fake), GenerateRequest(prompt="x"))
        assert info.value.status == 429 and info.value.retry_after is not None
        assert 0 < info.value.retry_after <= 30
    assert len(fake.requests) == 3  # every key once while healthy, then none while all rest
    assert "is rate limited by" in str(info.value) and failure_weight(info.value) == 0


async def test_a_keyless_server_that_answered_429_rests_for_its_retry_after(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    """A server reached without a key (a vLLM of one's own) was probed by every request while it
    asked to be left alone: key pools only rest keys. It rests as a key would."""
    source = {"kind": "openai", "base_url": fake.openai_base_url, "model_name": "qwen", "needs_key": False}
    keyless = ModelSchema.model_validate(
        {
            "id": "gpubox/qwen",
            "name": "qwen",
            "provider": "gpubox",
            "capabilities": ["generate"],
            "source": source,
        }
    )
    fake.set_key_behavior(PLACEHOLDER_KEY, Fault.rate_limit(retry_after=1))
    for _ in range(3):
        with pytest.raises(ProviderError) as info:
            await be.generate(keyless, GenerateRequest(prompt="x"))
        assert info.value.status == 429 and info.value.retry_after is not None and info.value.retry_after <= 1
    assert len(fake.requests) == 1 and "it is rate limited by" in str(info.value)
    fake.set_key_behavior(PLACEHOLDER_KEY, None)
    await asyncio.sleep((info.value.retry_after or 0) + 0.05)
    assert (await be.generate(keyless, GenerateRequest(prompt="x"))).text == "echo: x"
    assert len(fake.requests) == 2 and fake.requests[-1].api_key == PLACEHOLDER_KEY


# --- sources -------------------------------------------------------------------------------------


async def test_ollama_and_vllm_sources(
    fake: FakeProviderServer, be: OpenAICompatBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-reach-local-servers")
    ollama = ModelSchema.model_validate(
        {
            "id": "ollama/llama3.2",
            "name": "llama3.2",
            "provider": "ollama",
            "capabilities": ["generate"],
            "source": {"kind": "ollama", "host": fake.base_url, "model_tag": "llama3.2:3b"},
        }
    )
    await be.generate(ollama, GenerateRequest(prompt="x"))
    recorded = fake.requests[-1]
    assert recorded.path == "/v1/chat/completions" and recorded.json["model"] == "llama3.2:3b"
    assert recorded.api_key == PLACEHOLDER_KEY
    vllm = ModelSchema.model_validate(
        {
            "id": "vllm/qwen",
            "name": "qwen",
            "provider": "vllm",
            "capabilities": ["generate"],
            "source": {
                "kind": "vllm",
                "endpoint": fake.base_url,
                "model_name": "Qwen/Qwen3-8B",
                "api_key_env": "OPENAI_API_KEY",
            },
        }
    )
    await be.generate(vllm, GenerateRequest(prompt="x"))
    assert fake.requests[-1].json["model"] == "Qwen/Qwen3-8B" and fake.requests[-1].api_key == KEY
    keyless = ModelSchema.model_validate(
        {
            "id": "lmstudio/phi",
            "name": "phi",
            "provider": "lmstudio",
            "capabilities": ["generate"],
            "source": {
                "kind": "openai",
                "base_url": fake.openai_base_url,
                "model_name": "phi-4",
                "needs_key": False,
            },
        }
    )
    await be.generate(keyless, GenerateRequest(prompt="x"))
    assert fake.requests[-1].api_key == PLACEHOLDER_KEY


async def test_embeddings(fake: FakeProviderServer, be: OpenAICompatBackend) -> None:
    schema = model(fake, "openai/text-embedding-3-small")
    result = await be.embed(schema, EmbedRequest(texts=["alpha", "beta"]))
    assert fake.requests[-1].json["model"] == "text-embedding-3-small"
    assert fake.requests[-1].json["encoding_format"] == "float"
    assert result.model_used == "openai/text-embedding-3-small" and result.dimensions == 8
    assert len(result.embeddings) == 2 and result.embeddings[0] != result.embeddings[1]
    assert all(abs(sum(v * v for v in vec) - 1) < 1e-6 for vec in result.embeddings)
    assert result.prompt_tokens and result.prompt_tokens > 0
    fake.set_key_behavior(KEY, Fault.rate_limit(retry_after=2))
    with pytest.raises(ProviderError) as info:
        await be.embed(schema, EmbedRequest(texts=["x"]))
    assert (info.value.status, info.value.retry_after) == (429, 2.0)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([[1.0, 0.0]], r"holds 1 vectors .* for 3 inputs"),  # one vector for three inputs
        ([], r"holds 0 vectors .* for 3 inputs"),
        ([[1.0, 0.0]] * 2 + [[0.5]], "different or no dimensions"),
        ([[1.0, 0.0], ["NaN", 1.0], [0.0, 1.0]], "not finite"),
    ],
)
async def test_an_embeddings_answer_that_does_not_match_the_inputs_is_a_provider_error(
    be: OpenAICompatBackend, data: list[list[Any]], says: str
) -> None:
    """An OpenAI-compatible host that answered one vector for three inputs (or none, or NaNs) was
    passed on as success: vectors misaligned with their texts, and NaN is no JSON."""
    vectors = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)]
    body = json.dumps({"object": "list", "data": vectors, "model": "m"}).replace('"NaN"', "NaN").encode()
    with answering(lambda path: (200, {"content-type": "application/json"}, body)) as host:
        schema = CATALOG["openai/text-embedding-3-small"]
        schema = schema.model_copy(
            update={"source": schema.source.model_copy(update={"base_url": host.url + "/v1"})}
        )
        with pytest.raises(ProviderError, match=says):
            await be.embed(schema, EmbedRequest(texts=["a", "b", "c"]))


async def test_a_stream_ended_by_done_without_a_finish_reason_is_whole(
    fake: FakeProviderServer, be: OpenAICompatBackend
) -> None:
    """Some proxies drop the finish_reason: a stream that said `[DONE]` was refused as "stream
    ended early" (a fallback, or exit 1). One that ends without either is still cut."""
    chunk = b'{"choices": [{"delta": {"content": "partial"}, "finish_reason": null}]}'
    fake.queue(Fault.raw_stream(chunk, b"[DONE]"))
    out = await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert (out.text, out.finish_reason) == ("partial", "stop")
    fake.queue(Fault.raw_stream(chunk))
    with pytest.raises(ProviderError, match="stream ended early"):
        await be.generate(model(fake), GenerateRequest(prompt="x"))
