"""Requests and results: the seed's protocol tests, ported, plus validation of bad input."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from car_inference.requests import (
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOPS,
    BoundingBox,
    ClassifyRequest,
    EmbedRequest,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    InferenceResult,
    Message,
    RerankRequest,
    ResponseFormat,
    TextBlock,
    TokenUsage,
    ToolCall,
    TranscribeRequest,
)
from car_inference.schema import ModelCapability


def test_inference_result_serializes_with_full_shape() -> None:
    result = InferenceResult(
        text="",
        tool_calls=[ToolCall(name="read_file", arguments={"path": "README.md"})],
        trace_id="trace-abc",
        model_used="test-model",
        latency_ms=1234,
        time_to_first_token_ms=180,
        usage=TokenUsage(prompt_tokens=100, completion_tokens=50, total_tokens=150, context_window=8192),
    )
    data = result.model_dump(mode="json")
    assert data["text"] == ""
    assert data["trace_id"] == "trace-abc"
    assert data["model_used"] == "test-model"
    assert data["latency_ms"] == 1234
    assert data["tool_calls"][0]["name"] == "read_file"
    assert data["tool_calls"][0]["arguments"]["path"] == "README.md"
    assert data["usage"]["prompt_tokens"] == 100
    assert data["usage"]["completion_tokens"] == 50
    assert data["usage"]["total_tokens"] == 150
    assert data["usage"]["context_window"] == 8192
    assert data["time_to_first_token_ms"] == 180


def test_inference_result_top_level_keys_are_locked() -> None:
    result = InferenceResult(text="anything", trace_id="t", model_used="m", latency_ms=0)
    keys = set(result.model_dump(mode="json"))
    assert keys == {
        "text",
        "tool_calls",
        "trace_id",
        "model_used",
        "latency_ms",
        "time_to_first_token_ms",
        "usage",
    }, "infer response top-level keys drifted -- update both the test and docs/protocol.md if intentional"
    assert all(k == k.lower() and "-" not in k for k in keys)
    # The same holds for the JSON text the server writes.
    assert set(__import__("json").loads(result.model_dump_json())) == keys


def test_optional_result_keys_appear_only_when_non_empty() -> None:
    result = InferenceResult(text="x", trace_id="t", model_used="m", latency_ms=1, thinking="hmm")
    assert "thinking" in result.model_dump()
    boxed = InferenceResult(
        text="x",
        trace_id="t",
        model_used="m",
        latency_ms=1,
        bounding_boxes=[BoundingBox(x1=1, y1=2, x2=3, y2=4, label="cat")],
    )
    assert boxed.model_dump()["bounding_boxes"] == [
        {"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "label": "cat"}
    ]


def test_inference_result_serializes_plain_text_response() -> None:
    data = InferenceResult(
        text="hello world", trace_id="trace-xyz", model_used="test-model", latency_ms=42
    ).model_dump()
    assert data["text"] == "hello world"
    assert data["tool_calls"] == []
    assert data["model_used"] == "test-model"
    assert data["usage"] is None
    assert data["time_to_first_token_ms"] is None


def test_generate_request_deserializes_intent_field_from_json_rpc_params() -> None:
    req = GenerateRequest.model_validate(
        {
            "prompt": "summarize this email",
            "intent": {"task": "chat", "prefer_local": True, "require": ["tool_use"]},
        }
    )
    assert req.intent is not None
    assert req.intent.task == "chat"
    assert req.intent.prefer_local
    assert req.intent.require == [ModelCapability.TOOL_USE]
    back = req.model_dump(mode="json")
    assert back["intent"] == {"task": "chat", "prefer_local": True, "require": ["tool_use"]}

    empty = GenerateRequest.model_validate({"prompt": "x", "intent": {}})
    assert empty.intent is not None
    assert empty.intent.task is None and not empty.intent.prefer_local and empty.intent.require == []
    assert GenerateRequest.model_validate({"prompt": "x"}).intent is None


def test_a_request_needs_a_prompt_or_messages() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        GenerateRequest()
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"prompt": "x", "params": {"temperature": 5}})
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="x", unknown_field=1)  # type: ignore[call-arg]


def test_chat_messages_put_context_first_and_prompt_with_images_last() -> None:
    req = GenerateRequest(
        prompt="what is this?",
        context="be brief",
        messages=[Message(role="user", content="hi"), Message(role="assistant", content="hello")],
        images=[ImageBlock(url="https://example.com/cat.png")],
    )
    msgs = req.chat_messages()
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user"]
    last = msgs[-1]
    assert isinstance(last.content, list)
    assert isinstance(last.content[0], TextBlock) and last.content[0].text == "what is this?"
    assert req.media_types() == {"image"}
    assert req.last_user_text() == "what is this?"


def test_media_blocks_need_exactly_one_of_url_or_data() -> None:
    with pytest.raises(ValidationError):
        ImageBlock()
    with pytest.raises(ValidationError):
        ImageBlock(url="https://x", data="aGVsbG8=")
    assert ImageBlock(data="aGVsbG8=", media_type="image/png").data
    with pytest.raises(ValidationError, match=r"the media is empty \(0 bytes\)"):  # an empty file's
        ImageBlock(data="")


def test_json_schema_response_format_needs_a_schema() -> None:
    with pytest.raises(ValidationError):
        ResponseFormat(type="json_schema")
    assert ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": {"type": "object"}})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", True),  # lax pydantic would read it as 1.0
        ("temperature", "0.5"),
        ("temperature", float("nan")),
        ("top_p", False),
        ("max_tokens", True),
        ("max_tokens", 5.0),
        ("max_tokens", 2**31),
        ("seed", 2**63),
        ("seed", "7"),
        ("parallel_tool_calls", "yes"),
        ("parallel_tool_calls", 1),
    ],
)
def test_numbers_and_flags_must_be_json_numbers_and_booleans(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateParams.model_validate({field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_numbers_in_range_pass() -> None:
    params = GenerateParams.model_validate(
        {
            "temperature": 1,
            "top_p": 0.5,
            "max_tokens": 2**31 - 1,
            "seed": -(2**63),
            "parallel_tool_calls": True,
        }
    )
    assert params.temperature == 1.0 and isinstance(params.temperature, float)


def test_tool_choice_is_a_mode_or_a_declared_tool() -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    for choice in ("auto", "none", "required", "weather"):
        GenerateRequest(prompt="x", tools=tools, params=GenerateParams(tool_choice=choice))
    with pytest.raises(ValidationError, match=r"sometimes.*weather"):
        GenerateRequest(prompt="x", tools=tools, params=GenerateParams(tool_choice="sometimes"))
    with pytest.raises(ValidationError, match="none given"):
        GenerateRequest(prompt="x", params=GenerateParams(tool_choice="weather"))
    # It answered in plain text with 200: "required" promises a call, and there is nothing to call.
    with pytest.raises(ValidationError, match="'required' needs `tools`"):
        GenerateRequest(prompt="x", params=GenerateParams(tool_choice="required"))
    GenerateRequest(prompt="x", params=GenerateParams(tool_choice="none"))  # nothing to call: fine
    # OpenAI's named-function object is the tool's name (it was refused outside the HTTP routes)
    named = GenerateParams.model_validate(
        {"tool_choice": {"type": "function", "function": {"name": "weather"}}}
    )
    assert named.tool_choice == "weather"
    with pytest.raises(ValidationError):
        GenerateParams.model_validate({"tool_choice": {"type": "function", "function": {}}})


def test_tool_choice_none_leaves_the_tools_as_context() -> None:
    tools = [{"name": "weather", "parameters": {}}]
    assert GenerateRequest(prompt="x", tools=tools).calls_tools()
    assert not GenerateRequest(
        prompt="x", tools=tools, params=GenerateParams(tool_choice="none")
    ).calls_tools()
    assert not GenerateRequest(prompt="x").calls_tools()


def test_an_embedding_needs_texts_each_with_something_in_it() -> None:
    """An empty text got a vector, matching other texts by chance; no texts, an empty answer."""
    assert EmbedRequest(texts=[" "]).texts == [" "]
    with pytest.raises(ValidationError, match="at least one text"):
        EmbedRequest(texts=[])
    with pytest.raises(ValidationError, match="item 1 is empty"):
        EmbedRequest(texts=["a", ""])


def test_a_tool_must_name_its_function() -> None:
    """A tool naming no function was taken, and the request then failed as "no generate+tool_use
    model can run here", which hid the real mistake."""
    GenerateRequest(prompt="x", tools=[{"name": "weather", "parameters": {}}])  # the short form
    for tool in ({"foo": "bar"}, {"type": "function", "function": {"parameters": {}}}, {"name": ""}):
        with pytest.raises(ValidationError, match=r"tools\[0\] names no function"):
            GenerateRequest(prompt="x", tools=[tool])


