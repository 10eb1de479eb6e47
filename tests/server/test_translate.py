"""OpenAI request bodies to engine requests, and engine results back to OpenAI shapes."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

import pytest

from car_inference.requests import (
    EmbedResult,
    ImageBlock,
    InferenceResult,
    RerankedDocument,
    RerankResult,
    TokenUsage,
    ToolCall,
)
from car_inference.server.errors import ApiError
from car_inference.server.translate import (
    MAX_EMBED_INPUTS,
    MAX_RERANK_DOCUMENTS,
    chat_completion,
    chat_request,
    completion_request,
    embed_request,
    embeddings_response,
    models_list,
    rerank_request,
    rerank_response,
    text_completion,
    usage_json,
)

USER = {"role": "user", "content": "hi"}


def bad(body: dict[str, object], fn: Callable[[dict[str, Any]], object] = chat_request) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(body)
    assert info.value.status == 400
    return info.value


def test_chat_messages_roles_and_content_parts() -> None:
    call = chat_request(
        {
            "model": "auto",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"},
                        },
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
                        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{broken"}},
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
            ],
        }
    )
    request = call.request
    assert request.model is None and not call.stream
    system, user, assistant, tool = request.messages or []
    assert system.role == "system" and system.content == "Be brief."
    blocks = user.content
    assert isinstance(blocks, list) and blocks[0].type == "text"
    image = blocks[1]
    assert isinstance(image, ImageBlock) and image.data == "AAAA" and image.media_type == "image/png"
    assert isinstance(blocks[2], ImageBlock)
    assert image.detail == "high" and blocks[2].url == "https://x.test/a.jpg"
    assert blocks[3].type == "audio" and blocks[3].media_type == "audio/mpeg"
    assert assistant.tool_calls[0].arguments == {"a": 1}
    assert assistant.tool_calls[1].arguments == {} and assistant.tool_calls[1].invalid_arguments == "{broken"
    assert tool.content == "42" and tool.tool_call_id == "c1"


def test_chat_parameters() -> None:
    call = chat_request(
        {
            "model": "qwen3-8b",
            "messages": [USER],
            "temperature": 0,
            "top_p": 0.5,
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "stop": "END",
            "seed": 4,
            "reasoning_effort": "low",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": False,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
            "stream": True,
            "stream_options": {"include_usage": True},
            "intent": {"task": "code", "prefer_local": True},
            "user": "ignored",
            "frequency_penalty": 0.5,
            "presence_penalty": -1,
        }
    )
    request, params = call.request, call.request.params
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -1)  # were dropped
    assert request.model == "qwen3-8b" and call.stream and call.include_usage
    assert (params.temperature, params.top_p, params.max_tokens, params.stop, params.seed) == (
        0,
        0.5,
        20,
        ["END"],
        4,
    )
    assert (
        params.reasoning_effort == "low" and params.tool_choice == "f" and params.parallel_tool_calls is False
    )
    assert request.response_format is not None and request.response_format.type == "json_schema"
    assert request.intent is not None and request.intent.prefer_local
    # Only what the client sent is set, so the model's own defaults still apply to the rest.
    assert "repeat_penalty" not in chat_request({"messages": [USER]}).request.params.model_fields_set
    assert (
        chat_request({"messages": [USER], "response_format": {"type": "text"}}).request.response_format
        is None
    )


def test_chat_refusals_name_the_field() -> None:
    assert bad({"messages": []}).param == "messages"
    many = bad({"messages": [USER] * 4097})
    assert many.param == "messages" and "4,097 messages; at most 4,096" in many.message
    assert bad({"messages": [USER], "model": 3}).param == "model"
    assert bad({"messages": [USER], "n": 3}).param == "n"
    assert bad({"messages": [USER], "logprobs": True}).param == "logprobs"
    assert bad({"messages": [USER], "frequency_penalty": 2.5}).param == "frequency_penalty"  # OpenAI: -2..2
    # Fields that change the answer were accepted and dropped (function_call gave plain text).
    unhonoured: list[tuple[str, object]] = [
        ("logit_bias", {"50256": -100}),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", {"name": "f"}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("web_search_options", {"search_context_size": "low"}),
    ]
    for name, value in unhonoured:
        assert bad({"messages": [USER], name: value}).param == name, name
    kept = chat_request({"messages": [USER], "modalities": ["text"], "prediction": {"type": "content"}})
    assert kept.request.messages, "text output and a prediction (a speed-up only) stay accepted"
    assert bad({"messages": [USER], "stream": "yes"}).param == "stream"
    # A falsy value of the wrong type is refused, not taken for the default (it was).
    assert bad({"messages": [USER], "stream": 0}).param == "stream"
    assert bad({"messages": [USER], "stream_options": []}).param == "stream_options"
    assert bad({"messages": [USER], "top_p": 0}).param == "top_p"
    assert bad({"messages": [USER], "tool_choice": {"type": "function"}}).param == "tool_choice"
    assert bad({"messages": [{"role": "tool", "content": "x"}]}).param == "messages[0].tool_call_id"
    assert (
        bad(
            {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": "https://x"}]}]}
        ).param
        == "messages[0].content"
    )
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}
    assert bad({"messages": [image]}).param == "messages[0].content[0].image_url"
    # Checked before routing: with no vision or tool model these were 503 "no candidate".
    broken = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}],
    }
    assert "not valid base64" in bad({"messages": [broken]}).message
    assert bad({"messages": [USER], "tools": [{}]}).param == "tools[0].function.name"
    # Checks across fields name the field too (param was null, as OpenAI's never is).
    weather = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    nowhere = {"type": "function", "function": {"name": "nowhere"}}
    unknown = bad({"messages": [USER], "tools": [weather], "tool_choice": nowhere})
    assert unknown.param == "tool_choice" and unknown.message.startswith("tool_choice 'nowhere' is neither")
    assert bad({"messages": [USER], "tool_choice": "required"}).param == "tool_choice"
    assert bad({"messages": [USER], "tools": [{"type": "function", "function": {}}]}).param == (
        "tools[0].function.name"
    )
    bare = chat_request({"messages": [USER], "tools": [{"name": "f", "parameters": {}}]}).request
    assert bare.tool_names() == ["f"], "the bare shape the library takes stays accepted"
    error = bad({"messages": [USER], "response_format": {"type": "json_schema"}})
    assert error.param == "response_format" and "json_schema" in error.message


def test_media_part_options_are_checked_where_the_client_wrote_them() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "ultra"}}
    error = bad({"messages": [{"role": "user", "content": [image]}]})
    assert error.param == "messages[0].content[0].image_url.detail"
    assert "auto, low, high" in error.message and '"ultra"' in error.message
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "exe"}}
    error = bad({"messages": [{"role": "user", "content": [audio]}]})
    assert error.param == "messages[0].content[0].input_audio.format" and "wav, mp3" in error.message
    flac = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "flac"}}
    request = chat_request({"messages": [{"role": "user", "content": [flac]}]}).request
    assert request.messages and request.messages[0].content[0].media_type == "audio/flac"  # type: ignore[union-attr]


def test_legacy_completion_request() -> None:
    call = completion_request({"prompt": ["Once upon"], "max_tokens": 5, "stop": ["\n"]})
    assert call.request.prompt == "Once upon" and call.request.params.raw_prompt
    assert completion_request({"prompt": "x", "tools": []}).request.prompt == "x"  # none given
    shaped = completion_request({"prompt": "x", "response_format": {"type": "json_object"}})
    assert shaped.request.response_format is not None and shaped.request.response_format.type == "json_object"
    cases: list[tuple[dict[str, object], str]] = [
        ({"prompt": [1, 2]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "echo": True}, "echo"),
        # Tools were accepted and dropped: the caller waited for a tool call that could not come.
        ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"prompt": "x", "functions": [{"name": "f"}]}, "functions"),
        ({"prompt": "x", "logit_bias": {"50256": -100}}, "logit_bias"),
        ({"prompt": "x", "response_format": "json"}, "response_format"),
        ({"prompt": "x", "stream_options": {"include_usage": "false"}}, "stream_options.include_usage"),
    ]
    for body, param in cases:
        assert bad(body, completion_request).param == param


def test_a_cut_prompt_is_said_in_usage() -> None:
    """A prompt longer than a local model's context keeps its tail; over HTTP nothing said so."""
    cut = TokenUsage(prompt_tokens=5, completion_tokens=3, total_tokens=8, needs_compaction=True)
    assert usage_json(cut) == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "needs_compaction": True
    }  # fmt: skip
    assert "needs_compaction" not in (usage_json(cut.model_copy(update={"needs_compaction": False})) or {})


