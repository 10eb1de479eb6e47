"""The backend table: source kind -> backend class, imported only when a model of that kind runs.

Built-in backends register here exactly like third-party ones do through the entry-point group
``car_inference.backends`` (name = source kind, value = ``module:Class``). This table is the only
place that maps kinds to code; nothing else branches on provider names.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from ..errors import ModelUnavailable

__all__ = ["BACKENDS", "BackendSpec", "backend_available", "load_backend_class", "spec_for"]


@dataclass(frozen=True)
class BackendSpec:
    target: str  # "module:Class"
    requires: tuple[str, ...] = ()  # importable modules the backend needs
    extra: str | None = None  # the pip extra that installs them

    def installed(self) -> bool:
        return all(_importable(m) for m in self.requires)


BACKENDS: dict[str, BackendSpec] = {
    "gguf": BackendSpec("car_inference.backends.llamacpp:LlamaCppBackend", ("llama_cpp",), "gguf"),
    "sentence": BackendSpec(
        "car_inference.backends.sentence:SentenceBackend", ("sentence_transformers",), "sentence"
    ),
    "piper": BackendSpec("car_inference.backends.piper:PiperBackend", ("piper", "onnxruntime"), "speech"),
    "whisper": BackendSpec(
        "car_inference.backends.whisper:WhisperBackend", ("faster_whisper", "ctranslate2", "av"), "speech"
    ),
    "diffusers": BackendSpec(
        "car_inference.backends.diffusers:DiffusersBackend", ("diffusers", "torch"), "diffusers"
    ),
    "rapidocr": BackendSpec(
        "car_inference.backends.ocr:RapidOcrBackend", ("rapidocr_onnxruntime", "onnxruntime"), "ocr"
    ),
    # One OpenAI Chat Completions backend for OpenAI and every compatible server (hosts are data).
    "openai": BackendSpec("car_inference.backends.openai_compat:OpenAICompatBackend", ("openai",), "openai"),
    "ollama": BackendSpec("car_inference.backends.openai_compat:OpenAICompatBackend", ("openai",), "openai"),
    "vllm": BackendSpec("car_inference.backends.openai_compat:OpenAICompatBackend", ("openai",), "openai"),
    "anthropic": BackendSpec(
        "car_inference.backends.anthropic:AnthropicBackend", ("anthropic",), "anthropic"
    ),
    "gemini": BackendSpec("car_inference.backends.gemini:GeminiBackend", ("google.genai",), "gemini"),
    "elevenlabs": BackendSpec(
        "car_inference.backends.elevenlabs:ElevenLabsBackend", ("elevenlabs",), "elevenlabs"
    ),
}


@cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@cache
def _plugin_specs() -> dict[str, BackendSpec]:
    found: dict[str, BackendSpec] = {}
    for ep in entry_points(group="car_inference.backends"):
        found.setdefault(ep.name, BackendSpec(ep.value))
    return found


def spec_for(kind: str) -> BackendSpec | None:
    return BACKENDS.get(kind) or _plugin_specs().get(kind)


def backend_available(kind: str) -> bool:
    spec = spec_for(kind)
    return spec is not None and spec.installed()


def load_backend_class(kind: str, model_id: str) -> type[Any]:
    """The backend class for ``kind``; ``ModelUnavailable`` naming ``model_id`` and the extra to
    install when it is missing."""
    spec = spec_for(kind)
    if spec is None:
        raise ModelUnavailable(model_id, f"no backend serves {kind!r} models")
    if not spec.installed():
        hint = f"pip install 'car-inference[{spec.extra}]'" if spec.extra else "install its dependencies"
        raise ModelUnavailable(model_id, f"the {kind} backend needs {', '.join(spec.requires)}: {hint}")
    module_name, _, attr = spec.target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
