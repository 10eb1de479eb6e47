"""Requests and results for every task. Field names follow the seed crate where it has them.

``InferenceResult``'s top-level keys are a public contract (the WebSocket ``infer`` result):
``text, tool_calls, trace_id, model_used, latency_ms, time_to_first_token_ms, usage``, plus
``bounding_boxes``, ``provider_output_items`` and ``thinking`` only when non-empty.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from .requests_base import _INT32, _INT64, Bool, Float, Int, _Input, _Model
from .requests_media import (
    GenerateImageRequest,
    GenerateImageResult,
    GenerateVideoRequest,
    GenerateVideoResult,
    SynthesizeRequest,
    SynthesizeResult,
    TranscribedSegment,
    TranscribedWord,
    TranscribeRequest,
    TranscribeResult,
    VideoMode,
)
from .schema import ModelCapability

__all__ = [
    "AudioBlock",
    "BoundingBox",
    "Classification",
    "ClassifyRequest",
    "ClassifyResult",
    "ContentBlock",
    "EmbedRequest",
    "EmbedResult",
    "GenerateImageRequest",
    "GenerateImageResult",
    "GenerateParams",
    "GenerateRequest",
    "GenerateVideoRequest",
    "GenerateVideoResult",
    "GroundRequest",
    "GroundResult",
    "ImageBlock",
    "InferenceResult",
    "IntentHint",
    "Message",
    "RerankRequest",
    "RerankResult",
    "RerankedDocument",
    "ResponseFormat",
    "RoutingWorkload",
    "SynthesizeRequest",
    "SynthesizeResult",
    "TaskHint",
    "TextBlock",
    "ThinkingMode",
    "TokenUsage",
    "TokenizeResult",
    "ToolCall",
    "TranscribeRequest",
    "TranscribeResult",
    "TranscribedSegment",
    "TranscribedWord",
    "VideoBlock",
    "VideoMode",
]


def _tool_name(tool: dict[str, Any]) -> str | None:
    """The function name a tool declares (``{type, function: {name}}`` or ``{name}``), if any."""
    fn = tool.get("function", tool)
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) and name else None


class _OmitEmpty(_Model):
    """Drops the fields named in ``omit_when_empty`` from the serialized form when they are empty."""

    omit_when_empty: ClassVar[tuple[str, ...]] = ()
    # Fields also left out when they hold their usual value (field -> that value).
    omit_when_usual: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self.omit_when_empty:
            if key in data and data[key] in (None, [], {}, ""):
                del data[key]
        for key, usual in self.omit_when_usual.items():
            if key in data and data[key] == usual:
                del data[key]
        return data


# --- content ------------------------------------------------------------------------------------


class TextBlock(_Model):
    type: Literal["text"] = "text"
    text: str


class _MediaBlock(_Model):
    """Media by ``url`` (http(s) or data: URL) or inline base64 ``data`` with ``media_type``."""

    url: str | None = None
    data: str | None = Field(default=None, description="base64")
    media_type: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> _MediaBlock:
        if self.data == "" and not self.url:  # an empty file: "give exactly one of" named fields
            raise ValueError("the media is empty (0 bytes)")
        if bool(self.url) == bool(self.data):
            raise ValueError("give exactly one of `url` or `data`")
        return self


class ImageBlock(_MediaBlock):
    type: Literal["image"] = "image"
    detail: Literal["auto", "low", "high"] | None = None


class AudioBlock(_MediaBlock):
    type: Literal["audio"] = "audio"


class VideoBlock(_MediaBlock):
    type: Literal["video"] = "video"


ContentBlock = Annotated[TextBlock | ImageBlock | AudioBlock | VideoBlock, Field(discriminator="type")]


class ToolCall(_OmitEmpty):
    """A function call the model asked for. ``arguments`` is the parsed JSON object; when the model
    produced JSON that does not parse, ``arguments`` is empty and ``invalid_arguments`` holds it."""

    omit_when_empty = ("invalid_arguments",)

    id: str | None = None
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    invalid_arguments: str | None = None


class Message(_Model):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentBlock] = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    # An assistant turn's opaque provider items, as a result's ``provider_output_items`` gave them
    # (Anthropic thinking blocks with signatures, which a tool loop with thinking must send back).
    provider_items: list[dict[str, Any]] = Field(default_factory=list)

    def text(self) -> str:
        """The message's text, media blocks left out."""
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    def media(self) -> list[ImageBlock | AudioBlock | VideoBlock]:
        if isinstance(self.content, str):
            return []
        return [b for b in self.content if not isinstance(b, TextBlock)]


