"""The OpenAI-compatible routes through the official ``openai`` SDK, against a real server: the
embedded models (SmolLM2 by default routing, all-MiniLM for embeddings), and a hosted model that
is really the fake provider, for the tool-call round trip."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)

from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer, Fault, Reply, ToolCallSpec
from fakes.optional import some

from .conftest import MINILM, SMOL, model_freed, remote_home

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(local_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(local_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=local_server.url, timeout=60) as c:
        yield c


def test_chat_completion_routes_to_the_embedded_model(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=HI, max_tokens=6, temperature=0
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == SMOL
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 6
    assert raw.headers["x-car-model"] == SMOL
    trace = raw.headers["x-car-trace-id"]
    assert completion.id == f"chatcmpl-{trace}"
    assert raw.headers["x-car-route-reason"].isascii() and SMOL in raw.headers["x-car-route-reason"]
    # Any case, as model names are ("AUTO" was a 404 suggesting nothing).
    shouted = client.chat.completions.with_raw_response.create(model="AUTO", messages=HI, max_tokens=2)
    assert shouted.headers["x-car-model"] == SMOL and "x-car-route-reason" in shouted.headers
    assert client.models.retrieve("Auto").id == "auto"
    # Model omitted (extra_body can drop it) routes the same way; a name selects.
    named = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=4, stop=["\n"], seed=3)
    assert named.model == SMOL


def test_chat_stream_is_openai_chunks_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "system", "content": "Be brief."}, *HI],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes in (["stop"], ["length"])
    assert all(c.object == "chat.completion.chunk" and c.model == SMOL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens <= 8


def test_text_completion_sends_the_prompt_as_is(client: openai.OpenAI) -> None:
    done = client.completions.create(
        model="auto", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert done.object == "text_completion" and done.model == SMOL
    assert done.choices[0].text and done.usage is not None
    # Raw prompt: far fewer prompt tokens than the chat template would add.
    assert done.usage.prompt_tokens < 12
    pieces = list(
        client.completions.create(model="auto", prompt="One, two,", max_tokens=4, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in pieces) and pieces[-1].choices[0].finish_reason
    # JSON mode holds here too (vLLM takes response_format on completions; it was dropped).
    shaped = client.completions.create(
        model="auto", prompt="The capital of France as JSON:", max_tokens=24, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert shaped.choices[0].text.startswith("{"), "a JSON object, held to by the grammar"


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model="auto", input=["red", "blue"], encoding_format="float")
    assert floats.model == MINILM and len(floats.data) == 2
    assert len(floats.data[0].embedding) == 384
    # The SDK asks for base64 by default and decodes it.
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input="red")
    assert single.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    # Tokens the model read, [CLS] and [SEP] included (it reported 0 before).
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog"]
    counted = client.embeddings.create(model="auto", input=texts)
    assert counted.usage.prompt_tokens == counted.usage.total_tokens == (2 + 2) + (9 + 2)
    # A body over BIG_BODY is parsed on a worker thread (server.common.read_json): same answer.
    big = client.embeddings.create(model="auto", input=["red", "filler " * 50_000], encoding_format="float")
    assert big.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6) and len(big.data) == 2


def test_an_embedding_text_past_the_window_is_named_as_the_clients_input(http: httpx.Client) -> None:
    """With truncation refused, the error named the engine's `texts[0]`."""
    body = {"model": "auto", "input": ["red", "word " * 2000], "truncate": False}
    refused = http.post("/v1/embeddings", json=body)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "input[1]", refused.text
    assert error["message"].startswith("input[1] is ") and "texts" not in error["message"]


def test_rerank_cohere_shape(http: httpx.Client) -> None:
    body = {
        "query": "capital of France?",
        "documents": ["Bananas are yellow.", {"text": "Paris is the capital of France."}],
        "top_n": 1,
    }
    response = http.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == MINILM and response.headers["x-car-model"] == MINILM
    assert data["results"] == [
        {"index": 1, "relevance_score": pytest.approx(data["results"][0]["relevance_score"]),
         "document": {"text": "Paris is the capital of France."}}
    ]  # fmt: skip


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert "auto" in models and SMOL in models and MINILM in models
    smol = models[SMOL].model_dump()
    assert smol["owned_by"] == "huggingface" and smol["car"]["available"] is True
    assert "generate" in smol["car"]["capabilities"]
    assert client.models.retrieve("smollm2").id == SMOL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("qwen3-9b")
    assert info.value.code == "model_not_found"


def test_unknown_model_is_a_404_with_suggestions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="qwen3-9b", messages=HI, max_tokens=4)
    error = info.value
    assert error.status_code == 404 and error.code == "model_not_found" and error.param == "model"
    assert error.type == "invalid_request_error"
    assert "qwen3-9b" in error.message and "qwen/qwen3-8b:q4_k_m" in error.message


