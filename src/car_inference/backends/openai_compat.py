"""OpenAI Chat Completions through the official ``openai`` SDK: OpenAI itself and every
OpenAI-compatible host (OpenRouter, Groq, Together, DeepSeek, vLLM, Ollama's /v1, llama.cpp
server, LM Studio). Hosts are catalog data; this module knows only the wire protocol.

Source kinds served: ``openai`` (``base_url``/``api_key_env``/``model_name``/``headers`` from the
source, merged with the catalog's ``[hosts]``; ``needs_key=False`` is a key-less local server),
``ollama`` (``host + "/v1"``, ``model_tag``, no key) and ``vllm`` (``endpoint + "/v1"``,
``model_name``, key from ``api_key_env`` when one is set). A key-less server gets a placeholder
key, so the SDK never falls back to ``OPENAI_API_KEY`` from the environment.

Request mapping (a parameter goes out only when ``ModelSchema.supports_param`` says so):

- messages: system/user/assistant/tool as Chat Completions messages; images as ``image_url``
  parts (http(s) and data: URLs pass through, base64 becomes a data: URL, ``detail`` kept);
  audio as ``input_audio`` (wav or mp3, inline or data: URL; an http URL is ``UnsupportedMode``);
  video is ``UnsupportedMode``.
- temperature, top_p (when not 1), seed, stop as is; top_k in the body for the hosts that take
  it; ``max_tokens`` is sent as ``max_completion_tokens`` to reasoning models (those declaring
  ``reasoning_effort``, which reject ``max_tokens`` on OpenAI) and as ``max_tokens`` otherwise.
- tools as given; ``tool_choice`` auto/none/required as is, a tool name as
  ``{"type": "function", "function": {"name": ...}}``; ``parallel_tool_calls`` as is.
- ``response_format`` json_object / json_schema natively; a model without ``response_format``
  gets an instruction in the system message instead.
- thinking -> ``reasoning_effort`` (models declaring it): an explicit ``reasoning_effort`` wins;
  ``thinking=on`` or a ``budget_tokens`` gives an effort from the budget (< 2,048 low, < 8,000
  medium, else high); ``thinking=off`` sends ``low``, the lowest effort every OpenAI reasoning
  model accepts (``none`` and ``minimal`` are refused by some), and drops reasoning text.
  Reasoning text that hosts stream as ``reasoning_content`` or ``reasoning`` becomes
  ``ThinkingDelta`` events, kept apart from the answer.
- streaming always, with ``stream_options.include_usage`` so usage (cached prompt tokens
  included) arrives at the end; ``generate`` consumes the stream.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

try:
    import httpx2
    import openai
except ImportError as exc:  # pragma: no cover - the backend table checks this first
    raise ImportError(
        "the OpenAI-compatible backend needs openai: pip install 'car-inference[openai]'"
    ) from exc

from ..errors import ProviderError, UnsupportedMode
from ..requests import EmbedRequest, EmbedResult, GenerateRequest, Message, TextBlock
from ..schema import GenerateParam, ModelSchema, OllamaSource, OpenAISource, VllmSource
from ..stream import StreamEvent, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart, UsageEvent
from .base import BackendContext
from .openai_media import OpenAIMediaMixin
from .openai_speech import OpenAISpeechMixin
from .remote import (
    Endpoint,
    ErrorSite,
    Finish,
    MalformedResponse,
    ProviderItems,
    RemoteBackend,
    StreamIncomplete,
    status_error,
    transport_error,
)
from .wire import (
    conversation,
    function_specs,
    json_instruction,
    media_of,
    sampling,
    thinking_plan,
    tool_choice_of,
    unit_vector,
    usage_of,
    with_system,
)

__all__ = ["OpenAICompatBackend"]

_AUDIO_FORMATS = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
}


@dataclass(frozen=True)
class _Wire:
    """What a chat request needs to go out on an SDK client's pool: the pool, URL and headers."""

    http: httpx2.AsyncClient
    url: str
    headers: dict[str, str]