def test_stop_strings_are_bounded() -> None:
    """Each one is checked against the answer at every token: 500,000 of them made a 4-token
    answer take 6.5 s and other clients' answers five times slower."""
    GenerateParams(stop=["\n"] * MAX_STOPS)
    with pytest.raises(ValidationError, match=f"at most {MAX_STOPS} items"):
        GenerateParams(stop=["x"] * (MAX_STOPS + 1))
    with pytest.raises(ValidationError, match=f"at most {MAX_STOP_CHARS} characters"):
        GenerateParams(stop=["x" * (MAX_STOP_CHARS + 1)])


def test_a_raw_prompt_needs_a_prompt() -> None:
    """raw_prompt with only messages reached llama.cpp with zero tokens (an AssertionError, a 500
    over JSON-RPC): the request is refused when it is made."""
    with pytest.raises(ValidationError, match="raw_prompt"):
        GenerateRequest(messages=[Message(role="user", content="x")], params=GenerateParams(raw_prompt=True))
    assert GenerateRequest(prompt="<|im_start|>x", params=GenerateParams(raw_prompt=True)).prompt


def test_messages_are_at_most_max_messages() -> None:
    """A chat template's rendering and tokenization grow faster than its turns: a bound."""
    turn = Message(role="user", content="x")
    assert len(GenerateRequest(messages=[turn] * MAX_MESSAGES).messages or []) == MAX_MESSAGES
    with pytest.raises(ValidationError, match="at most 4096"):
        GenerateRequest(messages=[turn] * (MAX_MESSAGES + 1))


def test_request_flags_take_json_booleans_only() -> None:
    """pydantic's lax mode took "yes" for true: a client's mistake went through unseen."""
    with pytest.raises(ValidationError):
        TranscribeRequest.model_validate({"audio_path": "a.wav", "timestamps": "yes"})
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"prompt": "x", "params": {"raw_prompt": 1}})
    assert TranscribeRequest(audio_path="a.wav", timestamps=True).timestamps


def test_an_empty_query_or_text_is_refused() -> None:
    """A rerank by an empty query ordered the documents by chance, and an empty text was
    classified all the same: both answered 200."""
    with pytest.raises(ValidationError, match="query"):
        RerankRequest(query="", documents=["a", "b"])
    with pytest.raises(ValidationError, match="text"):
        ClassifyRequest(text="", labels=["a", "b"])
    assert RerankRequest(query="q", documents=["", "b"]).documents == ["", "b"]  # an empty document ranks
