"""OpenAI wire shapes to the engine's requests, and the engine's results back to OpenAI shapes.

Requests are checked field by field where the OpenAI shape differs from ours (content parts,
tool calls, ``stop`` as a string...), then validated in one go by pydantic; either way a problem
is a 400 naming the OpenAI field (``messages[1].content[0].image_url``, ``temperature``).
Unknown top-level fields are ignored, as OpenAI-compatible servers commonly do; fields we cannot
honour that would change the answer (``n`` > 1, ``logprobs``, ``logit_bias``, legacy
``functions``, audio output, web search, token-id prompts) are refused rather than silently
dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..requests import (
    MAX_MESSAGES,
    TOOL_CHOICE_MODES,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferenceResult,
    RerankRequest,
    RerankResult,
    TokenUsage,
    ToolCall,
)
from ..schema import ModelSchema
from ..stream import parse_tool_arguments
from .common import given, refuse_fields
from .errors import ApiError, validated, validation_info

__all__ = [
    "GenerationCall",
    "call_id",
    "chat_completion",
    "chat_request",
    "completion_request",
    "embed_request",
    "embeddings_response",
    "finish_reason",
    "model_object",
    "models_list",
    "rerank_request",
    "rerank_response",
    "text_completion",
    "usage_json",
]

AUTO = "auto"

# OpenAI parameters that map 1:1 onto GenerateParams; the last four are our extensions.
_PARAMS = (
    "temperature", "top_p", "seed", "reasoning_effort", "parallel_tool_calls",
    "top_k", "repeat_penalty", "thinking", "workload", "frequency_penalty", "presence_penalty",
)  # fmt: skip
# input_audio formats: OpenAI's (wav, mp3) and those other providers' audio models take.
_AUDIO_TYPES = {
    "wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg", "opus": "audio/opus",
    "aac": "audio/aac", "m4a": "audio/mp4", "webm": "audio/webm", "aiff": "audio/aiff",
}  # fmt: skip
_DETAILS = ("auto", "low", "high")


def _one_of(value: Any, allowed: Iterable[str], where: str) -> str:
    """``value`` where it is one of ``allowed``; a 400 naming the choices otherwise."""
    choices = list(allowed)
    if not isinstance(value, str) or value not in choices:
        raise _bad(f"{where}: expected one of {', '.join(choices)}, got {json.dumps(value)[:40]}", where)
    return value


_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$", re.DOTALL)


@dataclass
class GenerationCall:
    request: GenerateRequest
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def routed(model: Any) -> bool:
    """Whether a request's ``model`` asks for routing: absent, empty or ``auto`` (any case, as
    model names are: "AUTO" was a 404 naming no model)."""
    return model is None or (isinstance(model, str) and model.strip().lower() in ("", AUTO))


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if routed(model):
        return None
    if not isinstance(model, str):
        raise _bad("`model` must be a string", "model")
    return model


def _validated(cls: type[Any], data: dict[str, Any]) -> Any:
    try:
        return validated(cls, data, {"params": ""})  # our nesting; the client sent top-level fields
    except ValidationError as exc:
        info = validation_info(exc)
        raise _bad(info.message, info.param) from None


# --- chat requests --------------------------------------------------------------------------------


def _media_url(url: Any, where: str) -> dict[str, Any]:
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: expected a URL string", where)
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or not match.group(3):
            raise _bad(f"{where}: only base64 data: URLs are supported", where)
        try:  # checked here (C speed, ~1 ms a MB), not after routing found a vision model or none
            binascii.a2b_base64(match.group(4), strict_mode=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: the data: URL is not valid base64", where) from None
        return {"data": match.group(4), "media_type": match.group(1)}
    if url.startswith(("http://", "https://")):
        return {"url": url}
    raise _bad(f"{where}: expected an http(s) or data: URL", where)


def _part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise _bad(f"{where}: a content part must be an object", where)
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise _bad(f"{where}.{kind}: expected a string", f"{where}.{kind}")
        return {"type": "text", "text": text}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        block = {"type": "image", **_media_url(url, f"{where}.image_url")}
        if isinstance(image, dict) and image.get("detail") is not None:
            block["detail"] = _one_of(image["detail"], _DETAILS, f"{where}.image_url.detail")
        return block
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise _bad(f"{where}.input_audio: expected {{data, format}}", f"{where}.input_audio")
        fmt = _one_of(given(audio, "format", "wav"), _AUDIO_TYPES, f"{where}.input_audio.format")
        return {"type": "audio", "data": audio["data"], "media_type": _AUDIO_TYPES[fmt]}
    raise _bad(f"{where}: content part type {kind!r} is not supported", f"{where}.type")


def _content(content: Any, where: str, *, text_only: bool = False) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: expected a string or a list of content parts", where)
    parts = [_part(p, f"{where}[{i}]") for i, p in enumerate(content)]
    if text_only:
        if any(p["type"] != "text" for p in parts):
            raise _bad(f"{where}: this role takes text parts only", where)
        return "".join(p["text"] for p in parts)
    return parts


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise _bad(f"{where}: expected a list", where)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{where}[{i}].function: expected {{name, arguments}}", f"{where}[{i}].function")
        raw = fn.get("arguments")
        if isinstance(raw, dict):
            arguments, invalid = raw, None
        else:
            arguments, invalid = parse_tool_arguments(raw if isinstance(raw, str) else None)
        out.append(
            {"id": call.get("id"), "name": fn["name"], "arguments": arguments, "invalid_arguments": invalid}
        )
    return out


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("`messages` must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:  # checked first: translating 700,000 took 3 s of the loop
        raise _bad(f"`messages` holds {len(messages):,} messages; at most {MAX_MESSAGES:,}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where}: expected an object", where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise _bad(f"{where}.role: expected system, developer, user, assistant or tool", f"{where}.role")
        text_only = role != "user"
        message: dict[str, Any] = {
            "role": role,
            "content": _content(m.get("content"), f"{where}.content", text_only=text_only),
        }
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise _bad(
                    f"{where}.tool_call_id: a tool message needs the id of its call", f"{where}.tool_call_id"
                )
            message["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


# Fields that change the answer and that no model here honours (the SDK audit found them accepted
# and dropped); ``prediction`` only speeds an answer up, and stays ignored.
_UNHONOURED = {
    "logit_bias": "token biases are not passed to any model",
    "functions": "send them as `tools` (the legacy functions API is not served)",
    "function_call": "send it as `tool_choice` (the legacy functions API is not served)",
    "audio": "answers in audio are not supported",
    "web_search_options": "no model here searches the web",
}


def _params(body: dict[str, Any]) -> dict[str, Any]:
    params = {k: body[k] for k in _PARAMS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise _bad("only n = 1 is supported", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs are not supported", "logprobs")
    for name, why in _UNHONOURED.items():  # each would change the answer: refused, never dropped
        if body.get(name):
            raise _bad(f"`{name}` is not supported: {why}", name)
    if "audio" in (body.get("modalities") or ()):
        raise _bad("`modalities` may only be text: answers in audio are not supported", "modalities")
    return params


def _tool_choice(choice: Any) -> str | None:
    if choice is None or choice in TOOL_CHOICE_MODES:
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return fn["name"]
    raise _bad(
        "tool_choice: expected auto, none, required or {type: function, function: {name}}", "tool_choice"
    )


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("response_format: expected an object", "response_format")
    if fmt.get("type") == "text":
        return None
    return {k: fmt[k] for k in ("type", "json_schema") if k in fmt}


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = given(body, "stream", False)
    if not isinstance(stream, bool):
        raise _bad("`stream` must be a boolean", "stream")
    options = given(body, "stream_options", {})
    if not isinstance(options, dict):
        raise _bad("`stream_options` must be an object", "stream_options")
    include_usage = given(options, "include_usage", False)
    if not isinstance(include_usage, bool):  # "false" was read as true
        raise _bad("`stream_options.include_usage` must be a boolean", "stream_options.include_usage")
    return stream, include_usage


def chat_request(body: dict[str, Any]) -> GenerationCall:
    """A ``/v1/chat/completions`` body as a GenerateRequest (``model`` auto/omitted routes)."""
    params = _params(body)
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None:
        params["tool_choice"] = choice
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _bad("`tools` must be a list of function tools", "tools")
    for i, tool in enumerate(tools or []):
        # OpenAI's {type, function: {name}} or a bare {name}, the shapes GenerateRequest.tool_names reads.
        fn = tool.get("function", tool)
        if tool.get("type", "function") == "function" and not (
            isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]
        ):
            raise _bad(f"tools[{i}]: a function tool needs `function.name`", f"tools[{i}].function.name")
    data: dict[str, Any] = {
        "messages": _messages(body.get("messages")),
        "model": _model(body),
        "params": params,
        "tools": tools or None,
        "response_format": _response_format(body.get("response_format")),
        "intent": body.get("intent"),
    }
    stream, include_usage = _stream_flags(body)
    return GenerationCall(_validated(GenerateRequest, data), stream, include_usage)


def completion_request(body: dict[str, Any]) -> GenerationCall:
    """A legacy ``/v1/completions`` body: the prompt goes to the model as-is (no chat template)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad(
            "`prompt` must be a non-empty string (token arrays and batches are not supported)", "prompt"
        )
    if body.get("suffix") is not None:
        raise _bad("`suffix` is not supported", "suffix")
    if body.get("echo"):
        raise _bad("`echo` is not supported", "echo")
    if body.get("best_of") not in (None, 1) or isinstance(body.get("best_of"), bool):
        raise _bad("only best_of = 1 is supported", "best_of")
    for name in ("tools", "functions"):  # a raw prompt has no template to offer tools in
        if body.get(name):
            raise _bad(f"`{name}` needs /v1/chat/completions: a completion's prompt is sent as-is", name)
    params = _params(body) | {"raw_prompt": True}
    data = {
        "prompt": prompt, "model": _model(body), "params": params, "intent": body.get("intent"),
        "response_format": _response_format(body.get("response_format")),  # vLLM's extension too
    }  # fmt: skip
    stream, include_usage = _stream_flags(body)
    return GenerationCall(_validated(GenerateRequest, data), stream, include_usage)