def test_results_in_openai_shape() -> None:
    usage = TokenUsage(prompt_tokens=5, completion_tokens=3, total_tokens=8, cached_prompt_tokens=2)
    result = InferenceResult(
        text="",
        tool_calls=[
            ToolCall(name="f", arguments={"a": 1}),
            ToolCall(id="given", name="g", invalid_arguments="{x"),
        ],
        trace_id="0123456789abcdef",
        model_used="p/m",
        latency_ms=1.0,
        usage=usage,
        thinking="hmm",
    )
    body = chat_completion(result, max_tokens=100)
    assert body["id"] == "chatcmpl-0123456789abcdef" and body["model"] == "p/m"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["reasoning_content"] == "hmm"
    assert message["tool_calls"][0] == {
        "id": "call_0123456789ab_0",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a":1}'},
    }
    assert (
        message["tool_calls"][1]["id"] == "given"
        and message["tool_calls"][1]["function"]["arguments"] == "{x"
    )
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    empty = result.model_copy(update={"tool_calls": [], "text": ""})  # a stop on the first word
    assert chat_completion(empty, max_tokens=100)["choices"][0]["message"]["content"] == ""  # was null
    plain = result.model_copy(update={"tool_calls": [], "text": "abc"})
    assert text_completion(plain, max_tokens=3)["choices"][0] == {
        "index": 0,
        "text": "abc",
        "logprobs": None,
        "finish_reason": "length",
    }


