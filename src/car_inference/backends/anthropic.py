"""Anthropic Messages through the official ``anthropic`` SDK (source kind ``anthropic``).

Request mapping (a parameter goes out only when ``ModelSchema.supports_param`` says so):

- messages: system turns (and ``context``) join into ``system``; user turns take text and images
  (base64 inline; http(s) URLs as URL sources; data: URLs decoded to base64); audio and video are
  ``UnsupportedMode``. Assistant tool calls become ``tool_use`` blocks and tool messages
  ``tool_result`` blocks in a user turn; consecutive turns of one role are merged, as the API
  wants all results of one assistant turn in the next user turn.
- ``max_tokens`` always (the API requires it); ``stop`` as ``stop_sequences``; temperature, top_p
  (when not 1) and top_k in the request body (the SDK has no arguments for them; current Claude
  models refuse them, and the catalog does not declare them there). Seed: Anthropic has none.
- tools as ``{name, description, input_schema}``; ``tool_choice`` auto -> ``{"type": "auto"}``,
  none -> ``{"type": "none"}``, required -> ``{"type": "any"}``, a name -> ``{"type": "tool",
  "name": ...}``; ``parallel_tool_calls=false`` -> ``disable_parallel_tool_use: true``.
- JSON: ``json_schema`` -> ``output_config.format = {"type": "json_schema", "schema": ...}`` on
  models declaring ``response_format``; ``json_object`` (no native form) and models without
  ``response_format`` get a system instruction.
- thinking, on models declaring ``extended_thinking``:
  - adaptive models (they also declare ``reasoning_effort``): ``thinking=on`` / a budget / an
    effort -> ``thinking: {"type": "adaptive"}`` and ``output_config.effort`` (explicit
    ``reasoning_effort`` wins, minimal -> low; else from the budget: < 2,048 low, < 8,000
    medium, else high); ``thinking=off`` -> ``output_config.effort = "low"`` (several of these
    models keep adaptive thinking always on and refuse ``disabled``) and thinking text dropped.
  - budget models: ``thinking=on`` -> ``{"type": "enabled", "budget_tokens": max(1024, budget)}``
    (no budget given: 2,048 / 8,000 / 16,000 for low / medium (default) / high effort) with
    ``max_tokens`` raised above the budget; ``thinking=off`` -> ``{"type": "disabled"}``.
  While thinking, temperature and top_k are not sent (the API fixes them).
  Thinking text streams as ``ThinkingDelta`` events, kept apart from the answer.
- ``cache_control`` (models declaring it): ``{"type": "ephemeral"}`` on the system prompt and on
  the last block of the last user turn.
- usage: ``prompt_tokens`` = input + cache read + cache creation tokens (Anthropic's
  ``input_tokens`` leaves cached ones out), ``cached_prompt_tokens`` = cache read tokens,
  ``cache_write_prompt_tokens`` = cache creation tokens (priced at ``cache_write_per_mtok``). Stop
  reasons in OpenAI's words: end_turn/stop_sequence -> stop, max_tokens -> length, tool_use ->
  tool_calls, refusal -> content_filter.

- thinking blocks (``thinking`` with its ``signature``, ``redacted_thinking``) of an answer come
  back as ``provider_output_items``; an assistant ``Message`` carrying them in ``provider_items``
  sends them first in its turn, as the API requires of a tool loop with thinking on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

try:
    import anthropic
    import httpx2
except ImportError as exc:  # pragma: no cover - the backend table checks this first
    raise ImportError(
        "the Anthropic backend needs anthropic: pip install 'car-inference[anthropic]'"
    ) from exc

from ..errors import ProviderError, UnsupportedMode
from ..requests import GenerateRequest, Message, TextBlock
from ..schema import AnthropicSource, GenerateParam, ModelSchema
from ..stream import StreamEvent, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart, UsageEvent
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
    ThinkingPlan,
    conversation,
    function_specs,
    json_instruction,
    media_of,
    sampling,
    thinking_plan,
    tool_choice_of,
    usage_of,
    with_system,
)

__all__ = ["AnthropicBackend"]

_EPHEMERAL = {"type": "ephemeral"}
_THINKING_BLOCKS = ("thinking", "redacted_thinking")
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_BUDGET_FOR_EFFORT = {"minimal": 1024, "low": 2048, "medium": 8000, "high": 16000}
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}


class AnthropicBackend(RemoteBackend):
    kind = "anthropic"
    source_types = (AnthropicSource,)
    assistant_prefill = True  # a final assistant turn is continued, not answered

    def make_client(self, endpoint: Endpoint, key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=key,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=httpx2.Timeout(self.settings.timeout_s, connect=self.settings.connect_timeout_s),
            default_headers=dict(endpoint.headers) or None,
        )

    # --- request -------------------------------------------------------------------------------

    def build(self, model: ModelSchema, endpoint: Endpoint, request: GenerateRequest) -> dict[str, Any]:
        params = request.params
        plan = thinking_plan(model, params)
        thinking_on = plan.mode == "on"
        system, turns = conversation(request)
        fmt = request.response_format
        native_json = (
            fmt is not None
            and fmt.type == "json_schema"
            and model.supports_param(GenerateParam.RESPONSE_FORMAT)
        )
        system = with_system(system, None if native_json else json_instruction(fmt))
        cache = request.cache_control and model.supports_param(GenerateParam.CACHE_CONTROL)
        body: dict[str, Any] = {"model": endpoint.wire_model, "messages": self._turns(turns, cache)}
        if system:
            block: dict[str, Any] = {"type": "text", "text": system}
            if cache:
                block["cache_control"] = dict(_EPHEMERAL)
            body["system"] = [block]
        extra: dict[str, Any] = {}
        chosen = sampling(model, params, thinking=thinking_on)
        body["max_tokens"] = chosen.pop(GenerateParam.MAX_TOKENS, None) or params.max_tokens
        for param, value in chosen.items():
            if param is GenerateParam.STOP:
                body["stop_sequences"] = value
            elif param in (GenerateParam.TEMPERATURE, GenerateParam.TOP_P, GenerateParam.TOP_K):
                extra[param.value] = value
        output_config: dict[str, Any] = {}
        self._thinking(model, plan, body, output_config, params.max_tokens)
        if native_json and fmt is not None and fmt.json_schema:
            output_config["format"] = {"type": "json_schema", "schema": fmt.json_schema["schema"]}
        if output_config:
            body["output_config"] = output_config
        self._tools(model, request, body)
        if extra:
            body["extra_body"] = extra
        return body

    @staticmethod
    def _thinking(
        model: ModelSchema,
        plan: ThinkingPlan,
        body: dict[str, Any],
        output_config: dict[str, Any],
        asked: int,
    ) -> None:
        if plan.mode == "default":
            return
        if model.supports_param(GenerateParam.REASONING_EFFORT):  # adaptive thinking, effort levels
            if plan.mode == "on" and model.supports_param(GenerateParam.EXTENDED_THINKING):
                body["thinking"] = {"type": "adaptive"}
            effort = "low" if plan.mode == "off" else plan.effort
            if effort is not None:
                output_config["effort"] = "low" if effort == "minimal" else effort
        elif plan.mode == "on":
            budget = max(1024, plan.budget or _BUDGET_FOR_EFFORT[plan.effort or "medium"])
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            if body["max_tokens"] <= budget:
                body["max_tokens"] = budget + asked
        else:
            body["thinking"] = {"type": "disabled"}

    def _tools(self, model: ModelSchema, request: GenerateRequest, body: dict[str, Any]) -> None:
        if not request.tools:
            return
        if not model.supports_param(GenerateParam.TOOLS):
            if not request.calls_tools():
                return  # tool_choice "none": the tools are context only, and this model answers without
            raise UnsupportedMode("tool-use", self.kind, f"{model.id} takes no tools")
        body["tools"] = [
            {"name": s.name, "description": s.description, "input_schema": s.parameters}
            for s in function_specs(request.tools)
        ]
        choice = tool_choice_of(request.params)
        tool_choice: dict[str, Any] | None = None
        if choice is not None and model.supports_param(GenerateParam.TOOL_CHOICE):
            kind, name = choice
            tool_choice = {
                "auto": {"type": "auto"},
                "none": {"type": "none"},
                "required": {"type": "any"},
            }.get(kind, {"type": "tool", "name": name})
        parallel = request.params.parallel_tool_calls
        if parallel is False and model.supports_param(GenerateParam.PARALLEL_TOOL_CALLS):
            tool_choice = tool_choice or {"type": "auto"}
            if tool_choice["type"] != "none":
                tool_choice["disable_parallel_tool_use"] = True
        if tool_choice is not None:
            body["tool_choice"] = tool_choice

    def _turns(self, messages: list[Message], cache: bool) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = []
        for message in messages:
            role = "assistant" if message.role == "assistant" else "user"
            blocks = self._blocks(message)
            if not blocks:
                continue
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"].extend(blocks)
            else:
                turns.append({"role": role, "content": blocks})
        if cache:
            for turn in reversed(turns):
                if turn["role"] == "user":
                    turn["content"][-1]["cache_control"] = dict(_EPHEMERAL)
                    break
        return turns

    def _blocks(self, message: Message) -> list[dict[str, Any]]:
        if message.role == "tool":
            return [
                {"type": "tool_result", "tool_use_id": message.tool_call_id or "", "content": message.text()}
            ]
        if isinstance(message.content, str):
            blocks: list[dict[str, Any]] = (
                [{"type": "text", "text": message.content}] if message.content else []
            )
        else:
            blocks = [
                {"type": "text", "text": b.text} if isinstance(b, TextBlock) else self._image(b)
                for b in message.content
                if not (isinstance(b, TextBlock) and not b.text)
            ]
        if message.role == "assistant":
            # The turn's thinking blocks go first, as they came: a tool loop with thinking on
            # must send them back, signatures intact.
            thinking = [dict(i) for i in message.provider_items if i.get("type") in _THINKING_BLOCKS]
            blocks = thinking + blocks
            blocks += [
                {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
                for call in message.tool_calls
            ]
        return blocks

    def _image(self, block: Any) -> dict[str, Any]:
        media = media_of(block, self.kind)
        if media.kind != "image":
            raise UnsupportedMode(f"{media.kind}-input", self.kind, f"the Messages API takes no {media.kind}")
        if media.url is not None:
            return {"type": "image", "source": {"type": "url", "url": media.url}}
        media_type = (media.media_type or "image/png").lower()
        if media_type not in _IMAGE_TYPES:
            raise UnsupportedMode(
                "image-input", self.kind, f"images must be jpeg, png, gif or webp, not {media_type}"
            )
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": media.data}}

    # --- response ------------------------------------------------------------------------------

    async def events(
        self,
        client: anthropic.AsyncAnthropic,
        endpoint: Endpoint,
        model: ModelSchema,
        payload: dict[str, Any],
    ) -> AsyncGenerator[StreamEvent | Finish | ProviderItems, None]:
        stream = await client.messages.create(**payload, stream=True)
        tools: dict[int, int] = {}  # content block index -> tool call index
        kept: dict[int, dict[str, Any]] = {}  # content block index -> thinking block to send back
        counts = {"input": 0, "output": 0, "read": 0, "created": 0}
        finished = False
        stop_reason: str | None = None
        kind = "first"
        try:
            async for event in stream:
                kind = event.type
                if kind == "message_start":
                    _count(counts, event.message.usage)
                elif kind == "content_block_start":
                    block = event.content_block
                    if block.type == "tool_use":
                        tools[event.index] = len(tools)
                        yield ToolCallStart(index=tools[event.index], id=block.id, name=block.name)
                        if block.input:
                            yield ToolCallDelta(index=tools[event.index], arguments=json.dumps(block.input))
                    elif block.type == "text" and block.text:
                        yield TextDelta(text=block.text)
                    elif block.type == "thinking":
                        kept[event.index] = {
                            "type": "thinking",
                            "thinking": block.thinking or "",
                            "signature": getattr(block, "signature", "") or "",
                        }
                        if block.thinking:
                            yield ThinkingDelta(text=block.thinking)
                    elif block.type == "redacted_thinking":
                        kept[event.index] = {"type": "redacted_thinking", "data": block.data}
                elif kind == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta":
                        yield TextDelta(text=delta.text)
                    elif delta.type == "thinking_delta":
                        if event.index in kept:
                            kept[event.index]["thinking"] += delta.thinking
                        yield ThinkingDelta(text=delta.thinking)
                    elif delta.type == "signature_delta" and event.index in kept:
                        kept[event.index]["signature"] += delta.signature
                    elif delta.type == "input_json_delta" and delta.partial_json and event.index in tools:
                        yield ToolCallDelta(index=tools[event.index], arguments=delta.partial_json)
                elif kind == "message_delta":
                    _count(counts, event.usage)
                    stop_reason = event.delta.stop_reason or stop_reason
                elif kind == "message_stop":
                    finished = True
        except (AttributeError, TypeError, KeyError) as exc:
            # The SDK builds events without validating them: a field the event must carry came as
            # None or another type. The provider's malformed answer, not a bug of ours (a 500).
            raise MalformedResponse(f"a malformed {kind} event ({type(exc).__name__}: {exc})") from exc
        finally:
            await stream.close()
        if not finished:
            raise StreamIncomplete("no message_stop")
        if stop_reason is not None:
            yield Finish(_FINISH.get(stop_reason, stop_reason))
        if kept:
            yield ProviderItems([kept[i] for i in sorted(kept)])
        prompt = counts["input"] + counts["read"] + counts["created"]
        usage = usage_of(prompt, counts["output"], None, counts["read"], counts["created"])
        yield UsageEvent(usage=usage)

    def translate(
        self, exc: Exception, endpoint: Endpoint, model: ModelSchema, key: str
    ) -> ProviderError | None:
        where: ErrorSite = {"provider": endpoint.provider, "model": model.id, "secrets": [key]}
        if isinstance(exc, anthropic.APIStatusError):
            return status_error(exc.status_code, _message_of(exc), headers=exc.response.headers, **where)
        if isinstance(exc, anthropic.APIConnectionError):  # timeouts included
            return transport_error(exc.__cause__ or exc, connection=True, **where)
        if isinstance(exc, anthropic.APIError):  # an error event inside an accepted stream
            return status_error(200, _message_of(exc), **where)
        return transport_error(exc, **where)


def _count(counts: dict[str, int], usage: Any) -> None:
    """Fold a usage object in: later events repeat or raise the counts, never lower them."""
    if usage is None:
        return
    for name, attr in (
        ("input", "input_tokens"),
        ("output", "output_tokens"),
        ("read", "cache_read_input_tokens"),
        ("created", "cache_creation_input_tokens"),
    ):
        value = getattr(usage, attr, None)
        if isinstance(value, int):
            counts[name] = max(counts[name], value)


def _message_of(exc: anthropic.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return exc.message