# Images and video: openai_media.py; transcription and speech: openai_speech.py.
class OpenAICompatBackend(OpenAIMediaMixin, OpenAISpeechMixin, RemoteBackend):
    kind = "openai"
    source_types = (OpenAISource,)
    needs_base_url = True

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._wires: weakref.WeakKeyDictionary[openai.AsyncOpenAI, _Wire] = weakref.WeakKeyDictionary()

    # --- hooks ---------------------------------------------------------------------------------

    def endpoint(self, model: ModelSchema) -> Endpoint:
        source = model.source
        # An [[endpoints]] server's failures carry its name ("gpubox"), others the runtime's.
        named = model.provider if "endpoint" in model.tags else None
        if isinstance(source, OllamaSource):
            host = source.host.rstrip("/") + "/v1"
            return Endpoint(named or "ollama", host, None, source.model_tag, needs_key=False)
        if isinstance(source, VllmSource):
            base = source.endpoint.rstrip("/") + "/v1"
            return Endpoint(named or "vllm", base, source.api_key_env, source.model_name, needs_key=False)
        return super().endpoint(model)

    def make_client(self, endpoint: Endpoint, key: str) -> openai.AsyncOpenAI:
        timeout = httpx2.Timeout(self.settings.timeout_s, connect=self.settings.connect_timeout_s)
        http = openai.DefaultAsyncHttpxClient(timeout=timeout)  # the SDK's defaults; ours to reuse
        client = openai.AsyncOpenAI(
            api_key=key,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=timeout,
            default_headers=dict(endpoint.headers) or None,
            http_client=http,
        )
        headers = {
            k: v for k, v in {**client.default_headers, **client.auth_headers}.items() if isinstance(v, str)
        }
        self._wires[client] = _Wire(http, str(client.base_url).rstrip("/") + "/chat/completions", headers)
        return client

    def build(self, model: ModelSchema, endpoint: Endpoint, request: GenerateRequest) -> dict[str, Any]:
        params = request.params
        plan = thinking_plan(model, params)
        system, turns = conversation(request)
        source = model.source
        if not system and isinstance(source, OpenAISource):
            system = source.system_prompt or ""
        fmt = request.response_format
        wants_json = fmt is not None and fmt.type != "text"
        native_json = wants_json and model.supports_param(GenerateParam.RESPONSE_FORMAT)
        system = with_system(system, None if native_json else json_instruction(fmt))
        messages = [{"role": "system", "content": system}] if system else []
        messages += [self._message(m) for m in turns]
        body: dict[str, Any] = {
            "model": endpoint.wire_model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reasoning = model.supports_param(GenerateParam.REASONING_EFFORT)
        for param, value in sampling(model, params).items():
            if param is GenerateParam.MAX_TOKENS:
                body["max_completion_tokens" if reasoning else "max_tokens"] = value
            else:  # top_k is not OpenAI's, but vLLM, llama.cpp and others take it
                body[param.value] = value
        field = source.repeat_penalty_field if isinstance(source, OpenAISource) else None
        if field and params.repeat_penalty != 1.0:
            body[field] = params.repeat_penalty
        effort = "low" if plan.mode == "off" else plan.effort
        if reasoning and effort:
            body["reasoning_effort"] = effort
        if native_json and fmt is not None:
            if fmt.type == "json_schema" and fmt.json_schema:
                schema = {"name": "response", **fmt.json_schema}
                body["response_format"] = {"type": "json_schema", "json_schema": schema}
            else:
                body["response_format"] = {"type": "json_object"}
        self._tools(model, request, body)
        return body

    def _tools(self, model: ModelSchema, request: GenerateRequest, body: dict[str, Any]) -> None:
        if not request.tools:
            return
        if not model.supports_param(GenerateParam.TOOLS):
            if not request.calls_tools():
                return  # tool_choice "none": the tools are context only, and this model answers without
            raise UnsupportedMode("tool-use", self.kind, f"{model.id} takes no tools on Chat Completions")
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": s.name, "description": s.description, "parameters": s.parameters},
            }
            for s in function_specs(request.tools)
        ]
        choice = tool_choice_of(request.params)
        if choice is not None and model.supports_param(GenerateParam.TOOL_CHOICE):
            kind, name = choice
            body["tool_choice"] = kind if name is None else {"type": "function", "function": {"name": name}}
        parallel = request.params.parallel_tool_calls
        if parallel is not None and model.supports_param(GenerateParam.PARALLEL_TOOL_CALLS):
            body["parallel_tool_calls"] = parallel

    def _message(self, message: Message) -> dict[str, Any]:
        if message.role == "tool":
            return {"role": "tool", "tool_call_id": message.tool_call_id or "", "content": message.text()}
        if message.role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": message.text() or None}
            if message.tool_calls:
                out["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.name,
                            "arguments": _arguments_json(call.arguments, call.invalid_arguments),
                        },
                    }
                    for call in message.tool_calls
                ]
            return out
        if isinstance(message.content, str):
            return {"role": "user", "content": message.content}
        parts = []
        for block in message.content:
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
            else:
                parts.append(self._media_part(block))
        return {"role": "user", "content": parts}

    def _media_part(self, block: Any) -> dict[str, Any]:
        media = media_of(block, self.kind)
        if media.kind == "image":
            url = media.url or f"data:{media.media_type or 'image/png'};base64,{media.data}"
            image: dict[str, Any] = {"url": url}
            if block.detail:
                image["detail"] = block.detail
            return {"type": "image_url", "image_url": image}
        if media.kind == "audio":
            fmt = _AUDIO_FORMATS.get((media.media_type or "").lower())
            if media.data is None:
                raise UnsupportedMode(
                    "audio-input", self.kind, "audio must be inline (base64 or a data: URL)"
                )
            if fmt is None:
                raise UnsupportedMode(
                    "audio-input", self.kind, f"input_audio takes wav or mp3, not {media.media_type}"
                )
            return {"type": "input_audio", "input_audio": {"data": media.data, "format": fmt}}
        raise UnsupportedMode(f"{media.kind}-input", self.kind, f"Chat Completions takes no {media.kind}")

    async def _send(self, client: openai.AsyncOpenAI, payload: dict[str, Any]) -> httpx2.Response:
        """POST /chat/completions as a stream on the SDK client's own connection pool, with the
        headers the SDK sends (auth, user agent, custom headers), raising the SDK's error classes.
        The SDK's generic request path (options, URL and header merging per request) costs about
        0.4 ms a call on a fast upstream (measured by benchmarks/server.py)."""
        wire = self._wires[client]  # every client comes from make_client
        request = wire.http.build_request("POST", wire.url, content=json.dumps(payload), headers=wire.headers)
        try:
            response = await wire.http.send(request, stream=True)
        except httpx2.TimeoutException as exc:
            raise openai.APITimeoutError(request) from exc
        except httpx2.HTTPError as exc:
            raise openai.APIConnectionError(request=request) from exc
        if response.status_code >= 400:
            try:
                raw = await response.aread()
            finally:
                await response.aclose()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            message = f"Error code: {response.status_code} - {body}"
            raise openai.APIStatusError(message, response=response, body=body)
        return response

    async def events(
        self, client: openai.AsyncOpenAI, endpoint: Endpoint, model: ModelSchema, payload: dict[str, Any]
    ) -> AsyncGenerator[StreamEvent | Finish | ProviderItems, None]:
        # The stream is read as plain JSON: typed chunk objects cost more than a fast upstream's
        # whole answer (about 1.8 ms a request, measured by benchmarks/server.py).
        response = await self._send(client, payload)
        started: set[int] = set()
        finish: str | None = None
        usage: dict[str, Any] | None = None
        said_done = False
        try:
            async for chunk in _chunks(response):
                said_done = said_done or chunk is DONE
                if chunk.get("error") is not None:  # `"error": null` beside content is no error
                    raise openai.APIError(_error_message(chunk), response.request, body=chunk)
                usage = _field(chunk, "usage", dict) or usage
                for raw_choice in (_field(chunk, "choices", list) or [])[:1]:
                    choice = _shape(raw_choice, dict, "choices[0]")
                    delta = _field(choice, "delta", dict) or {}
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if isinstance(reasoning, str) and reasoning:
                        yield ThinkingDelta(text=reasoning)
                    if content := _field(delta, "content", str):
                        yield TextDelta(text=content)
                    for raw_call in _field(delta, "tool_calls", list) or []:
                        call = _shape(raw_call, dict, "tool_calls[]")
                        index = _field(call, "index", int) or 0
                        function = _field(call, "function", dict) or {}
                        if index not in started:
                            started.add(index)
                            name = _field(function, "name", str) or ""
                            yield ToolCallStart(index=index, id=_field(call, "id", str), name=name)
                        if arguments := _field(function, "arguments", str):
                            yield ToolCallDelta(index=index, arguments=arguments)
                    finish = _field(choice, "finish_reason", str) or finish
        finally:
            await response.aclose()
        if finish is None and not said_done:  # cut: no finish_reason, and no [DONE] either
            raise StreamIncomplete("no finish_reason")
        finish = finish or "stop"  # [DONE] ends the stream; some proxies drop the finish_reason
        yield Finish(finish)
        if usage is not None:
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            yield UsageEvent(
                usage=usage_of(
                    _count(usage.get("prompt_tokens")),
                    _count(usage.get("completion_tokens")),
                    _count(usage.get("total_tokens")),
                    _count(cached),
                )
            )

    def translate(
        self, exc: Exception, endpoint: Endpoint, model: ModelSchema, key: str
    ) -> ProviderError | None:
        where: ErrorSite = {"provider": endpoint.provider, "model": model.id, "secrets": [key]}
        if isinstance(exc, openai.APIStatusError):
            return status_error(exc.status_code, _message_of(exc), headers=exc.response.headers, **where)
        if isinstance(exc, openai.APIConnectionError):  # timeouts included
            return transport_error(exc.__cause__ or exc, connection=True, **where)
        if isinstance(exc, openai.APIError):  # an error event inside an accepted stream
            return status_error(200, _message_of(exc), **where)
        return transport_error(exc, **where)

    # --- embeddings ----------------------------------------------------------------------------

    async def embed(self, model: ModelSchema, request: EmbedRequest) -> EmbedResult:
        instruction = request.instruction or model.query_instruction
        texts = [
            f"Instruct: {instruction}\nQuery: {t}" if request.is_query and instruction else t
            for t in request.texts
        ]

        async def call(client: openai.AsyncOpenAI, endpoint: Endpoint) -> Any:
            return await client.embeddings.create(
                model=endpoint.wire_model, input=texts, encoding_format="float"
            )

        if not texts:
            return EmbedResult(embeddings=[], model_used=model.id, dimensions=0)
        response = await self.with_keys(model, call)
        vectors = _vectors(model, response.data or [], len(texts))
        if request.normalize:
            vectors = [unit_vector(v) for v in vectors]
        usage = getattr(response, "usage", None)
        return EmbedResult(
            embeddings=vectors,
            model_used=model.id,
            dimensions=len(vectors[0]) if vectors else 0,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
        )


