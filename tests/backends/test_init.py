"""The backend table: kinds map to classes, imported only on use."""

from __future__ import annotations

import pytest

from car_inference import backends
from car_inference.errors import ModelUnavailable


def test_builtin_kinds_resolve_to_classes() -> None:
    assert backends.backend_available("gguf") and backends.backend_available("sentence")
    cls = backends.load_backend_class("gguf", "m/x")
    assert cls.__name__ == "LlamaCppBackend"


def test_unknown_kind_names_the_model() -> None:
    assert not backends.backend_available("teleport")
    with pytest.raises(ModelUnavailable, match="m/x"):
        backends.load_backend_class("teleport", "m/x")


def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        backends.BACKENDS, "fake", backends.BackendSpec("x:Y", ("no_such_module_abc",), "fake")
    )
    assert not backends.backend_available("fake")
    with pytest.raises(ModelUnavailable, match=r"car-inference\[fake\]"):
        backends.load_backend_class("fake", "m/x")
