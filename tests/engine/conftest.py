"""Engines over hosted models that are really the fake provider server on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from car_inference.engine import InferenceEngine
from fakes import FakeProviderServer


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


def _model_toml(entry: dict[str, Any]) -> str:
    lines = ["[[models]]"]
    source = entry.pop("source")
    cost = entry.pop("cost", None)
    for key, value in entry.items():
        lines.append(f"{key} = {_toml(value)}")
    lines.append("[models.source]")
    lines += [f"{k} = {_toml(v)}" for k, v in source.items()]
    if cost:
        lines.append("[models.cost]")
        lines += [f"{k} = {_toml(v)}" for k, v in cost.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


RemoteEngine = Callable[..., InferenceEngine]


@pytest.fixture
def remote_engine(
    fake: FakeProviderServer, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> RemoteEngine:
    """Build an engine whose catalog has OpenAI-compatible / Anthropic models served by ``fake``.

    ``models`` maps a name to its spec: ``provider``, ``quality``, ``kind`` (openai/anthropic),
    ``price`` (USD per 1M tokens, in and out) or ``cost`` (the catalog's cost table), ``params``
    (supported_params), ``fallbacks`` (the models to try when it fails), ``capabilities``; each
    model gets its
    own key variable ``<NAME>_KEY`` set to ``key-<name>`` so faults can target one model.
    ``routing`` lines go into config.toml's [routing] table, ``config`` is appended as is.
    """

    def build(models: dict[str, dict[str, Any]], *, routing: str = "", config: str = "") -> InferenceEngine:
        text = ""
        for name, spec in models.items():
            env = f"{name.upper()}_KEY"
            monkeypatch.setenv(env, f"key-{name}")
            kind = spec.get("kind", "openai")
            base = fake.openai_base_url if kind == "openai" else fake.base_url
            entry: dict[str, Any] = {
                "id": f"{spec.get('provider', name)}/{name}",
                "name": name,
                "provider": spec.get("provider", name),
                "capabilities": spec.get("capabilities", ["generate", "tool_use"]),
                "context_length": spec.get("context", 32768),
                "quality": spec.get("quality", 0.8),
                "source": {"kind": kind, "base_url": base, "api_key_env": env, "model_name": name},
            }
            if "params" in spec:
                entry["supported_params"] = spec["params"]
            if "fallbacks" in spec:
                entry["fallbacks"] = spec["fallbacks"]
            if "price" in spec:
                entry["cost"] = {"input_per_mtok": spec["price"], "output_per_mtok": spec["price"]}
            entry["cost"] = spec.get("cost", entry.get("cost"))
            text += _model_toml(entry)
        (isolated_home / "models.toml").write_text(text)
        (isolated_home / "config.toml").write_text(
            f"[routing]\nexploration = 0.0\nseed = 7\n{routing}\n[remote]\ntimeout_s = 3\n{config}"
        )
        return InferenceEngine()

    return build
