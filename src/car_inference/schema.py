"""Model descriptions: what a model can do, where it lives, what it costs. Types only, no I/O.

A ``ModelSchema`` is catalog data. Its ``source`` is a discriminated union on ``kind``; the engine
picks a backend by that kind, so adding an OpenAI-compatible host is data, not code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ALL_CAPABILITIES",
    "TASK_CAPABILITIES",
    "AnthropicSource",
    "ApiProtocol",
    "CostModel",
    "DelegatedSource",
    "DiffusersSource",
    "ElevenLabsSource",
    "GeminiSource",
    "GenerateParam",
    "GgufSource",
    "HostConfig",
    "ModelCapability",
    "ModelSchema",
    "ModelSource",
    "OllamaSource",
    "OpenAISource",
    "PerformanceEnvelope",
    "PiperSource",
    "SentenceSource",
    "VllmSource",
    "WhisperSource",
]


class ModelCapability(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"
    CLASSIFY = "classify"
    RERANK = "rerank"
    GROUNDING = "grounding"
    CODE = "code"
    REASONING = "reasoning"
    SUMMARIZE = "summarize"
    TOOL_USE = "tool_use"
    MULTI_TOOL_CALL = "multi_tool_call"
    VISION = "vision"
    SPEECH_TO_TEXT = "speech_to_text"
    TEXT_TO_SPEECH = "text_to_speech"
    IMAGE_GENERATION = "image_generation"
    VIDEO_GENERATION = "video_generation"


ALL_CAPABILITIES: tuple[ModelCapability, ...] = tuple(ModelCapability)
# Capabilities that are a task of their own, with a backend method (see backends.base.TASK_PROTOCOLS);
# the others (vision, tool_use, code...) qualify generation.
TASK_CAPABILITIES: frozenset[ModelCapability] = frozenset(
    {
        ModelCapability.GENERATE,
        ModelCapability.EMBED,
        ModelCapability.RERANK,
        ModelCapability.CLASSIFY,
        ModelCapability.SPEECH_TO_TEXT,
        ModelCapability.TEXT_TO_SPEECH,
        ModelCapability.IMAGE_GENERATION,
        ModelCapability.VIDEO_GENERATION,
    }
)


class GenerateParam(StrEnum):
    """Request parameters a model accepts. An empty ``supported_params`` means the usual set."""

    TEMPERATURE = "temperature"
    TOP_P = "top_p"
    TOP_K = "top_k"
    MAX_TOKENS = "max_tokens"
    STOP = "stop"
    SEED = "seed"
    TOOLS = "tools"
    TOOL_CHOICE = "tool_choice"
    PARALLEL_TOOL_CALLS = "parallel_tool_calls"
    RESPONSE_FORMAT = "response_format"
    EXTENDED_THINKING = "extended_thinking"
    REASONING_EFFORT = "reasoning_effort"
    CACHE_CONTROL = "cache_control"


class ApiProtocol(StrEnum):
    OPENAI_CHAT = "openai_chat"
    ANTHROPIC_MESSAGES = "anthropic_messages"
    GEMINI = "gemini"
    ELEVENLABS = "elevenlabs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sources ------------------------------------------------------------------------------------


class _LocalFiles(_Strict):
    """Where local weights are: a path, a resource inside an installed package, or an HF repo."""

    path: str | None = None
    package: str | None = Field(default=None, description="importable package holding the files")
    resource: str | None = Field(default=None, description="file or folder inside `package`")
    hf_repo: str | None = Field(default=None, description="Hugging Face repo to pull from")
    revision: str | None = None

    @model_validator(mode="after")
    def _one_location(self) -> _LocalFiles:
        if not (self.path or self.package or self.hf_repo):
            raise ValueError("needs one of `path`, `package` or `hf_repo`")
        return self


class GgufSource(_LocalFiles):
    """A GGUF file run in-process by llama.cpp."""

    kind: Literal["gguf"] = "gguf"
    filename: str | None = Field(default=None, description="file within `hf_repo` to pull")
    mmproj: str | None = Field(default=None, description="vision projector file, for VL models")
    pooling: str | None = Field(default=None, description="embedding pooling: mean, cls, last")
    system_prompt: str | None = Field(
        default=None, description="system text for requests that bring none (a tiny model answers better)"
    )
    managed: bool = Field(default=False, description="served by a llama.cpp server we start, not in-process")


class SentenceSource(_LocalFiles):
    """A sentence-transformers model directory: a bi-encoder or a cross-encoder."""

    kind: Literal["sentence"] = "sentence"
    cross_encoder: bool = False


class PiperSource(_LocalFiles):
    """A Piper ONNX voice (``resource`` or ``filename`` names the .onnx file)."""

    kind: Literal["piper"] = "piper"
    filename: str | None = None


class WhisperSource(_Strict):
    """A CTranslate2 Whisper model for faster-whisper. ``packages`` lists installed packages whose
    ``data`` folders together hold the model, with ``model.bin`` split into ``.partN`` files."""

    kind: Literal["whisper"] = "whisper"
    path: str | None = None
    packages: list[str] = Field(default_factory=list)
    hf_repo: str | None = None

    @model_validator(mode="after")
    def _one_location(self) -> WhisperSource:
        if not (self.path or self.packages or self.hf_repo):
            raise ValueError("needs one of `path`, `packages` or `hf_repo`")
        return self


class DiffusersSource(_LocalFiles):
    """A diffusers pipeline folder (``model_index.json`` and its components) run in-process."""

    kind: Literal["diffusers"] = "diffusers"
    dtype: str | None = Field(default=None, description="torch dtype on a GPU; the CPU runs float32")
    allow_patterns: list[str] = Field(default_factory=list, description="files to pull (default: all)")
    ignore_patterns: list[str] = Field(default_factory=list, description="files a pull skips")


class RapidOcrSource(_LocalFiles):
    """RapidOCR's ONNX text detector and recogniser (grounds text targets), in-process."""

    kind: Literal["rapidocr"] = "rapidocr"


