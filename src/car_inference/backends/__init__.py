"""The backend table: source kind -> backend, imported only when a model of that kind runs.

It is read off the one table of kinds (``kinds.py``), which holds the built-in kinds and those that
plugins add through the entry-point group ``car_inference.backends``. Nothing else maps kinds to
code; nothing branches on provider names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import ModelUnavailable
from ..kinds import BackendTarget, KindSpec, _importable
from ..schema import KINDS, ModelCapability

__all__ = ["BACKENDS", "BackendSpec", "backend_available", "backend_tasks", "load_backend_class", "spec_for"]


@dataclass(frozen=True)
class BackendSpec:
    target: BackendTarget  # "module:Class", or a factory taking the BackendContext
    requires: tuple[str, ...] = ()  # importable modules the backend needs
    extra: str | None = None  # the pip extra that installs them

    @classmethod
    def of(cls, kind: KindSpec) -> BackendSpec:
        return cls(kind.backend, kind.requires, kind.extra)

    def installed(self) -> bool:
        return all(_importable(m) for m in self.requires)

    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'car-inference[{self.extra}]'"
        return "install its dependencies"


BACKENDS: dict[str, BackendSpec] = {kind: BackendSpec.of(spec) for kind, spec in KINDS.items()}


def spec_for(kind: str) -> BackendSpec | None:
    return BACKENDS.get(kind)


def backend_available(kind: str) -> bool:
    spec = spec_for(kind)
    return spec is not None and spec.installed()


def load_backend_class(kind: str, model_id: str) -> Any:
    """The backend class (or factory) for ``kind``; ``ModelUnavailable`` naming ``model_id`` and
    the extra to install when it is missing."""
    spec = spec_for(kind)
    if spec is None:
        raise ModelUnavailable(model_id, f"no backend serves {kind!r} models")
    if not spec.installed():
        raise ModelUnavailable(
            model_id, f"the {kind} backend needs {', '.join(spec.requires)}: {spec.install_hint()}"
        )
    if not isinstance(spec.target, str):
        return spec.target
    module_name, _, attr = spec.target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def backend_tasks(kind: str) -> frozenset[ModelCapability]:
    """The capabilities whose task the backend of ``kind`` implements (read from its source when
    it is a ``module:Class`` target, so that no SDK is imported to find out)."""
    from .base import TASK_PROTOCOLS, _protocol_methods, class_tasks

    spec = spec_for(kind)
    if spec is None:
        return frozenset()
    if isinstance(spec.target, str):
        return class_tasks(spec.target)
    target = spec.target
    if not isinstance(target, type):  # a factory function: what it makes is known only once made
        return frozenset(TASK_PROTOCOLS)
    return frozenset(
        capability
        for capability, protocol in TASK_PROTOCOLS.items()
        if all(callable(getattr(target, name, None)) for name in _protocol_methods(protocol))
    )
