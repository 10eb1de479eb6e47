"""Gemini generateContent through the official ``google-genai`` SDK (source kind ``gemini``).

The client gets ``HttpOptions(base_url, timeout in milliseconds, retry attempts=1)``; a base URL
ending in ``/v1beta`` (or another version) selects that API version, else the SDK's default.

Request mapping (a parameter goes out only when ``ModelSchema.supports_param`` says so):

- messages: system turns (and ``context``) as ``system_instruction``; user turns as text parts and
  inline media (images, audio and video as ``inline_data``: base64 and data: URLs decoded; http(s)
  URLs as ``file_data`` with the media type given or guessed from the URL, else
  ``UnsupportedMode``). Assistant tool calls become ``function_call`` parts (role ``model``) with
  their thought signature: the one the answer gave (``provider_output_items`` entries of type
  ``thought_signature``, passed back in the message's ``provider_items``), else Google's
  documented placeholder;
  tool messages become ``function_response`` parts named after their call (a JSON object result is
  sent as is, other text as ``{"result": text}``).
- temperature, top_p (when not 1), top_k, ``max_output_tokens``, ``stop_sequences``, seed.
- tools as ``function_declarations`` (JSON schema parameters; automatic function calling off);
  ``tool_choice`` auto/none/required -> ``function_calling_config.mode`` AUTO/NONE/ANY, a name ->
  ANY with ``allowed_function_names``. Gemini has no switch for parallel calls: it is ignored.
- JSON: ``response_mime_type = application/json``, plus ``response_json_schema`` for json_schema;
  models without ``response_format`` get a system instruction instead.
- thinking (models declaring ``extended_thinking`` or ``reasoning_effort``): ``thinking=on`` / a
  budget / an effort -> ``thinking_config`` with ``include_thoughts`` and ``thinking_level`` (an
  explicit ``reasoning_effort`` on models declaring it; minimal -> LOW, as Gemini 3.8 Flash
  refuses MINIMAL) or ``thinking_budget`` (the budget given); ``thinking=off`` -> ``thinking_level
  = LOW`` on models with levels (Gemini 3 cannot switch thinking off), ``thinking_budget = 0``
  otherwise, and thought text dropped. Thought parts stream as ``ThinkingDelta`` events.
- usage: ``completion_tokens`` = candidates + thoughts tokens (both bill as output);
  ``cached_prompt_tokens`` = ``cached_content_token_count``. Finish reasons: STOP -> stop (or
  tool_calls after a function call), MAX_TOKENS -> length, SAFETY and the like -> content_filter.
- errors: a 429's wait comes from Retry-After or the error's ``RetryInfo.retryDelay``; transport
  errors the SDK leaves unwrapped (``httpx2.ReadTimeout``, ``RemoteProtocolError``) are caught too.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncGenerator
from typing import Any

try:
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types
except ImportError as exc:  # pragma: no cover - the backend table checks this first
    raise ImportError("the Gemini backend needs google-genai: pip install 'car-inference[gemini]'") from exc

from ..errors import ProviderError, UnsupportedMode
from ..requests import EmbedRequest, EmbedResult, GenerateRequest, Message, TextBlock
from ..schema import GeminiSource, GenerateParam, ModelSchema
from ..stream import StreamEvent, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart, UsageEvent
from .gemini_media import GeminiMediaMixin
from .gemini_video import interaction_connection_failed, interaction_status_error
from .remote import (
    Endpoint,
    ErrorSite,
    Finish,
    ProviderItems,
    RemoteBackend,
    StreamIncomplete,
    parse_retry_after,
    status_error,
    transport_error,
)
from .wire import (
    ThinkingPlan,
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

__all__ = ["GeminiBackend"]

# Google's documented stand-in for a thought signature the caller did not keep.
_SKIP_SIGNATURE = base64.urlsafe_b64decode("skip_thought_signature_validator")
_VERSIONED = re.compile(r"^(?P<base>.*?)/(?P<version>v\d+(?:alpha|beta)?\d*)/?$")
_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY", "named": "ANY"}


class GeminiBackend(GeminiMediaMixin, RemoteBackend):  # images: gemini_media.py
    kind = "gemini"
    source_types = (GeminiSource,)

    def make_client(self, endpoint: Endpoint, key: str) -> genai.Client:
        base_url, version = endpoint.base_url, None
        match = _VERSIONED.match(base_url or "")
        if match:
            base_url, version = match.group("base"), match.group("version")
        options = types.HttpOptions(
            base_url=base_url,
            api_version=version,
            headers=dict(endpoint.headers) or None,
            timeout=int(self.settings.timeout_s * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        # The cache keeps this Client alive: a collected Client closes its HTTP client.
        return genai.Client(api_key=key, http_options=options)

    # --- request -------------------------------------------------------------------------------

    def build(self, model: ModelSchema, endpoint: Endpoint, request: GenerateRequest) -> dict[str, Any]:
        params = request.params
        plan = thinking_plan(model, params)
        system, turns = conversation(request)
        fmt = request.response_format
        wants_json = fmt is not None and fmt.type != "text"
        native_json = wants_json and model.supports_param(GenerateParam.RESPONSE_FORMAT)
        system = with_system(system, None if native_json else json_instruction(fmt))
        config: dict[str, Any] = {}
        if system:
            config["system_instruction"] = system
        names = {
            GenerateParam.MAX_TOKENS: "max_output_tokens",
            GenerateParam.STOP: "stop_sequences",
        }
        for param, value in sampling(model, params).items():
            config[names.get(param, param.value)] = value
        if native_json and fmt is not None:
            config["response_mime_type"] = "application/json"
            if fmt.type == "json_schema" and fmt.json_schema:
                config["response_json_schema"] = fmt.json_schema["schema"]
        thinking = self._thinking(model, plan)
        if thinking is not None:
            config["thinking_config"] = thinking
        self._tools(model, request, config)
        return {
            "model": endpoint.wire_model,
            "contents": self._contents(turns),
            "config": types.GenerateContentConfig(**config),
        }

    @staticmethod
    def _thinking(model: ModelSchema, plan: ThinkingPlan) -> types.ThinkingConfig | None:
        levels = model.supports_param(GenerateParam.REASONING_EFFORT)
        if plan.mode == "off":
            if levels:
                return types.ThinkingConfig(thinking_level=types.ThinkingLevel.LOW)
            return types.ThinkingConfig(thinking_budget=0)
        if plan.mode != "on":
            return None
        if levels and plan.effort:
            level = "LOW" if plan.effort == "minimal" else plan.effort.upper()
            return types.ThinkingConfig(include_thoughts=True, thinking_level=types.ThinkingLevel(level))
        if plan.budget and model.supports_param(GenerateParam.EXTENDED_THINKING):
            return types.ThinkingConfig(include_thoughts=True, thinking_budget=plan.budget)
        return types.ThinkingConfig(include_thoughts=True)

    def _tools(self, model: ModelSchema, request: GenerateRequest, config: dict[str, Any]) -> None:
        if not request.tools:
            return
        if not model.supports_param(GenerateParam.TOOLS):
            if not request.calls_tools():
                return  # tool_choice "none": the tools are context only, and this model answers without
            raise UnsupportedMode("tool-use", self.kind, f"{model.id} takes no tools")
        declarations = [
            types.FunctionDeclaration(
                name=s.name, description=s.description, parameters_json_schema=s.parameters
            )
            for s in function_specs(request.tools)
        ]
        config["tools"] = [types.Tool(function_declarations=declarations)]
        config["automatic_function_calling"] = types.AutomaticFunctionCallingConfig(disable=True)
        choice = tool_choice_of(request.params)
        if choice is not None and model.supports_param(GenerateParam.TOOL_CHOICE):
            kind, name = choice
            calling = types.FunctionCallingConfig(
                mode=types.FunctionCallingConfigMode(_MODES[kind]),
                allowed_function_names=[name] if name else None,
            )
            config["tool_config"] = types.ToolConfig(function_calling_config=calling)

    def _contents(self, messages: list[Message]) -> list[types.Content]:
        names: dict[str, str] = {}
        contents: list[types.Content] = []
        for message in messages:
            role = "model" if message.role == "assistant" else "user"
            parts = self._parts(message, names)
            if not parts:
                continue
            if contents and contents[-1].role == role:
                contents[-1].parts = [*(contents[-1].parts or []), *parts]
            else:
                contents.append(types.Content(role=role, parts=parts))
        return contents

    def _parts(self, message: Message, names: dict[str, str]) -> list[types.Part]:
        if message.role == "tool":
            name = message.name or names.get(message.tool_call_id or "", "tool")
            text = message.text()
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            response = value if isinstance(value, dict) else {"result": text}
            return [
                types.Part(
                    function_response=types.FunctionResponse(
                        id=message.tool_call_id, name=name, response=response
                    )
                )
            ]
        parts: list[types.Part] = []
        blocks = [TextBlock(text=message.content)] if isinstance(message.content, str) else message.content
        for block in blocks:
            if isinstance(block, TextBlock):
                if block.text:
                    parts.append(types.Part(text=block.text))
            else:
                parts.append(self._media(block))
        signed = {
            item.get("call_id"): item["signature"]
            for item in message.provider_items
            if item.get("type") == "thought_signature" and isinstance(item.get("signature"), str)
        }
        for call in message.tool_calls if message.role == "assistant" else []:
            names[call.id or ""] = call.name
            function_call = types.FunctionCall(id=call.id, name=call.name, args=call.arguments)
            kept = signed.get(call.id)
            signature = base64.b64decode(kept) if kept else _SKIP_SIGNATURE
            parts.append(types.Part(function_call=function_call, thought_signature=signature))
        return parts

    def _media(self, block: Any) -> types.Part:
        media = media_of(block, self.kind)
        if not media.media_type:
            raise UnsupportedMode(f"{media.kind}-input", self.kind, "Gemini needs the media type of a URL")
        if media.url is not None:
            return types.Part(file_data=types.FileData(file_uri=media.url, mime_type=media.media_type))
        return types.Part(inline_data=types.Blob(data=media.raw(), mime_type=media.media_type))

    # --- response ------------------------------------------------------------------------------

    async def events(
        self, client: genai.Client, endpoint: Endpoint, model: ModelSchema, payload: dict[str, Any]
    ) -> AsyncGenerator[StreamEvent | Finish | ProviderItems, None]:
        stream = await client.aio.models.generate_content_stream(**payload)
        calls = 0
        signatures: list[dict[str, Any]] = []  # of function calls, to send back with them
        finish: str | None = None
        usage = None
        try:
            async for chunk in stream:
                if chunk.usage_metadata is not None:
                    usage = chunk.usage_metadata
                if not chunk.candidates:
                    feedback = chunk.prompt_feedback
                    if feedback is not None and feedback.block_reason:
                        raise _Blocked(str(feedback.block_reason))
                    continue
                candidate = chunk.candidates[0]
                for part in (candidate.content.parts if candidate.content else None) or []:
                    if part.text:
                        yield ThinkingDelta(text=part.text) if part.thought else TextDelta(text=part.text)
                    if part.function_call is not None:
                        call = part.function_call
                        call_id = call.id or f"call_{calls}"
                        if part.thought_signature:
                            signatures.append(
                                {
                                    "type": "thought_signature",
                                    "call_id": call_id,
                                    "signature": base64.b64encode(part.thought_signature).decode(),
                                }
                            )
                        yield ToolCallStart(index=calls, id=call_id, name=call.name or "")
                        yield ToolCallDelta(index=calls, arguments=json.dumps(call.args or {}))
                        calls += 1
                if candidate.finish_reason is not None:
                    finish = _finish(str(candidate.finish_reason.value), calls > 0)
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        if finish is None:
            raise StreamIncomplete("no finish_reason")
        yield Finish(finish)
        if signatures:
            yield ProviderItems(signatures)
        if usage is not None:
            completion = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
            yield UsageEvent(
                usage=usage_of(
                    usage.prompt_token_count,
                    completion,
                    usage.total_token_count,
                    usage.cached_content_token_count,
                )
            )

    def translate(
        self, exc: Exception, endpoint: Endpoint, model: ModelSchema, key: str
    ) -> ProviderError | None:
        where: ErrorSite = {"provider": endpoint.provider, "model": model.id, "secrets": [key]}
        if isinstance(exc, _Blocked):
            return ProviderError(f"the prompt was blocked: {exc}", provider=endpoint.provider, model=model.id)
        if (answered := interaction_status_error(exc)) is not None:  # the Interactions API (video)
            status, message, headers = answered
            return status_error(status, message, headers=headers, **where)
        if interaction_connection_failed(exc):
            return transport_error(exc, connection=True, **where)
        if isinstance(exc, genai_errors.APIError):
            status = exc.code if isinstance(exc.code, int) else 200
            if status == 400 and _key_refused(exc):
                status = 401  # Gemini refuses a bad key with 400 INVALID_ARGUMENT: the key, not the input
            headers = getattr(exc.response, "headers", None)
            return status_error(
                status,
                str(exc.message or exc.status),
                headers=headers,
                retry_after=_retry_delay(exc),
                **where,
            )
        return transport_error(exc, **where)

    # --- embeddings ----------------------------------------------------------------------------

    async def embed(self, model: ModelSchema, request: EmbedRequest) -> EmbedResult:
        task = "RETRIEVAL_QUERY" if request.is_query else "RETRIEVAL_DOCUMENT"

        async def call(client: genai.Client, endpoint: Endpoint) -> Any:
            return await client.aio.models.embed_content(
                model=endpoint.wire_model,
                contents=[types.Content(parts=[types.Part(text=t)]) for t in request.texts],
                config=types.EmbedContentConfig(task_type=task),
            )

        if not request.texts:
            return EmbedResult(embeddings=[], model_used=model.id, dimensions=0)
        response = await self.with_keys(model, call)
        vectors = [list(e.values or []) for e in response.embeddings or []]
        if request.normalize:
            vectors = [unit_vector(v) for v in vectors]
        return EmbedResult(
            embeddings=vectors, model_used=model.id, dimensions=len(vectors[0]) if vectors else 0
        )


_FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}


def _finish(reason: str, called: bool) -> str:
    """Gemini's finish reason in OpenAI's words; STOP after a function call is ``tool_calls``."""
    if reason == "STOP":
        return "tool_calls" if called else "stop"
    if reason == "MAX_TOKENS":
        return "length"
    return "content_filter" if reason in _FILTERED else reason.lower()


class _Blocked(Exception):
    """The prompt was refused before any candidate (``prompt_feedback.block_reason``)."""


def _key_refused(exc: genai_errors.APIError) -> bool:
    """A 400 whose ``ErrorInfo`` reason is ``API_KEY_INVALID`` (or whose message says so)."""
    details = exc.details if isinstance(exc.details, dict) else {}
    error = details.get("error", details)
    items = error.get("details", []) if isinstance(error, dict) else []
    reasons = {item.get("reason") for item in items if isinstance(item, dict)}
    return "API_KEY_INVALID" in reasons or "API key not valid" in str(exc.message or "")


def _retry_delay(exc: genai_errors.APIError) -> float | None:
    """Gemini puts the wait in the error's ``RetryInfo`` detail (``"retryDelay": "13s"``)."""
    details = exc.details if isinstance(exc.details, dict) else {}
    error = details.get("error", details)
    for item in error.get("details", []) if isinstance(error, dict) else []:
        delay = item.get("retryDelay") if isinstance(item, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            return parse_retry_after(delay[:-1])
    return None