class _RemoteApi(_Strict):
    """A hosted API. ``host`` names an entry of the catalog's ``[hosts]`` table, which supplies
    ``base_url`` and ``api_key_env`` unless the model sets them itself."""

    host: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    model_name: str | None = Field(default=None, description="the name on the wire")
    headers: dict[str, str] = Field(default_factory=dict)


class OpenAISource(_RemoteApi):
    """Any server speaking OpenAI Chat Completions: OpenAI, OpenRouter, Groq, vLLM, LM Studio..."""

    kind: Literal["openai"] = "openai"
    needs_key: bool = True


class AnthropicSource(_RemoteApi):
    kind: Literal["anthropic"] = "anthropic"


class GeminiSource(_RemoteApi):
    kind: Literal["gemini"] = "gemini"


class ElevenLabsSource(_RemoteApi):
    kind: Literal["elevenlabs"] = "elevenlabs"


class OllamaSource(_Strict):
    """A model served by an Ollama host, reached through its OpenAI-compatible ``/v1``."""

    kind: Literal["ollama"] = "ollama"
    host: str = "http://127.0.0.1:11434"
    model_tag: str
    managed: bool = Field(default=False, description="start `ollama serve` if it is not running")


class VllmSource(_Strict):
    """A model served by a vLLM (or other OpenAI-compatible) server we may start and supervise."""

    kind: Literal["vllm"] = "vllm"
    endpoint: str = "http://127.0.0.1:8000"
    model_name: str
    api_key_env: str | None = None
    hf_repo: str | None = Field(default=None, description="what `vllm serve` loads, if we start it")
    managed: bool = Field(default=False, description="we start `vllm serve` on first use")


class DelegatedSource(_Strict):
    """Inference done by a runner the host application registers at run time."""

    kind: Literal["delegated"] = "delegated"
    hint: str | None = None


ModelSource = Annotated[
    GgufSource
    | SentenceSource
    | PiperSource
    | WhisperSource
    | DiffusersSource
    | RapidOcrSource
    | OpenAISource
    | AnthropicSource
    | GeminiSource
    | ElevenLabsSource
    | OllamaSource
    | VllmSource
    | DelegatedSource,
    Field(discriminator="kind"),
]

