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


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
def test_each_hosted_backend_declares_what_it_imports(kind: str) -> None:
    """Every third-party module a hosted backend imports comes from a distribution its extra
    lists, and the release the tests run satisfies its bound."""
    import ast
    import importlib.metadata
    import importlib.util
    import sys
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    spec = backends.spec_for(kind)
    assert spec is not None and spec.extra is not None and isinstance(spec.target, str)
    source = importlib.util.find_spec(spec.target.partition(":")[0])
    assert source is not None and source.origin is not None
    tree = ast.parse(Path(source.origin).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "__future__"}
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    declared = {
        Requirement(r).name: Requirement(r) for r in pyproject["project"]["optional-dependencies"][spec.extra]
    }
    providers = importlib.metadata.packages_distributions()
    for module in third_party:
        dist = next((d for d in providers[module] if d in declared), None)
        assert dist is not None, f"{kind}: {module} ({providers[module]}) is not in the {spec.extra} extra"
        installed = Version(importlib.metadata.version(dist))
        assert installed in declared[dist].specifier, f"{dist} {installed} is outside {declared[dist]}"


def test_a_backend_given_as_a_class_or_a_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    from car_inference.schema import ModelCapability

    class Embeds:
        def __init__(self, ctx: object) -> None:
            self.ctx = ctx

        async def embed(self, model: object, request: object) -> None: ...

    def factory(ctx: object) -> Embeds:
        return Embeds(ctx)

    monkeypatch.setitem(backends.BACKENDS, "cls", backends.BackendSpec(Embeds))
    monkeypatch.setitem(backends.BACKENDS, "fn", backends.BackendSpec(factory))
    assert backends.backend_tasks("cls") == {ModelCapability.EMBED}
    assert backends.backend_tasks("fn") >= {ModelCapability.EMBED, ModelCapability.GENERATE}
    assert (
        backends.load_backend_class("cls", "m/x") is Embeds
        and backends.load_backend_class("fn", "m/x") is factory
    )
    assert backends.backend_tasks("teleport") == frozenset()
