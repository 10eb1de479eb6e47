"""The fake provider server's Anthropic and Gemini formats (``provider_formats``), driven by the
official anthropic and google-genai SDKs (retries off); the server's plumbing and the OpenAI format
are in ``test_provider_server.py``.

These tests pin down what each SDK raises for each scripted fault, so backend code can be written against it.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx2
import pytest
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from .optional import some
from .provider_server import FakeProviderServer, Fault, Reply, ToolCallSpec
from .sdk_clients import ANT_USER, Answer, ant, gem, oai

WEATHER_TOOL_ANTHROPIC: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


# ---------------------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------------------

FULL_REPLY = Reply(
    text="Checking the weather.",
    thinking="The user wants weather; call the tool.",
    tool_calls=[ToolCallSpec("get_weather", {"city": "Paris", "days": [1, 2]}, id="toolu_fixed")],
)


def test_anthropic_non_stream(fake: FakeProviderServer) -> None:
    fake.queue(FULL_REPLY)
    system: list[anthropic.types.TextBlockParam] = [
        {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}
    ]
    message = ant(fake).messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        system=system,
        messages=ANT_USER,
        tools=[WEATHER_TOOL_ANTHROPIC],
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert message.type == "message" and message.role == "assistant" and message.model == "claude-sonnet-4-6"
    thinking, text, tool = message.content
    assert isinstance(thinking, anthropic.types.ThinkingBlock)
    assert thinking.thinking == FULL_REPLY.thinking and thinking.signature
    assert isinstance(text, anthropic.types.TextBlock) and text.text == "Checking the weather."
    assert isinstance(tool, anthropic.types.ToolUseBlock)
    assert (tool.id, tool.name, tool.input) == (
        "toolu_fixed",
        "get_weather",
        {"city": "Paris", "days": [1, 2]},
    )
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0
    recorded = fake.requests[-1]
    assert recorded.path == "/v1/messages" and recorded.json["system"][0]["cache_control"] == {
        "type": "ephemeral"
    }
    assert recorded.headers["anthropic-version"]


def test_anthropic_echo_usage_and_finish_reason_translation(fake: FakeProviderServer) -> None:
    usage_reply = Reply(prompt_tokens=5, completion_tokens=9, cached_tokens=4, cache_creation_tokens=2)
    usage_reply.finish_reason = "length"  # OpenAI vocabulary, translated to Anthropic's "max_tokens"
    fake.queue(usage_reply)
    message = ant(fake).messages.create(
        model="m", max_tokens=10, messages=[{"role": "user", "content": [{"type": "text", "text": "blocks"}]}]
    )
    assert isinstance(message.content[0], anthropic.types.TextBlock)
    assert message.content[0].text == "echo: blocks" and message.stop_reason == "max_tokens"
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (5, 9)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (4, 2)


def test_anthropic_stream_helper(fake: FakeProviderServer) -> None:
    fake.queue(FULL_REPLY, FULL_REPLY)
    client = ant(fake)
    whole = client.messages.create(model="m", max_tokens=100, messages=ANT_USER)
    with client.messages.stream(model="m", max_tokens=100, messages=ANT_USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Checking the weather."
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert isinstance(final.content[0], anthropic.types.ThinkingBlock)
    assert isinstance(whole.content[0], anthropic.types.ThinkingBlock)
    assert isinstance(final.content[2], anthropic.types.ToolUseBlock)
    assert final.content[0].thinking == FULL_REPLY.thinking
    assert final.content[0].signature == whole.content[0].signature
    assert final.content[2].input == {"city": "Paris", "days": [1, 2]}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == whole.usage.output_tokens


def test_anthropic_raw_stream_events(fake: FakeProviderServer) -> None:
    fake.queue(FULL_REPLY)
    events = list(ant(fake).messages.create(model="m", max_tokens=100, messages=ANT_USER, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == FULL_REPLY.thinking
    assert [d.type for d in deltas].count("signature_delta") == 1
    partial = "".join(d.partial_json for d in deltas if d.type == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris", "days": [1, 2]}
    assert all(len(d.text) <= 4 for d in deltas if d.type == "text_delta")


@pytest.mark.parametrize(
    ("fault", "error_cls", "status", "error_type"),
    [
        (Fault.rate_limit(retry_after=2), anthropic.RateLimitError, 429, "rate_limit_error"),
        (Fault.server_error(), anthropic.InternalServerError, 500, "api_error"),
        (Fault.server_error(529), anthropic.OverloadedError, 529, "overloaded_error"),
        (Fault.unauthorized(), anthropic.AuthenticationError, 401, "authentication_error"),
        (Fault.forbidden(), anthropic.PermissionDeniedError, 403, "permission_error"),
        (Fault.bad_request(), anthropic.BadRequestError, 400, "invalid_request_error"),
    ],
)
def test_anthropic_status_errors(
    fake: FakeProviderServer,
    fault: Fault,
    error_cls: type[anthropic.APIStatusError],
    status: int,
    error_type: str,
) -> None:
    fake.queue(fault)
    with pytest.raises(error_cls) as info:
        ant(fake).messages.create(model="m", max_tokens=5, messages=ANT_USER)
    assert info.value.status_code == status and info.value.type == error_type
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "error"
    if status == 429:
        assert info.value.response.headers["retry-after"] == "2"


def test_anthropic_stream_status_error(fake: FakeProviderServer) -> None:
    fake.queue(Fault.rate_limit())
    with (
        pytest.raises(anthropic.RateLimitError),
        ant(fake).messages.stream(model="m", max_tokens=5, messages=ANT_USER),
    ):
        pass


def test_anthropic_hang_malformed_and_cut(fake: FakeProviderServer) -> None:
    """hang -> anthropic.APITimeoutError; malformed -> json.JSONDecodeError (stream and non-stream);
    cut stream -> ``httpx2.RemoteProtocolError``, raw before anthropic 2.17, since then wrapped in
    anthropic.APIConnectionError (the backend's ``translate`` takes either); cut non-stream ->
    anthropic.APIConnectionError."""
    client = ant(fake, timeout=0.5)
    fake.queue(Fault.hang(10))
    with pytest.raises(anthropic.APITimeoutError):
        client.messages.create(model="m", max_tokens=5, messages=ANT_USER)
    fake.queue(Fault.malformed_json(), Fault.malformed_json())
    with pytest.raises(json.JSONDecodeError):
        client.messages.create(model="m", max_tokens=5, messages=ANT_USER)
    with pytest.raises(json.JSONDecodeError):
        list(client.messages.create(model="m", max_tokens=5, messages=ANT_USER, stream=True))
    fake.queue(Fault.cut_stream(2), Fault.cut_stream())
    deltas: list[str] = []
    with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as cut:
        for event in client.messages.create(model="m", max_tokens=5, messages=ANT_USER, stream=True):
            if event.type == "content_block_delta":
                assert isinstance(event.delta, anthropic.types.TextDelta)
                deltas.append(event.delta.text)
    assert deltas == ["echo", ": he"]
    raw = cut.value.__cause__ if isinstance(cut.value, anthropic.APIConnectionError) else cut.value
    assert isinstance(raw, httpx2.RemoteProtocolError)
    with pytest.raises(anthropic.APIConnectionError):
        client.messages.create(model="m", max_tokens=5, messages=ANT_USER)


def test_anthropic_models_and_count_tokens(fake: FakeProviderServer) -> None:
    client = ant(fake)
    assert "claude-sonnet-4-6" in [m.id for m in client.models.list()]
    assert client.messages.count_tokens(model="m", messages=ANT_USER).input_tokens > 0


async def test_anthropic_async_stream(fake: FakeProviderServer) -> None:
    client = anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key="k", max_retries=0)
    fake.queue(FULL_REPLY)
    async with client.messages.stream(model="m", max_tokens=100, messages=ANT_USER) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    await client.close()


# ---------------------------------------------------------------------------------------------------------
# Gemini
# ---------------------------------------------------------------------------------------------------------

GEMINI_TOOLS: genai_types.ToolListUnion = [
    genai_types.Tool(
        function_declarations=[
            genai_types.FunctionDeclaration(
                name="get_weather",
                description="Weather for a city",
                parameters_json_schema=WEATHER_TOOL_ANTHROPIC["input_schema"],
            )
        ]
    )
]


def test_gemini_generate_content(fake: FakeProviderServer) -> None:
    fake.queue(FULL_REPLY)
    client = gem(fake)
    config = genai_types.GenerateContentConfig(
        tools=GEMINI_TOOLS,
        thinking_config=genai_types.ThinkingConfig(include_thoughts=True),
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True),
    )
    response = client.models.generate_content(model="gemini-2.5-flash", contents="weather?", config=config)
    recorded = fake.requests[-1]
    # google-genai 3.x defaults to api_version "v1" (not v1beta) and sends the key in x-goog-api-key
    assert recorded.path == "/v1/models/gemini-2.5-flash:generateContent"
    assert recorded.json["contents"] == [{"parts": [{"text": "weather?"}], "role": "user"}]
    candidate = some(response.candidates)[0]
    parts = some(some(candidate.content).parts)
    assert parts[0].thought is True and parts[0].text == FULL_REPLY.thinking
    assert parts[1].text == "Checking the weather." and not parts[1].thought
    assert parts[1].thought_signature  # bytes, decoded from base64 by the SDK
    function_calls = some(response.function_calls)
    assert function_calls[0].name == "get_weather"
    assert function_calls[0].args == {"city": "Paris", "days": [1, 2]}
    assert candidate.finish_reason == genai_types.FinishReason.STOP
    usage = some(response.usage_metadata)
    assert usage.thoughts_token_count and usage.prompt_token_count and usage.candidates_token_count
    assert usage.total_token_count == (
        usage.prompt_token_count + usage.candidates_token_count + usage.thoughts_token_count
    )
    assert response.model_version == "gemini-2.5-flash"


def test_gemini_echo_and_json_mode(fake: FakeProviderServer) -> None:
    client = gem(fake)
    contents = [genai_types.Content(role="user", parts=[genai_types.Part(text="ping")])]
    assert client.models.generate_content(model="gemini-2.5-flash", contents=contents).text == "echo: ping"
    config = genai_types.GenerateContentConfig(response_mime_type="application/json", response_schema=Answer)
    response = client.models.generate_content(model="gemini-2.5-flash", contents="pong", config=config)
    assert response.parsed == Answer(answer="pong", confidence=0.0, tags=[])


def test_gemini_stream(fake: FakeProviderServer) -> None:
    fake.queue(Reply(text="streamed gemini text", thinking="thoughts here"), FULL_REPLY)
    client = gem(fake)
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="x"))
    assert fake.requests[-1].path == "/v1/models/gemini-2.5-flash:streamGenerateContent"
    assert fake.requests[-1].query == {"alt": "sse"}
    parts = [p for c in chunks for p in (some(some(c.candidates)[0].content).parts or [])]
    assert "".join(some(p.text) for p in parts if p.thought) == "thoughts here"
    assert "".join(p.text or "" for p in parts if not p.thought) == "streamed gemini text"
    assert some(chunks[-1].candidates)[0].finish_reason == genai_types.FinishReason.STOP
    assert some(chunks[-1].usage_metadata).thoughts_token_count
    calls = [
        fc
        for c in client.models.generate_content_stream(model="m", contents="x")
        for fc in c.function_calls or []
    ]
    assert [(c.name, c.args) for c in calls] == [("get_weather", {"city": "Paris", "days": [1, 2]})]


@pytest.mark.parametrize(
    ("fault", "error_cls", "expected"),
    [
        (Fault.rate_limit(), genai_errors.ClientError, (429, "RESOURCE_EXHAUSTED")),
        (Fault.server_error(), genai_errors.ServerError, (500, "INTERNAL")),
        (Fault.server_error(503), genai_errors.ServerError, (503, "UNAVAILABLE")),
        (Fault.unauthorized(), genai_errors.ClientError, (401, "UNAUTHENTICATED")),
        (Fault.forbidden(), genai_errors.ClientError, (403, "PERMISSION_DENIED")),
        (Fault.bad_request("nope"), genai_errors.ClientError, (400, "INVALID_ARGUMENT")),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_gemini_status_errors(
    fake: FakeProviderServer,
    fault: Fault,
    error_cls: type[genai_errors.APIError],
    expected: tuple[int, str],
    stream: bool,
) -> None:
    fake.queue(fault)
    client = gem(fake)
    with pytest.raises(error_cls) as info:
        if stream:
            list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="x"))
        else:
            client.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert (info.value.code, info.value.status) == expected
    assert info.value.message
    assert len(fake.requests) == 1  # no retries


def test_gemini_hang_malformed_and_cut(fake: FakeProviderServer) -> None:
    """hang -> raw ``httpx2.ReadTimeout`` (google-genai does not wrap transport errors); malformed non-stream
    -> ``json.JSONDecodeError``; malformed stream -> ``google.genai.errors.UnknownApiResponseError`` (a
    ValueError); cut stream -> raw ``httpx2.RemoteProtocolError``."""
    client = gem(fake, timeout_ms=500)
    fake.queue(Fault.hang(10))
    started = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        client.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert time.monotonic() - started < 3
    fake.queue(Fault.malformed_json(), Fault.malformed_json())
    with pytest.raises(json.JSONDecodeError):
        client.models.generate_content(model="gemini-2.5-flash", contents="x")
    with pytest.raises(genai_errors.UnknownApiResponseError):
        list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="x"))
    fake.queue(Fault.cut_stream(2))
    texts: list[str] = []
    with pytest.raises(httpx2.RemoteProtocolError):
        for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hello"):
            texts.append(chunk.text or "")
    assert texts == ["echo", ": he"]


def test_gemini_embeddings_and_models(fake: FakeProviderServer) -> None:
    client = gem(fake)
    texts: list[genai_types.ContentUnion] = ["alpha", "beta"]
    result = client.models.embed_content(model="text-embedding-004", contents=texts)
    assert fake.requests[-1].path == "/v1/models/text-embedding-004:batchEmbedContents"
    vectors = [some(e.values) for e in result.embeddings or []]
    assert len(vectors) == 2 and len(vectors[0]) == 8 and vectors[0] != vectors[1]
    floats = oai(fake).embeddings.create(model="e", input="alpha", encoding_format="float").data[0].embedding
    assert vectors[0] == pytest.approx(floats)  # same deterministic vector on every protocol
    assert "models/gemini-2.5-flash" in [m.name for m in client.models.list()]
    assert client.models.count_tokens(model="gemini-2.5-flash", contents="abc").total_tokens


async def test_gemini_async(fake: FakeProviderServer) -> None:
    client = gem(fake)
    fake.queue(Reply(text="async gemini"), Reply(text="async stream"))
    response = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert response.text == "async gemini"
    text = ""
    async for chunk in await client.aio.models.generate_content_stream(
        model="gemini-2.5-flash", contents="x"
    ):
        text += chunk.text or ""
    assert text == "async stream"