# --- generation results -----------------------------------------------------------------------------


def usage_json(usage: TokenUsage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.cached_prompt_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_prompt_tokens}
    if usage.needs_compaction:  # the prompt was cut to its tail to fit: otherwise silent over HTTP
        out["needs_compaction"] = True
    return out


def finish_reason(tool_calls: list[ToolCall], usage: TokenUsage | None, max_tokens: int) -> str:
    """OpenAI's finish reason, inferred where the engine does not report one."""
    if tool_calls:
        return "tool_calls"
    if usage is not None and usage.completion_tokens >= max_tokens:
        return "length"
    return "stop"


def call_id(trace_id: str, index: int, given: str | None) -> str:
    return given or f"call_{trace_id[:12]}_{index}"


def _arguments(call: ToolCall) -> str:
    if call.invalid_arguments is not None:
        return call.invalid_arguments
    return dumps_str(call.arguments)


def dumps_str(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _tool_calls_json(calls: list[ToolCall], trace_id: str) -> list[dict[str, Any]]:
    return [
        {
            "id": call_id(trace_id, i, c.id),
            "type": "function",
            "function": {"name": c.name, "arguments": _arguments(c)},
        }
        for i, c in enumerate(calls)
    ]


def _result_finish(result: InferenceResult, max_tokens: int) -> str:
    reported = getattr(result, "finish_reason", None)  # when the engine passes the backend's on
    return reported or finish_reason(result.tool_calls, result.usage, max_tokens)


def chat_completion(result: InferenceResult, max_tokens: int) -> dict[str, Any]:
    # null only beside tool calls, as OpenAI answers: an empty answer (a stop on its first word)
    # is "" (it was null, while its stream sent "")
    content = result.text if result.text or not result.tool_calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if result.thinking:
        message["reasoning_content"] = result.thinking
    if result.tool_calls:
        message["tool_calls"] = _tool_calls_json(result.tool_calls, result.trace_id)
    return {
        "id": f"chatcmpl-{result.trace_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model_used,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _result_finish(result, max_tokens),
            }
        ],
        "usage": usage_json(result.usage),
        "system_fingerprint": None,
    }