def _vectors(model: ModelSchema, data: list[Any], count: int) -> list[list[float]]:
    """One finite vector per input, in input order, else ``ProviderError`` saying what came: a
    host that answered one vector for three inputs (or NaNs) was passed on, misaligned with them."""

    def refuse(what: str) -> ProviderError:
        return ProviderError(
            f"the embeddings answer {what} for {count} inputs", provider=model.provider, model=model.id
        )

    indices = sorted(getattr(d, "index", -1) for d in data)
    if indices != list(range(count)):
        raise refuse(f"holds {len(data)} vectors (indices {indices[:5]}{'...' if len(indices) > 5 else ''})")
    vectors = [[float(x) for x in d.embedding or ()] for d in sorted(data, key=lambda d: d.index)]
    if any(not v or len(v) != len(vectors[0]) for v in vectors):
        raise refuse("holds vectors of different or no dimensions")
    if not all(math.isfinite(x) for v in vectors for x in v):
        raise refuse("holds a number that is not finite (NaN or infinity)")
    return vectors


def _arguments_json(arguments: dict[str, Any], invalid: str | None) -> str:
    return invalid if invalid is not None else json.dumps(arguments)


# One server-sent event line at most: a token's chunk is a few hundred bytes, an image in a
# Responses item some megabytes; a line past this is no stream a model sends.
MAX_EVENT_BYTES = 64 * 1024 * 1024


