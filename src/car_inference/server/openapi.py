"""The HTTP API's OpenAPI 3.1 document, served at ``/openapi.json``.

The routes are plain Starlette routes that read their bodies by hand (``translate.py``,
``media.py``), so FastAPI cannot see them; the bodies are described here as pydantic models, field
for field what the translation accepts (with the same bounds as ``GenerateParams``). Unknown
top-level fields are ignored, as OpenAI-compatible servers commonly do, so the request objects
allow extra properties. ``tests/server/test_openapi.py`` runs schemathesis against this document
and checks that no request it describes (or breaks) gets a 5xx.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from ..requests import IntentHint, RoutingWorkload, ThinkingMode

__all__ = ["openapi_schema"]

_INT32 = 2**31 - 1
_INT64 = 2**63 - 1

ModelName = Annotated[
    str | None,
    Field(description="a model id, name or alias; `auto` or omitted lets the router choose"),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- chat ---------------------------------------------------------------------------------------------


class TextPart(_Part):
    type: Literal["text"]
    text: str


class RefusalPart(_Part):
    type: Literal["refusal"]
    refusal: str


class ImageUrl(_Part):
    url: str = Field(description="an http(s) URL or a base64 data: URL")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Part):
    data: str = Field(description="base64 audio")
    format: str = Field(
        default="wav", description="wav, mp3, flac, ogg, opus, aac, m4a, webm or aiff (OpenAI: wav, mp3)"
    )


class AudioPart(_Part):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | RefusalPart | ImagePart | AudioPart, Field(discriminator="type")]


class FunctionCall(_Part):
    name: str
    arguments: str | dict[str, Any] = Field(description="the arguments as a JSON text (or object)")


class ChatToolCall(_Part):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(
        default=None, description="text, or content parts (media parts in user messages only)"
    )
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = Field(default=None, description="assistant messages")
    tool_call_id: str | None = Field(default=None, description="required in tool messages")


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON Schema object")


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatBody(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, description="with type json_schema")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _Sampling(_Body):
    """What chat and text completions share."""

    model: ModelName = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=_INT32, description="extension")
    seed: int | None = Field(default=None, ge=-_INT64 - 1, le=_INT64)
    max_tokens: int | None = Field(default=None, ge=1, le=_INT32)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_INT32)
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0, description="extension")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    thinking: ThinkingMode | None = Field(default=None, description="extension")
    workload: RoutingWorkload | None = Field(default=None, description="extension")
    n: Literal[1] | None = Field(default=None, description="only 1")
    logprobs: Literal[False] | None = Field(default=None, description="not supported")
    top_logprobs: Literal[0] | None = Field(default=None, description="not supported")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    intent: IntentHint | None = Field(default=None, description="extension: routing hints")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatBody | None = None


class CompletionRequest(_Sampling):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="the text to continue, as-is (no chat template)")
    suffix: None = Field(default=None, description="not supported")
    echo: Literal[False] | None = Field(default=None, description="not supported")
    best_of: Literal[1] | None = Field(default=None, description="only 1")


# --- other tasks ------------------------------------------------------------------------------------------


class EmbeddingsRequest(_Body):
    input: Annotated[str, Field()] | Annotated[list[str], Field(min_length=1)]
    model: ModelName = None
    encoding_format: Literal["float", "base64"] | None = None
    is_query: bool | None = Field(default=None, description="extension: embed as a search query")
    instruction: str | None = Field(default=None, description="extension: the query instruction")


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


class RerankBody(_Body):
    query: str
    documents: list[str | RerankDocument]
    model: ModelName = None
    top_n: int | None = Field(default=None, ge=0)
    instruction: str | None = None
    return_documents: bool | None = None


class RouteRequest(ChatCompletionRequest):
    record: bool = Field(default=True, description="keep a pending trace to report on with /v1/feedback")


class FeedbackRequest(_Body):
    trace_id: str = Field(min_length=1, description="an answer's trace id (x-car-trace-id)")
    score: float | None = Field(
        default=None, ge=0, le=1, description="0 (bad) to 1 (good); with success false: 0"
    )
    success: bool = Field(
        default=True, description="false: a /v1/route decision's call failed (no answer to score)"
    )
    latency_ms: float | None = Field(
        default=None,
        ge=0,
        description="a /v1/route decision's call, as its caller measured it (else unknown)",
    )
    output_tokens: int | None = Field(default=None, ge=0, description="ditto: teaches answer lengths")
    cost_usd: float | None = Field(default=None, ge=0, description="ditto: into the spend ledger")


class SpeechRequest(_Body):
    input: str = Field(min_length=1)
    model: ModelName = None
    voice: str | None = None
    response_format: Literal["wav", "mp3", "flac", "pcm"] | None = None
    speed: float | None = Field(default=None, ge=0.1, le=10.0)
    instructions: str | None = None


class ImageRequest(_Body):
    prompt: str = Field(min_length=1)
    model: ModelName = None
    response_format: Literal["b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    size: str | None = Field(default=None, pattern=r"^(auto|\d{1,5}x\d{1,5})$")
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=-_INT64 - 1, le=_INT64)
    n: int | None = Field(default=None, ge=1, le=_INT32)
    steps: int | None = Field(default=None, ge=1, le=_INT32, description="local models")
    guidance: float | None = Field(default=None, description="local models")


class ImageEditForm(BaseModel):
    # Form fields are text (images.py): `image` and `prompt` are required.
    image: bytes = Field(json_schema_extra={"format": "binary"}, description="the image (or `image[]`s)")
    prompt: str = Field(min_length=1)
    mask: bytes = Field(default=b"", json_schema_extra={"format": "binary"})
    model: str = ""
    n: str = Field(default="", description="how many images")
    size: str = ""
    output_format: Literal["png", "jpeg", "webp"] = "png"


class VideoForm(BaseModel):
    # Form fields are text (images.py); the same fields may come as a JSON object.
    prompt: str = Field(min_length=1)
    model: str = ""
    seconds: str = ""
    size: str = ""
    input_reference: bytes = Field(default=b"", json_schema_extra={"format": "binary"})
    fps: str = ""
    seed: str = ""
    steps: str = ""
    guidance: str = ""
    negative_prompt: str = ""


class TranscriptionForm(BaseModel):
    # Form fields are text: none is nullable, and only `file` is required.
    file: bytes = Field(json_schema_extra={"format": "binary"}, description="the audio file")
    model: str = ""
    language: str = Field(default="", description="an ISO 639-1 code; empty = detect")
    prompt: str = ""
    response_format: Literal["json", "text", "verbose_json"] = "json"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class GroundImage(_Part):
    data: str | None = Field(
        default=None, description="the image's bytes in base64 (PNG, JPEG, GIF, WebP, BMP)"
    )
    url: str | None = Field(default=None, description="a data: or http(s) URL")
    media_type: str | None = None


class GroundBody(_Part):
    prompt: str = Field(description="what to find in the image, e.g. `the red car`")
    image: str | GroundImage = Field(description='a data: or http(s) URL, or `{"data": base64}`')
    model: ModelName = None


_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    RerankBody,
    RouteRequest,
    FeedbackRequest,
    SpeechRequest,
    ImageRequest,
    ImageEditForm,
    VideoForm,
    TranscriptionForm,
    GroundBody,
    ErrorResponse,
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


_JSON_ANY = {"application/json": {"schema": {"type": "object"}}}
_ERROR_BODY = {"application/json": {"schema": _ref(ErrorResponse)}}
_ERRORS = {
    "4XX": {"description": "the request was refused", "content": _ERROR_BODY},
    "5XX": {"description": "the server or a model failed", "content": _ERROR_BODY},
}


def _operation(summary: str, body: type[BaseModel] | None = None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "success", "content": extra.pop("content", _JSON_ANY)}}
        | _ERRORS,
    }
    if body is not None:
        media = extra.pop("media", "application/json")
        op["requestBody"] = {"required": True, "content": {media: {"schema": _ref(body)}}}
    return op | extra


def _paths() -> dict[str, Any]:
    stream = _JSON_ANY | {"text/event-stream": {"schema": {"type": "string"}}}
    binary = {"schema": {"type": "string", "format": "binary"}}
    audio = {f"audio/{kind}": binary for kind in ("wav", "mpeg", "flac", "pcm")}
    text = {"text/plain": {"schema": {"type": "string"}}}
    model_id = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    model_query = [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}]
    video_id = [{"name": "video_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    chat = _operation("chat completion (stream: server-sent events)", ChatCompletionRequest, content=stream)
    return {
        "/v1/chat/completions": {"post": chat},
        "/v1/completions": {"post": _operation("text completion", CompletionRequest, content=stream)},
        "/v1/embeddings": {"post": _operation("embeddings", EmbeddingsRequest)},
        "/v1/rerank": {"post": _operation("rerank documents against a query", RerankBody)},
        "/v1/feedback": {"post": _operation("score an answer by its trace id", FeedbackRequest)},
        "/v1/route": {"post": _operation("the router's decision for a request, nothing run", RouteRequest)},
        "/v1/models": {"get": _operation("the models, and `auto` (the router)")},
        "/v1/models/{model_id}": {"get": _operation("one model by id, name or alias", parameters=model_id)},
        "/v1/audio/speech": {"post": _operation("text to speech", SpeechRequest, content=audio)},
        "/v1/audio/transcriptions": {
            "post": _operation("speech to text", TranscriptionForm, media="multipart/form-data")
        },
        "/v1/audio/voices": {
            "get": _operation("the voices a text-to-speech model takes", parameters=model_query)
        },
        "/v1/images/generations": {"post": _operation("image generation", ImageRequest)},
        "/v1/images/edits": {"post": _operation("image edit", ImageEditForm, media="multipart/form-data")},
        "/v1/videos": {"post": _operation("start a video job", VideoForm, media="multipart/form-data")},
        "/v1/videos/{video_id}": {
            "get": _operation("a video job's status and progress", parameters=video_id),
            "delete": _operation("forget a video job", parameters=video_id),
        },
        "/v1/videos/{video_id}/content": {
            "get": _operation("a finished video (mp4)", content={"video/mp4": binary}, parameters=video_id)
        },
        "/v1/ground": {"post": _operation("boxes for a target in an image, in its pixels", GroundBody)},
        "/v1/health": {"get": _operation("the engine's model health report")},
        "/health": {"get": _operation("liveness", security=[])},  # open: the only route without a key
        "/metrics": {"get": _operation("Prometheus metrics", content=text)},
    }


def openapi_schema(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API (JSON-RPC at ``/ws`` is in docs/protocol.md)."""
    _, defs = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}"
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "car-inference",
            "version": version,
            "description": "An OpenAI-compatible API over local and remote models with an adaptive "
            "router. Send `Authorization: Bearer <key>` when the server has API keys.",
        },
        "paths": _paths(),
        # Declared for every operation (generated clients then send the key); /health needs none.
        "security": [{"bearer": []}],
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
