"""Request conversion the hosted-API backends share: the conversation, tools, sampling and
thinking plans, media blocks, usage. Pure functions of our request types; no SDK, no network."""

from __future__ import annotations

import base64
import json
import math
import mimetypes
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from ..errors import UnsupportedMode
from ..requests import (
    AudioBlock,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    Message,
    ResponseFormat,
    ThinkingMode,
    TokenUsage,
    VideoBlock,
)
from ..schema import GenerateParam, ModelSchema

__all__ = [
    "FunctionSpec",
    "Media",
    "ThinkingPlan",
    "conversation",
    "effort_for_budget",
    "function_specs",
    "json_instruction",
    "media_of",
    "normalized",
    "sampling",
    "thinking_plan",
    "tool_choice_of",
    "unit_vector",
    "usage_of",
    "with_system",
]


# --- request conversion helpers -----------------------------------------------------------------


def usage_of(
    prompt: int | None,
    completion: int | None,
    total: int | None,
    cached: int | None,
    written: int | None = None,
) -> TokenUsage:
    """A provider's counts as ``TokenUsage``; a negative one (a broken OpenAI-compatible server)
    counts as 0 rather than failing an answer that arrived. ``written``: tokens written to the
    provider's prompt cache (Anthropic's cache creation)."""
    prompt, completion = max(prompt or 0, 0), max(completion or 0, 0)
    return TokenUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=max(total or 0, 0) or prompt + completion,
        cached_prompt_tokens=None if cached is None else max(cached, 0),
        cache_write_prompt_tokens=None if written is None else max(written, 0),
    )


def normalized(messages: list[Message]) -> list[Message]:
    """Messages with every tool call given an id and every tool result tied to one: a missing
    ``tool_call_id`` takes the next unanswered call of the assistant turn before it."""
    out: list[Message] = []
    pending: list[str] = []
    counter = 0
    for message in messages:
        update: dict[str, Any] = {}
        if message.role == "assistant" and message.tool_calls:
            calls = []
            for call in message.tool_calls:
                calls.append(call if call.id else call.model_copy(update={"id": f"call_{counter}"}))
                counter += 1
            pending = [c.id for c in calls if c.id]
            update["tool_calls"] = calls
        elif message.role == "tool":
            if message.tool_call_id is None and pending:
                update["tool_call_id"] = pending.pop(0)
            elif message.tool_call_id in pending:
                pending.remove(message.tool_call_id)
        out.append(message.model_copy(update=update) if update else message)
    return out


def conversation(request: GenerateRequest) -> tuple[str, list[Message]]:
    """(system text, the other messages normalized): system turns anywhere join into one text."""
    system: list[str] = []
    rest: list[Message] = []
    for message in normalized(request.chat_messages()):
        if message.role == "system":
            if message.text():
                system.append(message.text())
        else:
            rest.append(message)
    return "\n\n".join(system), rest


