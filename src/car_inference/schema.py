"""Model descriptions: what a model can do, where it lives, what it costs. Types only, no I/O.

A ``ModelSchema`` is catalog data. Its ``source`` is a discriminated union on ``kind`` whose members
are the source classes of the table of kinds (``kinds.py``; the classes are in ``sources.py``); the
engine picks a backend by that kind, so adding an OpenAI-compatible host is data, not code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .kinds import ApiProtocol, KindSpec, Locality, load_kinds
from .sources import (
    AnthropicSource,
    DelegatedSource,
    DiffusersSource,
    ElevenLabsSource,
    GeminiSource,
    GgufSource,
    OllamaSource,
    OpenAISource,
    PiperSource,
    RapidOcrSource,
    RemoteApiSource,
    SentenceSource,
    VllmSource,
    WhisperSource,
)

__all__ = [
    "ALL_CAPABILITIES",
    "KINDS",
    "NAMED_ONLY",
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
    "RapidOcrSource",
    "RemoteApiSource",
    "SentenceSource",
    "VllmSource",
    "WhisperSource",
    "http_url",
]


# A model with this tag is served only when a request names it: the router never picks it for a
# request without a model (an operator's choice in models.toml, and every model a WebSocket
# client brings with runner.register unless [server] route_client_models is on).
NAMED_ONLY = "named-only"


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
    FREQUENCY_PENALTY = "frequency_penalty"
    PRESENCE_PENALTY = "presence_penalty"
    TOOLS = "tools"
    TOOL_CHOICE = "tool_choice"
    PARALLEL_TOOL_CALLS = "parallel_tool_calls"
    RESPONSE_FORMAT = "response_format"
    EXTENDED_THINKING = "extended_thinking"
    REASONING_EFFORT = "reasoning_effort"
    CACHE_CONTROL = "cache_control"


# --- sources: the union of every kind in the table (kinds.py) ----------------------------------

# Every kind, built-in and from plugins (read here, once: the union below is fixed from then on).
KINDS: dict[str, KindSpec] = load_kinds()

if TYPE_CHECKING:  # the type checker sees the built-in classes; the runtime union is the table's
    ModelSource = (
        GgufSource | SentenceSource | PiperSource | WhisperSource | DiffusersSource | RapidOcrSource
        | OpenAISource | AnthropicSource | GeminiSource | ElevenLabsSource | OllamaSource | VllmSource
        | DelegatedSource
    )  # fmt: skip
else:
    ModelSource = Annotated[Union[tuple(s.source for s in KINDS.values())], Field(discriminator="kind")]  # noqa: UP007

IN_PROCESS_KINDS = frozenset(k for k, s in KINDS.items() if s.locality is Locality.IN_PROCESS)
SERVER_KINDS = frozenset(k for k, s in KINDS.items() if s.locality is Locality.SERVER)
REMOTE_KINDS = frozenset(k for k, s in KINDS.items() if s.locality is Locality.REMOTE)
RUNNER_KINDS = frozenset(k for k, s in KINDS.items() if s.locality is Locality.RUNNER)
# The wire protocols a [hosts] entry may declare: those of the kinds that have one.
PROTOCOLS = frozenset(str(s.protocol) for s in KINDS.values() if s.protocol)


_RemoteApi = RemoteApiSource  # its former name here


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostConfig(_Strict):
    """Connection data for a hosted API, shared by the models that name it. ``protocol``, when
    set, is the wire protocol the host speaks: a model naming the host must be of a kind that
    speaks it (checked when the catalog loads)."""

    protocol: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    description: str | None = None

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str | None) -> str | None:
        if value is not None and value not in PROTOCOLS:
            raise ValueError(f"unknown protocol {value!r}; known: {', '.join(sorted(PROTOCOLS))}")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        # "not a url" was taken, its models available and routed to, failing at each request
        return None if url is None else http_url(url, "a host's base_url")


def http_url(url: str, what: str) -> str:
    """``url`` stripped, when it is an http(s) URL with a host; else a ValueError naming ``what``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} is an http:// or https:// URL, not {url!r}")
    return url.strip()


# --- money and speed ------------------------------------------------------------------------------


# A price or a measure of a model: a minus sign in models.toml was taken, and the router's
# log10(cost) failed every routed request with a 500 (a negative speed: -25,000 ms, and chosen).
Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Measure = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class CostModel(_Strict):
    """List prices in USD per million tokens (or per unit for speech and media), and disk size."""

    input_per_mtok: Price = 0.0
    output_per_mtok: Price = 0.0
    cached_input_per_mtok: Price | None = None
    cache_write_per_mtok: Price | None = Field(
        default=None,
        description="prompt tokens written to the provider's cache (Anthropic: 1.25x input); unset: input",
    )
    per_1k_characters: Price | None = Field(default=None, description="text-to-speech")
    per_minute: Price | None = Field(default=None, description="speech-to-text")
    per_image: Price | None = None
    per_second: Price | None = Field(default=None, description="video generation, per second of video")
    max_video_seconds: Measure | None = Field(
        default=None,
        description="video: the longest clip of a model that picks its own length (spend checks assume it)",
    )
    size_mb: int | None = Field(default=None, ge=0)

    def estimate(
        self,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        written_input_tokens: int = 0,
    ) -> float:
        """USD for a call; ``cached_input_tokens`` (read from the provider's cache) and
        ``written_input_tokens`` (written to it), both part of ``input_tokens``, at their prices."""
        cached = min(cached_input_tokens, input_tokens)
        written = min(written_input_tokens, input_tokens - cached)
        fresh = input_tokens - cached - written
        return (
            fresh * self.input_per_mtok
            + cached * _or(self.cached_input_per_mtok, self.input_per_mtok)
            + written * _or(self.cache_write_per_mtok, self.input_per_mtok)
            + output_tokens * self.output_per_mtok
        ) / 1e6


def _or(price: float | None, otherwise: float) -> float:
    return otherwise if price is None else price


class PerformanceEnvelope(_Strict):
    latency_p50_ms: Measure | None = None
    tokens_per_second: Measure | None = None
    time_to_first_token_ms: Measure | None = None


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
    # Token counts a client can hold in a number (a client's runner model of 10**30 tokens was
    # listed to every client as such).
    context_length: int = Field(default=0, ge=0, lt=2**31, description="0 when not applicable")
    max_output_tokens: int | None = Field(default=None, ge=1, lt=2**31)
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

    @model_validator(mode="after")
    def _check_id(self) -> ModelSchema:
        if "/" not in self.id:
            raise ValueError(f"id {self.id!r} must look like provider/name[:variant]")
        return self

    @property
    def kind(self) -> str:
        return self.source.kind

    def lookup_keys(self) -> list[str]:
        """The names the registry finds this model by (lower case): id, name, id without its
        variant, id without its provider (with and without the variant), aliases."""
        if NAMED_ONLY in self.tags:  # served only when named: by its whole id (a client's model
            return [self.id.lower()]  # "app/gpt-4" took the bare "gpt-4" of other clients)
        base = self.id.split(":", 1)[0]
        short = self.id.split("/", 1)[1]
        keys = [self.id, self.name, base, short, short.split(":", 1)[0], *self.aliases]
        return [k.lower() for k in keys]

    @property
    def spec(self) -> KindSpec:
        """The table's entry for this model's kind (kinds.py)."""
        return KINDS[self.source.kind]

    @property
    def is_local(self) -> bool:
        """Runs on this machine: in-process or on a server we reach (vLLM, Ollama)."""
        return self.spec.locality.is_local

    @property
    def is_remote(self) -> bool:
        return not self.is_local

    @property
    def in_process(self) -> bool:
        return self.spec.locality is Locality.IN_PROCESS

    def has_capability(self, capability: ModelCapability | str) -> bool:
        return ModelCapability(capability) in self.capabilities

    def require(self, capability: ModelCapability | str, what: str = "") -> None:
        """``UnsupportedMode`` (the request's fault: a 400) when the model does not declare
        ``capability``; ``what`` prefixes the reason (the call it refuses)."""
        if not self.has_capability(capability):
            from .errors import UnsupportedMode

            why = f"{self.id} does not declare {ModelCapability(capability)}"
            raise UnsupportedMode(
                str(ModelCapability(capability)), self.kind, f"{what}: {why}" if what else why
            )

    def supports_param(self, param: GenerateParam) -> bool:
        """An empty ``supported_params`` list means the model takes the usual parameters,
        except extended thinking and reasoning effort, which must be declared."""
        if not self.supported_params:
            return param not in (GenerateParam.EXTENDED_THINKING, GenerateParam.REASONING_EFFORT)
        return param in self.supported_params

    def has_thinking_mode(self) -> bool:
        """Whether the model reasons aloud on request: it declares extended thinking or a
        reasoning effort (``thinking``, ``budget_tokens`` and ``reasoning_effort`` reach it)."""
        return self.supports_param(GenerateParam.EXTENDED_THINKING) or self.supports_param(
            GenerateParam.REASONING_EFFORT
        )

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