IN_PROCESS_KINDS = frozenset({"gguf", "sentence", "piper", "whisper", "diffusers", "rapidocr"})
SERVER_KINDS = frozenset({"ollama", "vllm"})
REMOTE_KINDS = frozenset({"openai", "anthropic", "gemini", "elevenlabs"})


class HostConfig(_Strict):
    """Connection data for a hosted API, shared by the models that name it."""

    protocol: ApiProtocol = ApiProtocol.OPENAI_CHAT
    base_url: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    description: str | None = None


# --- money and speed ------------------------------------------------------------------------------


class CostModel(_Strict):
    """List prices in USD per million tokens (or per unit for speech and media), and disk size."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None
    per_1k_characters: float | None = Field(default=None, description="text-to-speech")
    per_minute: float | None = Field(default=None, description="speech-to-text")
    per_image: float | None = None
    size_mb: int | None = None

    def estimate(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        """USD for a call; ``cached_input_tokens`` (part of ``input_tokens``) at the cached price."""
        cached = min(cached_input_tokens, input_tokens)
        cached_price = (
            self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        )
        fresh = input_tokens - cached
        return (
            fresh * self.input_per_mtok + cached * cached_price + output_tokens * self.output_per_mtok
        ) / 1e6


class PerformanceEnvelope(_Strict):
    latency_p50_ms: float | None = None
    tokens_per_second: float | None = None
    time_to_first_token_ms: float | None = None


# --- the model ------------------------------------------------------------------------------------


class ModelSchema(BaseModel):
    """One model in the catalog. ``id`` is ``provider/name:variant``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    provider: str
    family: str = ""
    description: str = ""
    capabilities: list[ModelCapability] = Field(min_length=1)
    source: ModelSource
    context_length: int = Field(default=0, ge=0, description="0 when not applicable")
    max_output_tokens: int | None = None
    supported_params: list[GenerateParam] = Field(default_factory=list)
    cost: CostModel = Field(default_factory=CostModel)
    performance: PerformanceEnvelope = Field(default_factory=PerformanceEnvelope)
    quality: float | None = Field(default=None, ge=0.0, le=1.0, description="prior, 0..1")
    tags: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    default_params: dict[str, Any] = Field(
        default_factory=dict,
        description="sampling defaults this model works best with; a request's explicit values win",
    )
    query_instruction: str | None = Field(
        default=None, description="embedding models: default instruction for `is_query` texts"
    )
    prices_as_of: str | None = None
    fallbacks: list[str] = Field(
        default_factory=list,
        description="models to try, in order, when this one fails: the only fallbacks a request "
        "naming this model gets; an adaptive choice of it tries them before the router's",
    )
    # Computed by the registry (file present, package installed, key set, endpoint configured).
    available: bool = False

    _local_kinds: ClassVar[frozenset[str]] = IN_PROCESS_KINDS | SERVER_KINDS

    @model_validator(mode="after")
    def _check_id(self) -> ModelSchema:
        if "/" not in self.id:
            raise ValueError(f"id {self.id!r} must look like provider/name[:variant]")
        return self

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def is_local(self) -> bool:
        """Runs on this machine: in-process or on a server we reach (vLLM, Ollama)."""
        return self.source.kind in self._local_kinds

    @property
    def is_remote(self) -> bool:
        return not self.is_local

    @property
    def in_process(self) -> bool:
        return self.source.kind in IN_PROCESS_KINDS

    def has_capability(self, capability: ModelCapability | str) -> bool:
        return ModelCapability(capability) in self.capabilities

    def supports_param(self, param: GenerateParam) -> bool:
        """An empty ``supported_params`` list means the model takes the usual parameters,
        except extended thinking and reasoning effort, which must be declared."""
        if not self.supported_params:
            return param not in (GenerateParam.EXTENDED_THINKING, GenerateParam.REASONING_EFFORT)
        return param in self.supported_params

    @property
    def size_mb(self) -> int | None:
        return self.cost.size_mb

    def summary(self) -> dict[str, Any]:
        """The columns `car models list` shows."""
        return {
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "kind": self.kind,
            "capabilities": [c.value for c in self.capabilities],
            "context_length": self.context_length,
            "local": self.is_local,
            "available": self.available,
        }