def json_instruction(fmt: ResponseFormat | None) -> str | None:
    """A system instruction asking for JSON, for models without a native JSON mode."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema:
        schema = json.dumps(fmt.json_schema["schema"], separators=(",", ":"))
        return f"Respond only with a JSON value that validates against this JSON Schema: {schema}"
    return "Respond only with a single JSON object, no prose and no code fences."


def with_system(system: str, extra: str | None) -> str:
    return "\n\n".join(p for p in (system, extra) if p)


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str
    parameters: dict[str, Any]


def function_specs(tools: list[dict[str, Any]] | None) -> list[FunctionSpec]:
    """OpenAI function schemas (``{"type": "function", "function": {...}}`` or the bare function)."""
    specs = []
    for tool in tools or []:
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UnsupportedMode("tool-use", "remote", f"a tool needs a function name: {str(tool)[:80]}")
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        specs.append(FunctionSpec(fn["name"], fn.get("description") or "", parameters))
    return specs


def tool_choice_of(params: GenerateParams) -> tuple[str, str | None] | None:
    """("auto" | "none" | "required", None) or ("named", tool name); None when not given."""
    choice = params.tool_choice
    if choice is None or choice in ("auto", "none", "required"):
        return None if choice is None else (choice, None)
    return "named", choice


# --- sampling and thinking ----------------------------------------------------------------------


def sampling(
    model: ModelSchema, params: GenerateParams, *, thinking: bool = False
) -> dict[GenerateParam, Any]:
    """The sampling values to send, each only when the model takes it: temperature (not while
    thinking, which fixes it), top_p when not 1, top_k when set, max_tokens capped by the model's
    output limit, stop when non-empty, seed when set, the frequency and presence penalties when
    not 0."""
    out: dict[GenerateParam, Any] = {}

    def put(param: GenerateParam, value: Any) -> None:
        if value is not None and model.supports_param(param):
            out[param] = value

    if not thinking:
        put(GenerateParam.TEMPERATURE, params.temperature)
        put(GenerateParam.TOP_K, params.top_k)
    put(GenerateParam.TOP_P, params.top_p if params.top_p != 1.0 else None)
    max_tokens = params.max_tokens
    if model.max_output_tokens:
        max_tokens = min(max_tokens, model.max_output_tokens)
    put(GenerateParam.MAX_TOKENS, max_tokens)
    put(GenerateParam.STOP, list(params.stop) or None)
    put(GenerateParam.SEED, params.seed)
    put(GenerateParam.FREQUENCY_PENALTY, params.frequency_penalty or None)
    put(GenerateParam.PRESENCE_PENALTY, params.presence_penalty or None)
    return out


@dataclass(frozen=True)
class ThinkingPlan:
    """What the request wants from reasoning: ``mode`` "default" (send nothing), "on" or "off";
    ``effort`` low/medium/high (minimal when asked, else derived from the budget) and the
    ``budget`` tokens given (0 when none)."""

    mode: str
    effort: str | None = None
    budget: int = 0


def effort_for_budget(budget: int) -> str:
    """A token budget as an effort level: < 2,048 low, < 8,000 medium, else high (the engine's
    automatic budget for complex tasks is 8,000)."""
    return "low" if budget < 2048 else "medium" if budget < 8000 else "high"


def thinking_plan(model: ModelSchema, params: GenerateParams) -> ThinkingPlan:
    """Thinking is on when asked (``thinking=on``), or in ``auto`` when a budget or an effort is
    given; off when ``thinking=off``; otherwise the provider's default. Models that declare
    neither extended_thinking nor reasoning_effort get no thinking parameters at all."""
    if not model.has_thinking_mode():
        return ThinkingPlan("default")
    if params.thinking is ThinkingMode.OFF:
        return ThinkingPlan("off")
    budget = params.budget_tokens
    effort = params.reasoning_effort or (effort_for_budget(budget) if budget else None)
    if params.thinking is ThinkingMode.ON or budget or params.reasoning_effort:
        return ThinkingPlan("on", effort, budget)
    return ThinkingPlan("default")


# --- media --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """A media block resolved: inline base64 ``data`` (data: URLs decoded) or an http(s) ``url``."""

    kind: str  # image | audio | video
    media_type: str | None
    data: str | None = None
    url: str | None = None

    def raw(self) -> bytes:
        return base64.b64decode(self.data or "")


_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<body>.*)$", re.DOTALL)


def media_of(block: ImageBlock | AudioBlock | VideoBlock, backend: str) -> Media:
    if block.data:
        return Media(block.type, block.media_type, data=block.data)
    url = block.url or ""
    match = _DATA_URL.match(url)
    if match:
        body = match.group("body")
        if ";base64" in match.group("params").lower():
            data = re.sub(r"\s+", "", body)
        else:
            data = base64.b64encode(unquote_to_bytes(body)).decode()
        return Media(block.type, match.group("type") or block.media_type, data=data)
    if url.startswith(("http://", "https://")):
        guessed = mimetypes.guess_type(url.split("?", 1)[0])[0]
        return Media(block.type, block.media_type or guessed, url=url)
    raise UnsupportedMode(f"{block.type}-input", backend, f"a {block.type} URL must be http(s) or data:")


def unit_vector(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector
