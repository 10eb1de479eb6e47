"""The fake provider server, driven by the official OpenAI, Anthropic and google-genai SDKs (retries off).

These tests pin down what each SDK raises for each scripted fault, so backend code can be written against it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google.genai import errors as genai_errors
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageFunctionToolCall

from .provider_server import DEFAULT_SERVED_MODELS, FakeProviderServer, Fault, Reply, ToolCallSpec
from .sdk_clients import ANT_USER, USER, Answer, ant, gem, oai

WEATHER_TOOL_OPENAI: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# ---------------------------------------------------------------------------------------------------------
# Server basics
# ---------------------------------------------------------------------------------------------------------


def test_health_and_unknown_paths(fake: FakeProviderServer) -> None:
    assert httpx.get(fake.base_url + "/health").status_code == 200
    r = httpx.post(fake.base_url + "/v1/nope", json={}, headers={"authorization": "Bearer sk-x"})
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(fake.base_url + "/v1/nope", json={}, headers={"x-api-key": "k", "anthropic-version": "x"})
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(
        fake.base_url + "/v1beta/tunedModels/x:frobnicate", json={}, headers={"x-goog-api-key": "g"}
    )
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"


def test_recorded_requests_and_api_key_sources(fake: FakeProviderServer) -> None:
    httpx.post(fake.base_url + "/v1/models/gemini-2.5-flash:generateContent?key=q-key", json={"contents": []})
    rec = fake.requests[-1]
    assert rec.api_key == "q-key" and rec.protocol == "gemini" and rec.query == {"key": "q-key"}
    oai(fake, key="sk-1").chat.completions.create(model="gpt-4o-mini", messages=USER)
    ant(fake, key="sk-ant-2").messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=ANT_USER)
    client = gem(fake, key="g-3")
    client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert [(r.protocol, r.api_key) for r in fake.requests[1:]] == [
        ("openai", "sk-1"),
        ("anthropic", "sk-ant-2"),
        ("gemini", "g-3"),
    ]
    assert fake.requests[1].headers["authorization"] == "Bearer sk-1"
    # anthropic>=2.x sends the API key as `Authorization: Bearer`, not `x-api-key`
    assert fake.requests[2].headers["authorization"] == "Bearer sk-ant-2"
    assert "x-api-key" not in fake.requests[2].headers
    assert fake.requests[3].headers["x-goog-api-key"] == "g-3"
    assert fake.requests[1].json["messages"] == USER


def test_queue_is_fifo_across_protocols(fake: FakeProviderServer) -> None:
    fake.queue(Reply(text="first"), Reply(text="second"), Fault.server_error(), Reply(text="fourth"))
    assert oai(fake).chat.completions.create(model="m", messages=USER).choices[0].message.content == "first"
    message = ant(fake).messages.create(model="m", max_tokens=5, messages=ANT_USER)
    assert isinstance(message.content[0], anthropic.types.TextBlock)
    assert message.content[0].text == "second"
    client = gem(fake)
    with pytest.raises(genai_errors.ServerError):
        client.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert client.models.generate_content(model="gemini-2.5-flash", contents="x").text == "fourth"
    assert fake.pending == 0
    # an empty queue echoes
    assert oai(fake).chat.completions.create(model="m", messages=USER).choices[0].message.content == (
        "echo: hello there"
    )


def test_key_behavior(fake: FakeProviderServer) -> None:
    for key in ("bad", "bad-ant", "bad-g"):
        fake.set_key_behavior(key, Fault.unauthorized())
    fake.queue(Reply(text="queued"))
    with pytest.raises(openai.AuthenticationError):
        oai(fake, key="bad").chat.completions.create(model="m", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        oai(fake, key="bad").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        ant(fake, key="bad-ant").messages.create(model="m", max_tokens=5, messages=ANT_USER)
    bad_gemini = gem(fake, key="bad-g")  # hold the reference (see gem())
    with pytest.raises(genai_errors.ClientError) as info:
        bad_gemini.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert info.value.code == 401 and info.value.status == "UNAUTHENTICATED"
    # the faulted keys did not consume the queue; a good key gets the queued reply
    assert fake.pending == 1
    good = oai(fake, key="good").chat.completions.create(model="m", messages=USER)
    assert good.choices[0].message.content == "queued"
    fake.set_key_behavior("bad", None)
    oai(fake, key="bad").chat.completions.create(model="m", messages=USER)


def test_stop_interrupts_a_hang_quickly() -> None:
    fake = FakeProviderServer().start()
    fake.queue(Fault.hang(30))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            oai(fake, timeout=20).chat.completions.create(model="m", messages=USER)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not fake.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 2
    assert errors and isinstance(errors[0], openai.APIConnectionError)


# ---------------------------------------------------------------------------------------------------------
# OpenAI
# ---------------------------------------------------------------------------------------------------------


def test_openai_chat_non_stream(fake: FakeProviderServer) -> None:
    fake.queue(
        Reply(text="Hi!", thinking="considering", prompt_tokens=11, completion_tokens=7, cached_tokens=3)
    )
    completion = oai(fake).chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert completion.object == "chat.completion" and completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.message.content == "Hi!" and choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert (choice.message.model_extra or {})["reasoning_content"] == "considering"
    assert completion.usage is not None
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (
        11,
        7,
        18,
    )
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 3


def test_openai_stream_reassembles_same_text(fake: FakeProviderServer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    fake.queue(Reply(text=text), Reply(text=text, thinking="mull it over", chunk_chars=5))
    client = oai(fake)
    whole = client.chat.completions.create(model="m", messages=USER).choices[0].message.content
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    reasoning = [
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    ]
    assert "".join(pieces) == whole == text
    assert max(len(p) for p in pieces) == 5
    assert "".join(reasoning) == "mull it over"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_tool_call_non_stream(fake: FakeProviderServer) -> None:
    fake.queue(
        Reply(
            tool_calls=[
                ToolCallSpec("get_weather", {"city": "Paris"}, id="call_fixed"),
                ToolCallSpec("get_weather", '{"city": "Ro'),  # invalid JSON arrives verbatim
            ]
        )
    )
    completion = oai(fake).chat.completions.create(model="m", messages=USER, tools=[WEATHER_TOOL_OPENAI])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls[0].id == "call_fixed" and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert isinstance(calls[1], ChatCompletionMessageFunctionToolCall)
    assert calls[1].id.startswith("call_") and calls[1].function.arguments == '{"city": "Ro'
    assert fake.requests[-1].json["tools"] == [WEATHER_TOOL_OPENAI]


def test_openai_tool_call_stream(fake: FakeProviderServer) -> None:
    args = {"city": "Paris", "unit": "celsius"}
    fake.queue(
        Reply(text="Let me check.", tool_calls=[ToolCallSpec("get_weather", args), ToolCallSpec("noop")])
    )
    stream = oai(fake).chat.completions.create(
        model="m", messages=USER, tools=[WEATHER_TOOL_OPENAI], stream=True
    )
    text, finish = "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert slot["id"] is None, "id must come once, in the first delta of a call"
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert text == "Let me check." and finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == args
    assert calls[1]["name"] == "noop" and json.loads(calls[1]["arguments"]) == {}
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_openai_stream_helper_accumulates(fake: FakeProviderServer) -> None:
    fake.queue(Reply(text="partial ", tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"})]))
    with oai(fake).chat.completions.stream(model="m", messages=USER, tools=[WEATHER_TOOL_OPENAI]) as stream:
        for _event in stream:
            pass
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "partial "
    assert message.tool_calls and json.loads(message.tool_calls[0].function.arguments) == {"city": "Oslo"}


def test_openai_json_modes(fake: FakeProviderServer) -> None:
    client = oai(fake)
    completion = client.chat.completions.create(
        model="m", messages=USER, response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content or "") == {"echo": "hello there"}
    parsed = client.chat.completions.parse(model="m", messages=USER, response_format=Answer)
    assert parsed.choices[0].message.parsed == Answer(answer="hello there", confidence=0.0, tags=[])


@pytest.mark.parametrize(
    ("fault", "error_cls", "status"),
    [
        (Fault.rate_limit(retry_after=7), openai.RateLimitError, 429),
        (Fault.server_error(), openai.InternalServerError, 500),
        (Fault.server_error(503), openai.InternalServerError, 503),
        (Fault.unauthorized(), openai.AuthenticationError, 401),
        (Fault.forbidden(), openai.PermissionDeniedError, 403),
        (Fault.bad_request("bad temperature"), openai.BadRequestError, 400),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_openai_status_errors(
    fake: FakeProviderServer,
    fault: Fault,
    error_cls: type[openai.APIStatusError],
    status: int,
    stream: bool,
) -> None:
    fake.queue(fault)
    with pytest.raises(error_cls) as info:
        oai(fake).chat.completions.create(model="m", messages=USER, stream=stream)
    err = info.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    assert err.message.startswith(f"Error code: {status} - ")
    if status == 429:
        assert err.response.headers["retry-after"] == "7"
        assert err.code == "rate_limit_exceeded"
    if status == 400:
        assert "bad temperature" in err.message


def test_openai_hang_times_out(fake: FakeProviderServer) -> None:
    fake.queue(Fault.hang(10))
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai(fake, timeout=0.5).chat.completions.create(model="m", messages=USER)
    assert time.monotonic() - started < 3


def test_openai_malformed_json(fake: FakeProviderServer) -> None:
    """Non-stream: the SDK calls ``response.json()`` unguarded -> ``json.JSONDecodeError`` (a ValueError,
    *not* an openai.APIError). Stream: same, raised while iterating."""
    fake.queue(Fault.malformed_json(), Fault.malformed_json())
    client = oai(fake)
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model="m", messages=USER)
    stream = client.chat.completions.create(model="m", messages=USER, stream=True)
    with pytest.raises(json.JSONDecodeError):
        list(stream)


def test_openai_cut_stream(fake: FakeProviderServer) -> None:
    """A dropped stream surfaces while iterating as ``openai.APIConnectionError`` (it wraps httpx errors)."""
    fake.queue(Fault.cut_stream(after_chunks=2), Fault.cut_stream())
    client = oai(fake)
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="m", messages=USER, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "echo: he"  # role chunk ("") + exactly 2 content chunks of 4 chars
    # non-stream: headers promise a body that never fully arrives
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=USER)


def test_openai_cut_stream_before_any_chunk_and_after_the_last(fake: FakeProviderServer) -> None:
    fake.queue(Fault.cut_stream(0), Fault.cut_stream(1000), Fault.cut_stream(3, reply=Reply(text="a" * 40)))
    client = oai(fake)
    for _ in range(2):
        with pytest.raises(openai.APIConnectionError):
            list(client.chat.completions.create(model="m", messages=USER, stream=True))
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="m", messages=USER, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "a" * 12


def test_openai_legacy_completions(fake: FakeProviderServer) -> None:
    client = oai(fake)
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    assert completion.object == "text_completion" and completion.choices[0].text == "echo: say hi"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    fake.queue(Reply(text="streamed legacy"))
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="x", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "streamed legacy"
    assert chunks[-1].usage is not None


def test_openai_embeddings(fake: FakeProviderServer) -> None:
    client = oai(fake)
    default = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert fake.requests[-1].json["encoding_format"] == "base64"  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["alpha"], encoding_format="float"
    )
    assert len(default.data) == 2 and [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 8
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert default.data[0].embedding != default.data[1].embedding
    assert default.usage.prompt_tokens > 0
    wide = client.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=32)
    assert len(wide.data[0].embedding) == 32


def test_openai_models_list(fake: FakeProviderServer) -> None:
    fake.served_models = ["model-a", "model-b"]
    try:
        assert [m.id for m in oai(fake).models.list()] == ["model-a", "model-b"]
        assert oai(fake).models.retrieve("model-a").owned_by == "fake-provider"
        with pytest.raises(openai.NotFoundError):
            oai(fake).models.retrieve("nope")
    finally:
        fake.served_models = list(DEFAULT_SERVED_MODELS)


async def test_openai_async_stream(fake: FakeProviderServer) -> None:
    client = openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="sk-test", max_retries=0)
    fake.queue(Reply(text="async text", delay_s=0.05, delay_between_chunks_s=0.01))
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "async text"
    await client.close()


# ---------------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------------


async def test_concurrent_requests(fake: FakeProviderServer) -> None:
    client = openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="sk-test", max_retries=0)

    async def one(i: int) -> Any:
        r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"n{i}"}])
        return r.choices[0].message.content

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert sorted(results) == sorted(f"echo: n{i}" for i in range(20))
    assert len(fake.requests) == 20
    await client.close()
