"""Where a model lives: one pydantic class per source kind. Types only, no I/O.

Each class has a ``kind: Literal["..."]`` field, the tag of ``schema.ModelSource``'s discriminated
union. Which kinds exist, and what runs them, is the table in ``kinds.py``; a plugin adds a kind by
subclassing ``SourceBase`` (or ``LocalFilesSource`` / ``RemoteApiSource``) and publishing a
``KindSpec`` for it. This module imports nothing of the package but pydantic, so a plugin may
import it (and ``kinds``) at import time.

A source that an ``[[endpoints]]`` entry can produce (an OpenAI-compatible server and the models
it serves) has a classmethod ``endpoint_source(base_url, api_key_env, wire_name)`` returning the
source's fields for one served model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AnthropicSource",
    "DelegatedSource",
    "DiffusersSource",
    "ElevenLabsSource",
    "GeminiSource",
    "GgufSource",
    "LocalFilesSource",
    "OllamaSource",
    "OpenAISource",
    "PiperSource",
    "RapidOcrSource",
    "RemoteApiSource",
    "SentenceSource",
    "SourceBase",
    "VllmSource",
    "WhisperSource",
    "strip_v1",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceBase(_Strict):
    """The base of every source class; a subclass declares ``kind: Literal["its-kind"]``."""


def strip_v1(url: str) -> str:
    """``http://h:8000/v1`` -> ``http://h:8000`` (servers whose source keeps the bare host)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _server_url(url: str) -> str:
    """A server's address as ``http(s)://host[:port]``: a port out of range ("99999",
    "notaport") was a ValueError traceback on first use and a 500 through `car serve`, and 0 was
    taken for the default port."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not a server address like http://127.0.0.1:8000")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise ValueError(f"{url!r} has no valid port (1-65535)")
    return url


ServerUrl = Annotated[str, AfterValidator(_server_url)]


# --- files on this machine ------------------------------------------------------------------------


class LocalFilesSource(SourceBase):
    """Where local weights are: a path, a resource inside an installed package, or an HF repo."""

    path: str | None = None
    package: str | None = Field(default=None, description="importable package holding the files")
    resource: str | None = Field(default=None, description="file or folder inside `package`")
    hf_repo: str | None = Field(default=None, description="Hugging Face repo to pull from")
    revision: str | None = None

    @model_validator(mode="after")
    def _one_location(self) -> LocalFilesSource:
        if not (self.path or self.package or self.hf_repo):
            raise ValueError("needs one of `path`, `package` or `hf_repo`")
        return self


class GgufSource(LocalFilesSource):
    """A GGUF file run in-process by llama.cpp."""

    kind: Literal["gguf"] = "gguf"
    filename: str | None = Field(default=None, description="file within `hf_repo` to pull")
    mmproj: str | None = Field(default=None, description="vision projector file, for VL models")
    pooling: str | None = Field(default=None, description="embedding pooling: mean, cls, last")
    system_prompt: str | None = Field(
        default=None, description="system text for requests that bring none (a tiny model answers better)"
    )
    managed: bool = Field(default=False, description="served by a llama.cpp server we start, not in-process")


class SentenceSource(LocalFilesSource):
    """A sentence-transformers model directory: a bi-encoder or a cross-encoder."""

    kind: Literal["sentence"] = "sentence"
    cross_encoder: bool = False


class PiperSource(LocalFilesSource):
    """A Piper ONNX voice (``resource`` or ``filename`` names the .onnx file)."""

    kind: Literal["piper"] = "piper"
    filename: str | None = None


class WhisperSource(SourceBase):
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


class DiffusersSource(LocalFilesSource):
    """A diffusers pipeline folder (``model_index.json`` and its components) run in-process."""

    kind: Literal["diffusers"] = "diffusers"
    dtype: str | None = Field(default=None, description="torch dtype on a GPU; the CPU runs float32")
    allow_patterns: list[str] = Field(default_factory=list, description="files to pull (default: all)")
    ignore_patterns: list[str] = Field(default_factory=list, description="files a pull skips")


class RapidOcrSource(LocalFilesSource):
    """RapidOCR's ONNX text detector and recogniser (grounds text targets), in-process."""

    kind: Literal["rapidocr"] = "rapidocr"


# --- hosted APIs ----------------------------------------------------------------------------------


class RemoteApiSource(SourceBase):
    """A hosted API. ``host`` names an entry of the catalog's ``[hosts]`` table, which supplies
    ``base_url`` and ``api_key_env`` unless the model sets them itself."""

    host: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    model_name: str | None = Field(default=None, description="the name on the wire")
    headers: dict[str, str] = Field(default_factory=dict)


class OpenAISource(RemoteApiSource):
    """Any server speaking OpenAI Chat Completions: OpenAI, OpenRouter, Groq, vLLM, LM Studio..."""

    kind: Literal["openai"] = "openai"
    needs_key: bool = True
    system_prompt: str | None = Field(
        default=None, description="system text for requests that bring none (as a GGUF source's)"
    )
    repeat_penalty_field: str | None = Field(
        default=None,
        description="the body field a server takes the repeat penalty in (llama.cpp server: "
        "repeat_penalty, vLLM: repetition_penalty); unset: the penalty is not sent",
    )

    @classmethod
    def endpoint_source(cls, base_url: str, api_key_env: str | None, wire_name: str) -> dict[str, Any]:
        return {"kind": "openai", "base_url": base_url, "api_key_env": api_key_env,
                "model_name": wire_name, "needs_key": api_key_env is not None}  # fmt: skip


class AnthropicSource(RemoteApiSource):
    kind: Literal["anthropic"] = "anthropic"


class GeminiSource(RemoteApiSource):
    kind: Literal["gemini"] = "gemini"


class ElevenLabsSource(RemoteApiSource):
    kind: Literal["elevenlabs"] = "elevenlabs"


# --- servers on this machine or the network -------------------------------------------------------


class OllamaSource(SourceBase):
    """A model served by an Ollama host, reached through its OpenAI-compatible ``/v1``."""

    kind: Literal["ollama"] = "ollama"
    host: ServerUrl = "http://127.0.0.1:11434"
    model_tag: str
    managed: bool = Field(default=False, description="start `ollama serve` if it is not running")

    @classmethod
    def endpoint_source(cls, base_url: str, api_key_env: str | None, wire_name: str) -> dict[str, Any]:
        return {"kind": "ollama", "host": strip_v1(base_url), "model_tag": wire_name}


class VllmSource(SourceBase):
    """A model served by a vLLM (or other OpenAI-compatible) server we may start and supervise."""

    kind: Literal["vllm"] = "vllm"
    endpoint: ServerUrl = "http://127.0.0.1:8000"
    model_name: str
    api_key_env: str | None = None
    hf_repo: str | None = Field(default=None, description="what `vllm serve` loads, if we start it")
    managed: bool = Field(default=False, description="we start `vllm serve` on first use")

    @classmethod
    def endpoint_source(cls, base_url: str, api_key_env: str | None, wire_name: str) -> dict[str, Any]:
        return {"kind": "vllm", "endpoint": strip_v1(base_url), "model_name": wire_name,
                "api_key_env": api_key_env}  # fmt: skip


# --- the host application ---------------------------------------------------------------------------


class DelegatedSource(SourceBase):
    """Inference done by a runner the host application registers at run time
    (``InferenceEngine.register_runner``, or a JSON-RPC client's ``runner.register``)."""

    kind: Literal["delegated"] = "delegated"
    hint: str | None = None