def test_embeddings_and_rerank() -> None:
    request, encoding = embed_request({"input": "hello", "model": "auto", "is_query": True})
    assert request.texts == ["hello"] and request.model is None and request.is_query and encoding == "float"
    assert bad({"input": [[1, 2]]}, embed_request).param == "input"
    assert bad({"input": "x", "encoding_format": "hex"}, embed_request).param == "encoding_format"
    assert bad({"input": "x", "dimensions": 8}, embed_request).param == "dimensions"
    # An empty text got a vector (OpenAI refuses it): said, with where it is.
    assert bad({"input": ["x", ""]}, embed_request).param == "input[1]"
    assert bad({"input": ""}, embed_request).param == "input"
    assert len(embed_request({"input": ["x"] * MAX_EMBED_INPUTS})[0].texts) == MAX_EMBED_INPUTS
    too_many = bad({"input": ["x"] * (MAX_EMBED_INPUTS + 1)}, embed_request)
    assert too_many.param == "input" and "2049 items; at most 2048" in too_many.message
    result = EmbedResult(embeddings=[[0.5, -1.0]], model_used="e", dimensions=2, prompt_tokens=3)
    packed = embeddings_response(result, "base64")["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(packed)) == (0.5, -1.0)
    assert embeddings_response(result, "float")["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert "truncated" not in embeddings_response(result, "float")
    cut = result.model_copy(update={"truncated": [0]})
    assert embeddings_response(cut, "float")["truncated"] == [0]
    assert embed_request({"input": "x", "truncate": False})[0].truncate is False
    assert bad({"input": "x", "truncate": "no"}, embed_request).param == "truncate"
    # Fields a route does not take were dropped without a word (`dimension`: 384-d vectors came).
    typo = bad({"input": "x", "dimension": 64}, embed_request)
    assert typo.param == "dimension" and "did you mean `dimensions`?" in typo.message
    top_k = bad({"query": "q", "documents": ["a", "b"], "top_k": 1}, rerank_request)
    assert top_k.param == "top_k" and "did you mean `top_n`?" in top_k.message
    assert embed_request({"input": "x", "user": "u-1"})[0].texts == ["x"]  # OpenAI's, not used

    rerank, documents = rerank_request(
        {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": False}
    )
    assert rerank.documents == ["a", "b"] and rerank.top_n == 1 and documents is False
    assert bad({"query": "q", "documents": [3]}, rerank_request).param == "documents[0]"
    assert bad({"documents": ["a"]}, rerank_request).param == "query"
    docs: dict[str, object] = {"query": "q", "documents": ["a"] * (MAX_RERANK_DOCUMENTS + 1)}
    assert bad(docs, rerank_request).param == "documents"
    no: dict[str, object] = {
        "query": "q",
        "documents": ["a"],
        "return_documents": "false",
    }  # bool("false") was True
    assert bad(no, rerank_request).param == "return_documents"
    ranked = RerankResult(ranked=[RerankedDocument(index=1, score=0.9, document="b")], model_used="r")
    out = rerank_response(ranked, True)
    assert out["model"] == "r" and out["results"] == [
        {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}}
    ]
    assert "document" not in rerank_response(ranked, False)["results"][0]


def test_models_list_leads_with_auto() -> None:
    assert models_list([])["data"][0]["id"] == "auto"