def text_completion(result: InferenceResult, max_tokens: int) -> dict[str, Any]:
    return {
        "id": f"cmpl-{result.trace_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": result.model_used,
        "choices": [
            {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": _result_finish(result, max_tokens),
            }
        ],
        "usage": usage_json(result.usage),
    }


# --- embeddings and rerank ------------------------------------------------------------------------------


# The most items one request may embed or rerank: OpenAI's embeddings limit and Cohere's rerank
# limit. One request holds the thread every local sentence model shares until it is done (40,000
# short texts: most of a minute on 2 cores), so the server caps it as those APIs do.
MAX_EMBED_INPUTS = 2048
MAX_RERANK_DOCUMENTS = 1000
MAX_CLASSIFY_LABELS = 1000  # each label is scored: embedded, or a likelihood pass of the LLM


def check_batch(items: list[Any], limit: int, param: str) -> None:
    """A 400 naming ``param`` when a request holds more than ``limit`` items."""
    if len(items) > limit:
        raise _bad(f"`{param}` holds {len(items)} items; at most {limit} per request", param)


# OpenAI's fields (`user` is taken and not used) and our extensions.
_EMBED_FIELDS = frozenset(
    {"input", "model", "encoding_format", "dimensions", "user", "is_query", "instruction", "truncate"}
)
_RERANK_FIELDS = frozenset({"query", "documents", "model", "top_n", "return_documents", "instruction"})