# --- generation -----------------------------------------------------------------------------------


class ThinkingMode(StrEnum):
    ON = "on"
    OFF = "off"
    AUTO = "auto"


class RoutingWorkload(StrEnum):
    INTERACTIVE = "interactive"
    BACKGROUND = "background"


class TaskHint(StrEnum):
    CHAT = "chat"
    CODE = "code"
    REASONING = "reasoning"
    MATH = "math"
    SUMMARIZE = "summarize"
    EXTRACT = "extract"
    TOOL_USE = "tool_use"
    VISION = "vision"
    CREATIVE = "creative"
    TRANSLATE = "translate"


class IntentHint(_Model):
    """What the caller knows about the task: a family, a local-first wish, required capabilities."""

    task: TaskHint | None = None
    prefer_local: Bool = False
    require: list[ModelCapability] = Field(default_factory=list)


class ResponseFormat(_Model):
    """``json_object``, or ``json_schema`` with ``json_schema = {name, schema, strict}``."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and not (self.json_schema and "schema" in self.json_schema):
            raise ValueError("type json_schema needs json_schema = {name, schema}")
        return self


ToolChoice = Literal["auto", "none", "required"] | str
TOOL_CHOICE_MODES = ("auto", "none", "required")
# A request's most messages (15,000 held SmolLM2's chat template 14 s) and stops (500,000: 6.5 s).
MAX_MESSAGES, MAX_STOPS, MAX_STOP_CHARS = 4096, 256, 4096
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class GenerateParams(_Model):
    temperature: Float = Field(default=0.7, ge=0.0, le=2.0, description="0 means greedy")
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Int | None = Field(default=None, ge=0, le=_INT32)
    max_tokens: Int = Field(default=1024, ge=1, le=_INT32)
    stop: list[StopText] = Field(default_factory=list, max_length=MAX_STOPS)
    seed: Int | None = Field(default=None, ge=-_INT64 - 1, le=_INT64)
    repeat_penalty: Float = Field(default=1.0, gt=0.0)
    # OpenAI's: subtracted from a token's logit per earlier occurrence (frequency) or once it has
    # occurred (presence); sent to the models that take them (``ModelSchema.supports_param``).
    frequency_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    thinking: ThinkingMode = ThinkingMode.AUTO
    budget_tokens: Int = Field(default=0, ge=0, le=_INT32, description="extended-thinking budget; 0 = none")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    tool_choice: ToolChoice | None = Field(
        default=None, description="auto, none, required, or the name of one tool"
    )
    parallel_tool_calls: Bool | None = None
    workload: RoutingWorkload = RoutingWorkload.INTERACTIVE
    raw_prompt: Bool = Field(
        default=False, description="send `prompt` as-is, without the chat template (text completion)"
    )

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _named_function(cls, choice: Any) -> Any:
        """OpenAI's ``{"type": "function", "function": {"name": ...}}`` is the tool's name: over
        HTTP it was read so, and JSON-RPC said it "should be 'auto', 'none' or 'required'"."""
        if isinstance(choice, dict) and choice.get("type") == "function":
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if isinstance(name, str) and name:
                return name
        return choice

    @property
    def asks_thinking(self) -> bool:
        """Whether the request asks for reasoning: ``thinking=on``, or an effort other than none."""
        return self.thinking is ThinkingMode.ON or self.reasoning_effort not in (None, "none")


class GenerateRequest(_Input):
    """A text generation request. ``prompt`` alone, or ``messages`` (``prompt``, when also given,
    is appended as a last user turn). ``context`` is system text. ``model`` None means route."""

    prompt: str = ""
    messages: list[Message] | None = Field(default=None, max_length=MAX_MESSAGES)
    model: str | None = None
    params: GenerateParams = Field(default_factory=GenerateParams)
    context: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, description="OpenAI function schemas")
    images: list[ContentBlock] | None = None
    response_format: ResponseFormat | None = None
    cache_control: Bool = False
    intent: IntentHint | None = None

    @model_validator(mode="after")
    def _has_input(self) -> GenerateRequest:
        if not self.prompt and not self.messages:
            raise ValueError("a request needs a `prompt` or `messages`")
        if self.params.raw_prompt and not self.prompt:
            raise ValueError("raw_prompt sends `prompt` as it is: it needs a non-empty `prompt`")
        for i, tool in enumerate(self.tools or []):
            if not _tool_name(tool):
                raise ValueError(
                    f"tools[{i}] names no function: OpenAI's {{type: function, function: {{name, "
                    "parameters}}, or {name, parameters}"
                )
        if (choice := self.params.tool_choice) == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs `tools` to call one of")
        if choice not in (None, *TOOL_CHOICE_MODES) and choice not in self.tool_names():
            tools = ", ".join(self.tool_names()) or "none given"
            raise ValueError(
                f"tool_choice {choice!r} is neither auto, none, required nor a tool of ({tools})"
            )
        return self

    def calls_tools(self) -> bool:
        """Whether the model may call the request's tools: it has some, and ``tool_choice`` is not
        "none" (with "none" they are context only, and a model without tool support may answer,
        without them, as OpenAI's API answers in text)."""
        return bool(self.tools) and self.params.tool_choice != "none"

    def tool_names(self) -> list[str]:
        """The function names ``tools`` declares (OpenAI's ``{type, function: {name}}``, or ``{name}``)."""
        return [name for tool in self.tools or [] if (name := _tool_name(tool))]

    def chat_messages(self) -> list[Message]:
        """The conversation as messages: ``context`` as system, history, then ``prompt`` with
        ``images`` as the last user turn."""
        out: list[Message] = []
        if self.context:
            out.append(Message(role="system", content=self.context))
        out.extend(self.messages or [])
        if self.prompt or self.images:
            if self.images:
                blocks: list[Any] = [*self.images]
                if self.prompt:
                    blocks.insert(0, TextBlock(text=self.prompt))
                out.append(Message(role="user", content=blocks))
            else:
                out.append(Message(role="user", content=self.prompt))
        return out

    def media_types(self) -> set[str]:
        """Which media kinds (image, audio, video) the request carries."""
        kinds: set[str] = {b.type for b in self.images or [] if b.type != "text"}
        for m in self.messages or []:
            kinds.update(b.type for b in m.media())
        return kinds

    def has_tools(self) -> bool:
        return bool(self.tools)

    def text_for_analysis(self) -> str:
        """All user-visible text, for complexity assessment and token estimates."""
        parts = [self.context or ""]
        parts.extend(m.text() for m in self.messages or [])
        parts.append(self.prompt)
        return "\n".join(p for p in parts if p)

    def last_user_text(self) -> str:
        if self.prompt:
            return self.prompt
        for m in reversed(self.messages or []):
            if m.role == "user":
                return m.text()
        return ""


class TokenUsage(_Model):
    """Token counts and cost, never negative: a runner answering ``prompt_tokens: -5`` reached
    the metrics' counters, which raised, and its caller got a 500 (now the runner's answer is
    invalid: a 502 naming it)."""

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)
    context_window: int = Field(default=0, ge=0)
    cost_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cached_prompt_tokens: int | None = Field(default=None, ge=0)
    # Prompt tokens the provider wrote to its cache on this call (Anthropic bills them above its
    # input price); part of prompt_tokens, like cached_prompt_tokens.
    cache_write_prompt_tokens: int | None = Field(default=None, ge=0)
    needs_compaction: bool = False