def test_bad_requests_are_400_naming_the_field(http: httpx.Client) -> None:
    malformed = http.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_json" and "malformed JSON" in malformed.text
    cases = [
        ({"messages": "hi"}, "messages"),
        ({"messages": HI, "temperature": "hot"}, "temperature"),
        ({"messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "video_url"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": HI, "n": 2}, "n"),
    ]
    for body, param in cases:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and param.split("[")[0] in error["message"], error
        assert "Traceback" not in response.text
    empty = http.post("/v1/embeddings", json={"input": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"


def test_feedback_records_or_404s(
    client: openai.OpenAI, http: httpx.Client, server_engine: InferenceEngine
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=HI, max_tokens=3)
    trace = raw.headers["x-car-trace-id"]
    ok = http.post("/v1/feedback", json={"trace_id": trace, "score": 0.9})
    assert ok.status_code == 200 and ok.json() == {"trace_id": trace, "score": 0.9, "recorded": True}
    assert server_engine.store.trace(trace) is not None
    missing = http.post("/v1/feedback", json={"trace_id": "nope", "score": 1})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trace_not_found"
    out_of_range = http.post("/v1/feedback", json={"trace_id": trace, "score": 7})
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["param"] == "score"


def test_hostile_json_is_a_400_not_a_500(http: httpx.Client) -> None:
    """The issue's inputs, each a 500 before: nesting past Python's recursion limit, an integer
    Python refuses to convert, a lone surrogate that cannot be written out as UTF-8."""
    hostile = {
        b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}": "nested too deeply",
        b'{"messages": [], "max_tokens": ' + b"7" * 5000 + b"}": "5000 digits",
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}': "surrogate",
    }
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/feedback"):
        for body, says in hostile.items():
            response = http.post(route, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, (route, says, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_json" and says in error["message"]


def test_wrong_types_and_unknown_tool_choices_are_400(http: httpx.Client) -> None:
    cases = [
        ({"messages": HI, "temperature": True}, "temperature"),  # was taken as 1.0
        ({"messages": HI, "max_tokens": False}, "max_tokens"),
        ({"messages": HI, "seed": 2**64}, "seed"),
        ({"messages": HI, "n": True}, "n"),
        ({"messages": HI, "tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),  # was accepted
        ({"messages": HI, "tool_choice": "get_weather", "tools": [WEATHER]}, "tool_choice"),  # OpenAI: object
        ({"messages": HI, "tool_choice": {"type": "function"}}, "tool_choice"),
    ]
    for body, param in cases:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, response.text
    named = {"type": "function", "function": {"name": "nowhere"}}
    unknown = http.post(
        "/v1/chat/completions", json={"messages": HI, "tool_choice": named, "tools": [WEATHER]}
    )
    assert unknown.status_code == 400 and "nowhere" in unknown.json()["error"]["message"]


def test_tools_with_tool_choice_none_are_answered_in_text_by_a_model_without_tools(
    http: httpx.Client,
) -> None:
    """With tool_choice "none" the tools are context only and OpenAI answers in text; a model
    without tool support was refused (400), and a routed request had no candidate at all."""
    for model in ("auto", "smollm2"):
        body = {"model": model, "messages": HI, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 4}
        answered = http.post("/v1/chat/completions", json=body)
        assert answered.status_code == 200, answered.text
        message = answered.json()["choices"][0]["message"]
        assert message["content"] and not message.get("tool_calls")
    wanted = {"model": "smollm2", "messages": HI, "tools": [WEATHER], "max_tokens": 4}  # auto: may call
    refused = http.post("/v1/chat/completions", json=wanted)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_mode"


# --- tools through a hosted model (the fake provider) ---------------------------------------------------

WEATHER: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tool_server(
    fake_provider: FakeProviderServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    home = remote_home(tmp_path_factory.mktemp("tools-home"), fake_provider, "gpt-tools")
    engine = InferenceEngine(home=home)
    with ServerThread(create_app(engine)) as server:
        yield server
    engine.close()


def test_tool_call_round_trip(tool_server: ServerThread, fake_provider: FakeProviderServer) -> None:
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)
    fake_provider.reset()
    fake_provider.queue(
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Paris"}, id="call_abc")]),
        Reply(text="It is sunny in Paris."),
    )
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(
        model="fake/gpt-tools",
        messages=messages,
        tools=[WEATHER],
        tool_choice="auto",
        parallel_tool_calls=False,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.id == "call_abc" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [
        # The SDK's reply message sent back as it is: its dump has the shape of the request's
        # assistant message, which the SDK types separately (a TypedDict, not the response model).
        cast(ChatCompletionAssistantMessageParam, choice.message.model_dump(exclude_none=True)),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"},
    ]
    final = client.chat.completions.create(model="fake/gpt-tools", messages=messages, tools=[WEATHER])
    assert final.choices[0].message.content == "It is sunny in Paris."
    # What reached the provider: the tools, then the assistant's call and the tool's result.
    sent = [r.json for r in fake_provider.requests if r.path.endswith("/chat/completions")]
    assert sent[0]["tools"][0]["function"]["name"] == "get_weather" and sent[0]["tool_choice"] == "auto"
    assert sent[0]["parallel_tool_calls"] is False
    history = sent[1]["messages"]
    assert history[-2]["tool_calls"][0]["id"] == "call_abc"
    assert history[-1] == {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 24C"}


def test_tool_calls_stream_as_deltas(tool_server: ServerThread, fake_provider: FakeProviderServer) -> None:
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)
    fake_provider.queue(
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"}, id="call_x")], chunk_chars=3)
    )
    chunks = list(
        client.chat.completions.create(
            model="fake/gpt-tools",
            messages=[{"role": "user", "content": "Oslo?"}],
            tools=[WEATHER],
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].id == "call_x" and some(calls[0].function).name == "get_weather"
    assert json.loads("".join(some(tc.function).arguments or "" for tc in calls)) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_images_and_json_mode_reach_the_provider(
    tool_server: ServerThread, fake_provider: FakeProviderServer
) -> None:
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)
    fake_provider.reset()
    # The fake stands for a hosted provider, which fetches image URLs on the internet; on loopback
    # it counts as an upstream on this network, whose image URLs the server fetches itself and
    # inlines (tests/backends/test_image_urls.py). Here the URL must go through as it is.
    engine: Any = tool_server.server.config.app.state.car.engine  # type: ignore[union-attr]
    engine.private_urls_ok = True
    try:
        _images_and_json_mode(client, fake_provider)
    finally:
        engine.private_urls_ok = False


def _images_and_json_mode(client: openai.OpenAI, fake_provider: FakeProviderServer) -> None:
    content: list[ChatCompletionContentPartParam] = [
        {"type": "text", "text": "Describe both."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    done = client.chat.completions.create(
        model="fake/gpt-tools",
        messages=[{"role": "developer", "content": "Answer in JSON."}, {"role": "user", "content": content}],
        response_format={"type": "json_object"},
        max_completion_tokens=50,
    )  # (reasoning_effort on this model, which has no thinking mode, is a 400: test_generation.py)
    assert done.choices[0].message.content
    sent = fake_provider.requests[-1].json
    assert sent["messages"][0]["role"] == "system"
    parts = sent["messages"][-1]["content"]
    assert parts[1]["image_url"] == {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}
    assert parts[2]["image_url"]["url"] == "https://example.com/cat.png"
    assert sent["max_tokens"] == 50


def test_a_provider_rate_limit_is_a_429_with_its_retry_after(
    tool_server: ServerThread, fake_provider: FakeProviderServer
) -> None:
    """The SDK in front of us waits and retries a 429 as it would against the provider itself; a
    502 would read as the provider being broken."""
    fake_provider.reset()
    fake_provider.queue(Fault.rate_limit(retry_after=1), Reply(text="now"))
    url, body = tool_server.url + "/v1/chat/completions", {"model": "fake/gpt-tools", "messages": HI}
    limited = httpx.post(url, json=body)
    assert limited.status_code == 429, limited.text
    error = limited.json()["error"]
    assert (error["code"], error["type"], error["upstream_status"]) == (
        "upstream_rate_limited",
        "rate_limit_error",
        429,
    )
    assert limited.headers["retry-after"] == "1"
    # The server (reached without a key) rests for its Retry-After: answered here, no call.
    again = httpx.post(url, json=body)
    assert again.status_code == 429 and len(fake_provider.requests) == 1, again.text
    time.sleep(float(again.headers["retry-after"]) + 0.1)
    assert httpx.post(url, json=body).json()["choices"][0]["message"]["content"] == "now"


def test_an_open_circuit_is_a_503_with_retry_after(
    tool_server: ServerThread, fake_provider: FakeProviderServer
) -> None:
    fake_provider.reset()
    fake_provider.queue(*[Fault.server_error(500)] * 3)  # the breaker's failure_threshold
    for _ in range(3):
        failed = httpx.post(
            tool_server.url + "/v1/chat/completions", json={"model": "fake/gpt-tools", "messages": HI}
        )
        assert failed.status_code == 502, failed.text
    refused = httpx.post(
        tool_server.url + "/v1/chat/completions", json={"model": "fake/gpt-tools", "messages": HI}
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "circuit_open", refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # the breaker's cooldown_s, counting down


def test_a_client_that_gives_up_frees_the_model(
    http: httpx.Client, local_server: ServerThread, server_engine: InferenceEngine
) -> None:
    """A non-streaming answer nobody will read stops when its client disconnects (streams
    already did): it held the model for everyone else until max_tokens ran out."""
    warm = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert warm.status_code == 200
    story = "Write a very long story about a dragon, at least 3000 words."  # 4,000 tokens: 67 s here
    long = {"messages": [{"role": "user", "content": story}], "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(local_server.url + "/v1/chat/completions", json=long, timeout=2.0)
    model_freed(server_engine, "the abandoned generation kept the model")