async def _chunks(response: httpx2.Response) -> AsyncIterator[dict[str, Any]]:
    """The stream's chunks. A server that ignores ``"stream": true`` and answers one
    ``chat.completion`` object gets it read as one chunk (it failed as "stream ended early"); a
    body that is neither (an HTML page) is a ``MalformedResponse`` that says what came."""
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind in ("", "text/event-stream"):
        async for chunk in _sse_json(response):
            yield chunk
        return
    if kind != "application/json":
        raise MalformedResponse(f"the server answered {kind}, not an event stream")
    whole = json.loads(await response.aread())
    if not isinstance(whole, dict):
        raise MalformedResponse(f"the answer is {type(whole).__name__}, not a JSON object")
    yield _as_chunk(whole)


def _as_chunk(whole: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` as the one stream chunk that says the same: each choice's message as
    its delta (tool calls numbered, as deltas are)."""
    if "error" in whole:
        return whole
    choices = []
    for raw in _field(whole, "choices", list) or []:
        choice = _shape(raw, dict, "choices[]")
        message = dict(_field(choice, "message", dict) or {})
        calls = _field(message, "tool_calls", list)
        if calls:
            message["tool_calls"] = [
                {**_shape(c, dict, "tool_calls[]"), "index": i} for i, c in enumerate(calls)
            ]
        choices.append(
            {"index": choice.get("index", 0), "delta": message, "finish_reason": choice.get("finish_reason")}
        )
    return {"choices": choices, "usage": whole.get("usage")}


# What ``_sse_json`` yields for ``[DONE]``: an empty chunk (nothing in it), the stream's end said.
DONE: dict[str, Any] = {}


async def _sse_json(response: httpx2.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to ``[DONE]`` (then ``DONE``). A
    payload that is not a JSON object raises ValueError (the stream is broken, not the request).
    Lines are split on bytes (httpx's text and line decoders cost more than the JSON itself);
    blank separators, comments and ``event:`` lines are skipped."""
    done = False
    pending = bytearray()  # the unfinished line: appended to, and each byte searched once
    encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
    chunks = response.aiter_bytes() if encoded else response.aiter_raw()  # raw: no decoder to pass
    async for chunk in chunks:
        # After [DONE] the body is read to its end anyway: a response closed before that takes
        # its connection with it, and the next request would pay for a new one.
        if done:
            continue
        searched = len(pending)
        pending += chunk
        if pending.find(b"\n", searched) < 0:
            if len(pending) > MAX_EVENT_BYTES:
                raise MalformedResponse(f"a stream line is longer than {MAX_EVENT_BYTES} bytes")
            continue
        last = pending.rfind(b"\n")
        lines = bytes(pending[:last]).split(b"\n")
        del pending[: last + 1]
        for line in lines:
            if line.startswith(b"data:"):
                value = _sse_data(line)
                if value is None:
                    done = True
                    yield DONE
                    break
                yield value
    if not done and pending.startswith(b"data:") and (value := _sse_data(bytes(pending))) is not None:
        yield value


def _sse_data(line: bytes) -> dict[str, Any] | None:
    """The JSON object of one ``data:`` line; None for ``[DONE]``."""
    data = line[5:].strip()
    if data == b"[DONE]":
        return None
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"stream chunk is not a JSON object: {data[:80]!r}")
    return value


def _shape(value: Any, kind: type, where: str) -> Any:
    """``value`` when it is a ``kind``, else ``MalformedResponse`` (a provider error, so a
    fallback runs) naming the field; the stream's JSON is the upstream's, not ours to trust."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise MalformedResponse(f"{where} is {type(value).__name__}, not {kind.__name__}")


def _field(parent: dict[str, Any], name: str, kind: type) -> Any:
    """``parent[name]`` checked by ``_shape``; None when absent or null."""
    value = parent.get(name)
    return None if value is None else _shape(value, kind, name)


def _count(value: Any) -> int | None:
    """A token count from the upstream's usage: a whole number >= 0, else unknown (None)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _error_message(chunk: dict[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return str(error)[:300]


def _message_of(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return exc.message or json.dumps(body)[:300]
