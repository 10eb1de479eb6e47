"""The Gemini backend, driving the real ``google-genai`` SDK against the loopback fake."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from car_inference.backends.gemini import GeminiBackend
from car_inference.catalog import load_builtin
from car_inference.errors import InvalidInput, ProviderError, ProviderRejectedInput, UnsupportedMode
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
from car_inference.routing.breaker import failure_weight
from car_inference.schema import ModelSchema
from car_inference.stream import Done, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart
from fakes import FakeProviderServer, Fault, Reply, ToolCallSpec
from fakes.remote_kit import PNG, WEATHER, remote_backend

CATALOG = {m.id: m for m in load_builtin().models}
KEY = "gemini-test-key-000001"


def make(tmp_path: Path, env: dict[str, str] | None = None, **remote: Any) -> GeminiBackend:
    return remote_backend(GeminiBackend, tmp_path, env or {"GEMINI_API_KEY": KEY}, **remote)


@pytest.fixture
def be(tmp_path: Path) -> GeminiBackend:
    return make(tmp_path)


def model(
    fake: FakeProviderServer, model_id: str = "google/gemini-3.8-flash", suffix: str = "", **update: Any
) -> ModelSchema:
    schema = CATALOG[model_id]
    source = schema.source.model_copy(update={"base_url": fake.gemini_base_url + suffix})
    return schema.model_copy(update={"source": source, **update})


def budget_model(fake: FakeProviderServer) -> ModelSchema:
    """A Gemini 2.5-style model: a thinking budget, no thinking levels, no JSON mode."""
    params = ["temperature", "max_tokens", "tools", "tool_choice", "extended_thinking"]
    return model(fake, id="google/gemini-2.5-flash", supported_params=params)


def sent(fake: FakeProviderServer) -> dict[str, Any]:
    return fake.requests[-1].json


def config_of(fake: FakeProviderServer) -> dict[str, Any]:
    return sent(fake).get("generationConfig", {})


async def events_of(be: GeminiBackend, schema: ModelSchema, request: GenerateRequest) -> list[Any]:
    return [e async for e in be.stream(schema, request)]


# --- requests ------------------------------------------------------------------------------------


async def test_text_with_system_and_usage(fake: FakeProviderServer, be: GeminiBackend) -> None:
    fake.queue(Reply(text="Hi!", thinking="hmm", prompt_tokens=10, completion_tokens=8, cached_tokens=4))
    out = await be.generate(model(fake), GenerateRequest(prompt="hello", context="be brief"))
    recorded = fake.requests[-1]
    assert recorded.path == "/v1/models/gemini-3.8-flash:streamGenerateContent" and recorded.api_key == KEY
    assert recorded.json["contents"] == [{"parts": [{"text": "hello"}], "role": "user"}]
    assert recorded.json["systemInstruction"]["parts"] == [{"text": "be brief"}]
    assert out.text == "Hi!" and out.thinking == "hmm"
    usage = out.usage
    assert usage is not None
    # thoughts bill as output: completion = candidates + thoughts
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 8, 18)
    assert usage.cached_prompt_tokens == 4 and usage.context_window == 1048576
    assert out.time_to_first_token_ms is not None


async def test_api_version_from_base_url(fake: FakeProviderServer, be: GeminiBackend) -> None:
    await be.generate(model(fake, suffix="/v1beta"), GenerateRequest(prompt="x"))
    assert fake.requests[-1].path == "/v1beta/models/gemini-3.8-flash:streamGenerateContent"


async def test_multi_turn_with_function_results(fake: FakeProviderServer, be: GeminiBackend) -> None:
    history = [
        Message(role="user", content="Paris and Rome?"),
        Message(
            role="assistant",
            content="Checking.",
            tool_calls=[
                ToolCall(id="fc_1", name="get_weather", arguments={"city": "Paris"}),
                ToolCall(name="get_time", arguments={"city": "Rome"}),
            ],
        ),
        Message(role="tool", tool_call_id="fc_1", content='{"sky": "sunny"}'),
        Message(role="tool", content="noon"),
    ]
    await be.generate(model(fake), GenerateRequest(messages=history, prompt="so?", tools=[WEATHER]))
    contents = sent(fake)["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    calls = contents[1]["parts"]
    assert calls[0] == {"text": "Checking."}
    assert calls[1]["functionCall"] == {"id": "fc_1", "args": {"city": "Paris"}, "name": "get_weather"}
    assert calls[1]["thoughtSignature"] == "skip_thought_signature_validator"
    assert calls[2]["functionCall"]["name"] == "get_time" and calls[2]["functionCall"]["id"] == "call_1"
    results = contents[2]["parts"]
    assert results[0]["functionResponse"] == {
        "id": "fc_1",
        "name": "get_weather",
        "response": {"sky": "sunny"},
    }
    assert results[1]["functionResponse"] == {
        "id": "call_1",
        "name": "get_time",
        "response": {"result": "noon"},
    }
    assert results[2] == {"text": "so?"}


async def test_media_inline_and_by_url(fake: FakeProviderServer, be: GeminiBackend) -> None:
    blocks: list[ContentBlock] = [
        TextBlock(text="what is this?"),
        ImageBlock(data=PNG, media_type="image/png"),
        ImageBlock(url=f"data:image/jpeg;base64,{PNG}"),
        ImageBlock(url="https://example.com/cat.jpg"),
        AudioBlock(data="UklGRg==", media_type="audio/wav"),
        VideoBlock(url="https://example.com/clip.mp4"),
    ]
    await be.generate(model(fake), GenerateRequest(messages=[Message(role="user", content=blocks)]))
    parts = sent(fake)["contents"][0]["parts"]
    assert parts[0] == {"text": "what is this?"}
    inline = [p.get("inlineData") or p.get("inline_data") for p in parts[1:3]]
    assert [(i.get("mimeType") or i.get("mime_type"), i["data"]) for i in inline] == [
        ("image/png", PNG),
        ("image/jpeg", PNG),
    ]
    files = [p.get("fileData") or p.get("file_data") for p in (parts[3], parts[5])]
    assert [f.get("file_uri") or f.get("fileUri") for f in files] == [
        "https://example.com/cat.jpg",
        "https://example.com/clip.mp4",
    ]
    audio = parts[4].get("inlineData") or parts[4].get("inline_data")
    assert audio["data"] == "UklGRg=="
    with pytest.raises(UnsupportedMode):  # no media type given, none to guess from the URL
        await be.generate(
            model(fake), GenerateRequest(prompt="x", images=[ImageBlock(url="https://example.com/img")])
        )
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("choice", "calling"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        ("get_weather", {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
    ],
)
async def test_tools_and_tool_choice(
    fake: FakeProviderServer, be: GeminiBackend, choice: str, calling: dict[str, Any]
) -> None:
    request = GenerateRequest(
        prompt="weather?",
        tools=[WEATHER],
        params=GenerateParams(tool_choice=choice, parallel_tool_calls=False),
    )
    await be.generate(model(fake), request)
    body = sent(fake)
    declaration = body["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "get_weather" and declaration["description"] == "Weather for a city"
    schema = declaration.get("parameters_json_schema") or declaration.get("parametersJsonSchema")
    assert schema == WEATHER["function"]["parameters"]
    assert body["toolConfig"]["functionCallingConfig"] == calling
    assert "parallel" not in json.dumps(body).lower()  # Gemini has no such switch


async def test_json_modes(fake: FakeProviderServer, be: GeminiBackend) -> None:
    out = await be.generate(
        model(fake), GenerateRequest(prompt="data", response_format=ResponseFormat(type="json_object"))
    )
    assert config_of(fake)["responseMimeType"] == "application/json" and json.loads(out.text) == {
        "echo": "data"
    }
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "a", "schema": schema})
    out = await be.generate(model(fake), GenerateRequest(prompt="q", response_format=fmt))
    assert config_of(fake)["responseJsonSchema"] == schema and json.loads(out.text) == {"answer": "q"}
    await be.generate(budget_model(fake), GenerateRequest(prompt="q", response_format=fmt))
    assert "responseMimeType" not in config_of(fake)
    assert '"answer"' in sent(fake)["systemInstruction"]["parts"][0]["text"]


async def test_params_sent_and_omitted(fake: FakeProviderServer, be: GeminiBackend) -> None:
    params = GenerateParams(temperature=0.3, top_p=0.9, top_k=20, max_tokens=64, stop=["END"], seed=7)
    await be.generate(model(fake), GenerateRequest(prompt="x", params=params))
    config = config_of(fake)
    assert (config["temperature"], config["topP"], config["topK"], config["maxOutputTokens"]) == (
        0.3,
        0.9,
        20,
        64,
    )
    assert config["stopSequences"] == ["END"] and config["seed"] == 7
    await be.generate(budget_model(fake), GenerateRequest(prompt="x", params=params))
    assert set(config_of(fake)) == {"temperature", "maxOutputTokens"}


def _thinking(fake: FakeProviderServer) -> dict[str, Any] | None:
    raw = config_of(fake).get("thinkingConfig")
    return None if raw is None else {k.replace("_", "").lower(): v for k, v in raw.items()}


@pytest.mark.parametrize(
    ("params", "levels", "budget"),
    [
        ({}, None, None),
        ({"thinking": "on"}, {"includethoughts": True}, {"includethoughts": True}),
        ({"reasoning_effort": "high"}, {"includethoughts": True, "thinkinglevel": "HIGH"}, None),
        ({"reasoning_effort": "minimal"}, {"includethoughts": True, "thinkinglevel": "LOW"}, None),
        (
            {"budget_tokens": 3000},
            {"includethoughts": True, "thinkinglevel": "MEDIUM"},
            {"includethoughts": True, "thinkingbudget": 3000},
        ),
        ({"thinking": "off"}, {"thinkinglevel": "LOW"}, {"thinkingbudget": 0}),
    ],
)
async def test_thinking_mapping(
    fake: FakeProviderServer, be: GeminiBackend, params: dict[str, Any], levels: Any, budget: Any
) -> None:
    await be.generate(model(fake), GenerateRequest(prompt="x", params=GenerateParams.model_validate(params)))
    assert _thinking(fake) == levels
    if params.get("reasoning_effort"):
        return
    await be.generate(
        budget_model(fake), GenerateRequest(prompt="x", params=GenerateParams.model_validate(params))
    )
    assert _thinking(fake) == budget


async def test_stream_thoughts_and_function_calls(fake: FakeProviderServer, be: GeminiBackend) -> None:
    args = {"city": "Paris", "days": [1, 2]}
    fake.queue(
        Reply(
            text="Checking.",
            thinking="call it",
            chunk_chars=3,
            tool_calls=[ToolCallSpec("get_weather", args)],
        ),
        Reply(text="42", thinking="hidden"),
    )
    events = await events_of(be, model(fake), GenerateRequest(prompt="weather?", tools=[WEATHER]))
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "call it"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Checking."
    start = next(e for e in events if isinstance(e, ToolCallStart))
    assert (start.index, start.id, start.name) == (0, "call_0", "get_weather")
    assert json.loads(next(e for e in events if isinstance(e, ToolCallDelta)).arguments) == args
    done = events[-1]
    assert isinstance(done, Done) and done.tool_calls[0].arguments == args and done.thinking == "call it"
    out = await be.generate(
        model(fake), GenerateRequest(prompt="x", params=GenerateParams(thinking=ThinkingMode.OFF))
    )
    assert (out.text, out.thinking) == ("42", None)


async def test_finish_reason(fake: FakeProviderServer, be: GeminiBackend) -> None:
    fake.queue(
        Reply(text="cut", finish_reason="length"),
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"})]),
        Reply(text="", finish_reason="SAFETY"),
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
        (Fault.rate_limit(retry_after=4), 429, True, 4.0),
        (Fault.server_error(), 500, True, None),
        (Fault.server_error(503), 503, True, None),
        (Fault.unauthorized(), 401, False, None),
        (Fault.forbidden(), 403, False, None),
        (Fault.bad_request("nope"), 400, False, None),
    ],
)
async def test_status_faults(
    fake: FakeProviderServer,
    be: GeminiBackend,
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
    assert err.provider == "gemini" and len(fake.requests) == 1


async def test_input_refusals_are_the_requests_and_a_bad_key_is_not(
    fake: FakeProviderServer, be: GeminiBackend
) -> None:
    fake.queue(Fault.bad_request('Invalid JSON payload received. Unknown name "foo"'))
    with pytest.raises(ProviderRejectedInput) as info:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert info.value.status == 400 and failure_weight(info.value) == 0
    # Gemini answers a bad key with 400 INVALID_ARGUMENT: that is the key's fault, not the input's.
    fake.queue(Fault.bad_request("API key not valid. Please pass a valid API key."))
    with pytest.raises(ProviderError) as bad_key:
        await be.generate(model(fake), GenerateRequest(prompt="x"))
    assert bad_key.value.status == 401 and not isinstance(bad_key.value, InvalidInput)
    assert failure_weight(bad_key.value) == 2


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


async def test_rotation_to_second_key(fake: FakeProviderServer, tmp_path: Path) -> None:
    other = "gemini-test-key-000002"
    be = make(tmp_path, {"GEMINI_API_KEYS": f"{KEY},{other}"})
    fake.set_key_behavior(KEY, Fault.rate_limit(retry_after=6))
    assert (await be.generate(model(fake), GenerateRequest(prompt="x"))).text == "echo: x"
    assert [r.api_key for r in fake.requests] == [KEY, other]
    first = be.ctx.keys.stats()["GEMINI_API_KEY"][0]  # type: ignore[union-attr]
    assert (first.rate_limits, first.last_status, first.state) == (1, 429, "cooling")


async def test_embeddings(fake: FakeProviderServer, be: GeminiBackend) -> None:
    schema = model(fake, "google/gemini-embedding-2")
    result = await be.embed(schema, EmbedRequest(texts=["alpha", "beta"], is_query=True))
    requests = sent(fake)["requests"]
    assert [r["content"]["parts"][0]["text"] for r in requests] == ["alpha", "beta"]
    assert {r["taskType"] for r in requests} == {"RETRIEVAL_QUERY"}
    assert result.dimensions == 8 and len(result.embeddings) == 2
    assert all(abs(sum(v * v for v in vec) - 1) < 1e-6 for vec in result.embeddings)


async def test_thought_signatures_of_function_calls_go_back_with_them(
    fake: FakeProviderServer, be: GeminiBackend
) -> None:
    fake.queue(
        Reply(thinking="look it up", tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"}, id="c1")]),
        Reply(text="cold"),
        Reply(text="cold"),
    )
    ask = Message(role="user", content="Weather in Oslo?")
    on = GenerateParams(thinking=ThinkingMode.ON)
    first = await be.generate(model(fake), GenerateRequest(messages=[ask], tools=[WEATHER], params=on))
    (item,) = first.provider_output_items
    assert item["type"] == "thought_signature" and item["call_id"] == "c1" and item["signature"]
    turn = Message(role="assistant", tool_calls=first.tool_calls, provider_items=first.provider_output_items)
    result = Message(role="tool", tool_call_id="c1", content="3 °C")
    await be.generate(model(fake), GenerateRequest(messages=[ask, turn, result], tools=[WEATHER], params=on))
    sent_signature = base64.urlsafe_b64decode(sent(fake)["contents"][1]["parts"][0]["thoughtSignature"])
    assert sent_signature == base64.b64decode(item["signature"])  # the model's own, not the placeholder
    # A turn without them still goes out, with Google's documented placeholder signature.
    bare = turn.model_copy(update={"provider_items": []})
    await be.generate(model(fake), GenerateRequest(messages=[ask, bare, result], tools=[WEATHER], params=on))
    assert sent(fake)["contents"][1]["parts"][0]["thoughtSignature"] == "skip_thought_signature_validator"