class BoundingBox(_OmitEmpty):
    omit_when_empty = ("score",)

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    score: float | None = None  # the detector's confidence, where it gives one (OCR)


class InferenceResult(_OmitEmpty):
    omit_when_empty = ("bounding_boxes", "provider_output_items", "thinking", "finish_reason")
    omit_when_usual: ClassVar[dict[str, Any]] = {"finish_reason": "stop"}

    text: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    bounding_boxes: list[BoundingBox] = Field(default_factory=list)
    trace_id: str
    model_used: str
    latency_ms: float
    time_to_first_token_ms: float | None = None
    usage: TokenUsage | None = None
    provider_output_items: list[dict[str, Any]] = Field(default_factory=list)
    thinking: str | None = None
    # Why generation stopped, in OpenAI's words (stop, length, tool_calls, content_filter), when
    # the backend said. Serialized only when it is not "stop": a cut answer (length) is visible
    # while the locked keys of an ordinary answer stay as they were.
    finish_reason: str | None = None
    # How the engine got here (routing decision, attempts); not part of the wire contract.
    _routing: Any = PrivateAttr(default=None)

    def has_tool_calls(self) -> bool:
        return bool(self.tool_calls)

    @property
    def routing(self) -> Any:
        return self._routing


# --- other tasks ----------------------------------------------------------------------------------


