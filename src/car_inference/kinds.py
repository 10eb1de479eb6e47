"""The one table of source kinds: for each, its source class, backend, locality, extra and runtime.

Everything that depends on a model's kind derives from this table: the ``ModelSource`` union and the
kind sets (``schema.py``), the tags the TOML error reporter strips (``_tomlfile.py``), the backend
table and install hints (``backends``), availability (``registry.py``: by locality), the wire
protocol a ``[hosts]`` entry may declare, and the runtime that serves a managed model. Nothing else
branches on kind names.

A third party adds a kind through the entry-point group ``car_inference.backends``: the entry's name
is the kind, its value (``module:attr``) a ``KindSpec`` or a function returning one, e.g.::

    [project.entry-points."car_inference.backends"]
    echo = "car_echo:SPEC"

The spec's source class subclasses ``sources.SourceBase`` (or ``LocalFilesSource`` /
``RemoteApiSource``) with ``kind: Literal["echo"] = "echo"``. Plugins are read once, when
``car_inference.schema`` is first imported (the union is fixed then), so the module holding the spec
must import only ``car_inference.kinds`` and ``car_inference.sources`` at import time. A plugin that
fails to load, or that claims a built-in kind, is skipped with a warning.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

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
    SentenceSource,
    SourceBase,
    VllmSource,
    WhisperSource,
)

__all__ = ["BUILTIN_KINDS", "ENTRY_POINT_GROUP", "ApiProtocol", "KindSpec", "Locality", "load_kinds"]

ENTRY_POINT_GROUP = "car_inference.backends"

log = logging.getLogger("car_inference.kinds")


class Locality(StrEnum):
    """Where a kind's models run, which decides what makes one available."""

    IN_PROCESS = "in_process"  # weights on this machine, run in this process: the files must be there
    SERVER = "server"  # a server we reach or start (vLLM, Ollama): configured is enough
    REMOTE = "remote"  # a hosted API: its key must be set (or a base URL, for a keyless server)
    RUNNER = "runner"  # the host application runs it: a runner must be registered for the model

    @property
    def is_local(self) -> bool:
        return self in (Locality.IN_PROCESS, Locality.SERVER)


class ApiProtocol(StrEnum):
    """Wire protocols of hosted APIs; a ``[hosts]`` entry may name the one it speaks."""

    OPENAI_CHAT = "openai_chat"
    ANTHROPIC_MESSAGES = "anthropic_messages"
    GEMINI = "gemini"
    ELEVENLABS = "elevenlabs"


# A backend: "module:Class" (imported when a model of the kind first runs) or a factory that
# takes the engine's ``BackendContext``.
BackendTarget = str | Callable[..., Any]


@dataclass(frozen=True)
class KindSpec:
    """One source kind. ``kind`` is read from the source class's ``kind`` field."""

    source: type[SourceBase]
    backend: BackendTarget
    locality: Locality
    requires: tuple[str, ...] = ()  # importable modules the backend needs
    extra: str | None = None  # the pip extra that installs them
    runtime: str | None = None  # the managed runtime that serves a model whose source says `managed`
    protocol: str | None = None  # the wire protocol, for hosted APIs
    scores_labels: bool = False  # its classify can use token log-likelihoods (method "likelihood")
    origin: str = "built-in"  # or the entry point that brought it

    @property
    def kind(self) -> str:
        field = self.source.model_fields.get("kind")
        default = field.default if field is not None else None
        if not isinstance(default, str) or not default:
            raise TypeError(f"{self.source.__name__} needs a field kind: Literal['...'] with that default")
        return default

    def installed(self) -> bool:
        return all(_importable(m) for m in self.requires)

    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'car-inference[{self.extra}]'"
        if self.requires:
            return f"install {', '.join(self.requires)}"
        return "see README"


@cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _b(name: str) -> str:
    return f"car_inference.backends.{name}"


_OPENAI_COMPAT = _b("openai_compat:OpenAICompatBackend")
_IN, _SERVER, _REMOTE = Locality.IN_PROCESS, Locality.SERVER, Locality.REMOTE