def embed_request(body: dict[str, Any]) -> tuple[EmbedRequest, str]:
    """(request, encoding_format) for ``/v1/embeddings``; auto/omitted model = the default embedder."""
    refuse_fields(body, _EMBED_FIELDS)  # `dimension` and the like were dropped without a word
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise _bad("`input` must be a string or a non-empty list of strings", "input")
    if not all(isinstance(t, str) for t in texts):
        raise _bad("`input` must hold strings (token arrays are not supported)", "input")
    if (empty := next((i for i, t in enumerate(texts) if not t), None)) is not None:
        where = "input" if isinstance(body.get("input"), str) else f"input[{empty}]"
        raise _bad(f"`{where}` is empty; every text to embed needs at least one character", where)
    check_batch(texts, MAX_EMBED_INPUTS, "input")
    encoding = given(body, "encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _bad("`encoding_format` must be float or base64", "encoding_format")
    if body.get("dimensions") is not None:
        raise _bad("`dimensions` is not supported: vectors keep the model's size", "dimensions")
    data = {"texts": texts, "model": _model(body)}
    for key in ("is_query", "instruction", "truncate"):  # extensions
        if body.get(key) is not None:
            data[key] = body[key]
    return _validated(EmbedRequest, data), encoding


def _vector(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def embeddings_response(result: EmbedResult, encoding: str) -> dict[str, Any]:
    tokens = result.prompt_tokens or 0
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _vector(v, encoding)}
            for i, v in enumerate(result.embeddings)
        ],
        "model": result.model_used,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        # Our extension, only when some text was cut at the model's window: their indices.
        **({"truncated": result.truncated} if result.truncated else {}),
    }


def rerank_request(body: dict[str, Any]) -> tuple[RerankRequest, bool]:
    """(request, return_documents) for ``/v1/rerank`` (the Cohere/Jina shape)."""
    refuse_fields(body, _RERANK_FIELDS)  # `top_k: 1` answered every document
    documents = body.get("documents")
    if not isinstance(documents, list):
        raise _bad("`documents` must be a list of strings or {text} objects", "documents")
    check_batch(documents, MAX_RERANK_DOCUMENTS, "documents")
    texts = []
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise _bad(f"documents[{i}]: expected a string or {{text}}", f"documents[{i}]")
        texts.append(text)
    data = {"query": body.get("query"), "documents": texts, "model": _model(body), "top_n": body.get("top_n")}
    if body.get("instruction") is not None:
        data["instruction"] = body["instruction"]
    returns = body.get("return_documents", True)
    if not isinstance(returns, bool):  # bool("false") is True
        raise _bad("`return_documents` must be true or false", "return_documents")
    return _validated(RerankRequest, data), returns


def rerank_response(result: RerankResult, return_documents: bool) -> dict[str, Any]:
    results = []
    for doc in result.ranked:
        item: dict[str, Any] = {"index": doc.index, "relevance_score": doc.score}
        if return_documents:
            item["document"] = {"text": doc.document}
        results.append(item)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": result.model_used, "results": results}


# --- models ---------------------------------------------------------------------------------------------


def model_object(model: ModelSchema) -> dict[str, Any]:
    """An OpenAI model object; what the catalog knows beyond that sits under ``car``."""
    return {
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": model.provider,
        "car": {
            "name": model.name,
            "kind": model.kind,
            "capabilities": [str(c) for c in model.capabilities],
            "available": model.available,
            "local": model.is_local,
            "context_length": model.context_length,
            "aliases": list(model.aliases),
        },
    }


def models_list(models: list[ModelSchema]) -> dict[str, Any]:
    auto = {
        "id": AUTO,
        "object": "model",
        "created": 0,
        "owned_by": "car",
        "car": {"name": "adaptive routing", "router": True, "available": True},
    }
    return {"object": "list", "data": [auto, *(model_object(m) for m in models)]}