class EmbedRequest(_Input):
    texts: list[str]
    model: str | None = None
    is_query: Bool = False
    instruction: str | None = None
    normalize: Bool = True
    # A text longer than the model's window: its first tokens up to the window are embedded and
    # its index is in the result's ``truncated`` (True, what sentence-transformers and llama.cpp
    # do), or the request is InvalidInput naming it (False, as OpenAI's API answers).
    truncate: Bool = True

    @field_validator("texts")
    @classmethod
    def _texts(cls, texts: list[str]) -> list[str]:
        """Nothing to embed, or an empty text, is the caller's mistake (OpenAI's API refuses both):
        a model gives an empty text a vector all the same, which matches other texts by chance."""
        if not texts:
            raise ValueError("must hold at least one text")
        if (empty := next((i for i, t in enumerate(texts) if not t), None)) is not None:
            raise ValueError(f"item {empty} is empty; every text to embed needs at least one character")
        return texts


class EmbedResult(_Model):
    embeddings: list[list[float]]
    model_used: str
    dimensions: int
    prompt_tokens: int | None = None
    # The texts cut at the model's window (their indices): only their beginning was embedded.
    truncated: list[int] = Field(default_factory=list)


class RerankRequest(_Input):
    query: str = Field(min_length=1)  # an empty one ranked every document by chance, answered 200
    documents: list[str]
    model: str | None = None
    top_n: Int | None = Field(default=None, ge=0)
    instruction: str | None = None


class RerankedDocument(_Model):
    index: int
    score: float
    document: str


class RerankResult(_Model):
    ranked: list[RerankedDocument]
    model_used: str | None = None
    method: str | None = None


class ClassifyRequest(_Input):
    text: str = Field(min_length=1)  # an empty one was classified all the same, answered 200
    labels: list[str] = Field(min_length=1)
    model: str | None = None
    method: Literal["auto", "likelihood", "embedding"] = "auto"


class ClassifyResult(_Model):
    label: str
    score: float


class Classification(_Model):
    """Labels sorted by score, best first; scores sum to 1."""

    results: list[ClassifyResult]
    model_used: str
    method: str

    @property
    def label(self) -> str:
        return self.results[0].label


class TokenizeResult(_Model):
    model_used: str
    tokens: list[int]
    text: str | None = None


class GroundRequest(_Input):
    prompt: str
    image: ImageBlock
    model: str | None = None


class GroundResult(_Model):
    boxes: list[BoundingBox]  # in pixels of the input image
    raw_text: str
    model_used: str | None = None
    width: int | None = None  # the input image's size, which the boxes are in
    height: int | None = None