BUILTIN_KINDS: dict[str, KindSpec] = {
    spec.kind: spec
    for spec in (
        KindSpec(GgufSource, _b("llamacpp:LlamaCppBackend"), _IN, ("llama_cpp",), "gguf",
                 runtime="llamacpp", scores_labels=True),
        KindSpec(SentenceSource, _b("sentence:SentenceBackend"), _IN, ("sentence_transformers",), "sentence"),
        KindSpec(PiperSource, _b("piper:PiperBackend"), _IN, ("piper", "onnxruntime"), "speech"),
        KindSpec(WhisperSource, _b("whisper:WhisperBackend"), _IN, ("faster_whisper", "ctranslate2", "av"),
                 "speech"),
        KindSpec(DiffusersSource, _b("diffusers:DiffusersBackend"), _IN, ("diffusers", "torch"),
                 "diffusers"),
        KindSpec(RapidOcrSource, _b("ocr:RapidOcrBackend"), _IN, ("rapidocr_onnxruntime", "onnxruntime"),
                 "ocr"),
        # One OpenAI Chat Completions backend for OpenAI and every compatible server (hosts are data).
        KindSpec(OpenAISource, _OPENAI_COMPAT, _REMOTE, ("openai",), "openai",
                 protocol=ApiProtocol.OPENAI_CHAT),
        KindSpec(OllamaSource, _OPENAI_COMPAT, _SERVER, ("openai",), "openai", runtime="ollama"),
        KindSpec(VllmSource, _OPENAI_COMPAT, _SERVER, ("openai",), "openai", runtime="vllm"),
        KindSpec(AnthropicSource, _b("anthropic:AnthropicBackend"), _REMOTE, ("anthropic",), "anthropic",
                 protocol=ApiProtocol.ANTHROPIC_MESSAGES),
        KindSpec(GeminiSource, _b("gemini:GeminiBackend"), _REMOTE, ("google.genai",), "gemini",
                 protocol=ApiProtocol.GEMINI),
        KindSpec(ElevenLabsSource, _b("elevenlabs:ElevenLabsBackend"), _REMOTE, ("elevenlabs",), "elevenlabs",
                 protocol=ApiProtocol.ELEVENLABS),
        KindSpec(DelegatedSource, _b("delegated:DelegatedBackend"), Locality.RUNNER),
    )
}  # fmt: skip


def _plugin_spec(ep: EntryPoint) -> KindSpec | None:
    """The spec an entry point names, or None (with a warning saying why) when it is unusable."""
    try:
        found = ep.load()
        spec = found if isinstance(found, KindSpec) else found() if callable(found) else found
        if not isinstance(spec, KindSpec):
            raise TypeError(f"{ep.value} is not a car_inference.kinds.KindSpec (nor returns one)")
        if not (isinstance(spec.source, type) and issubclass(spec.source, SourceBase)):
            raise TypeError("its source class does not subclass car_inference.sources.SourceBase")
        if spec.kind != ep.name:
            raise ValueError(f"the entry point is named {ep.name!r} but its source's kind is {spec.kind!r}")
    except Exception as exc:  # a broken plugin must not break the library
        log.warning("ignoring the %s plugin %r (%s): %s", ENTRY_POINT_GROUP, ep.name, ep.value, exc)
        return None
    dist = getattr(ep, "dist", None)
    where = f"{dist.name} {dist.version}" if dist is not None else ep.value
    return KindSpec(**{**spec.__dict__, "origin": f"plugin {where}"})


def load_kinds() -> dict[str, KindSpec]:
    """The built-in kinds, then those plugins add (a plugin cannot replace a built-in kind)."""
    kinds = dict(BUILTIN_KINDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in kinds:
            if kinds[ep.name].origin == "built-in":
                log.warning(
                    "ignoring the %s plugin %r (%s): a built-in kind", ENTRY_POINT_GROUP, ep.name, ep.value
                )
            continue
        spec = _plugin_spec(ep)
        if spec is not None:
            kinds[spec.kind] = spec
    return kinds
