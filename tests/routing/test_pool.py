from __future__ import annotations

from car_inference.routing.pool import TYPICAL_OUTPUT_TOKENS, CatalogView, default_latency_ms
from car_inference.schema import ModelSchema

from .helpers import local, registry, remote


def _gguf(size_mb: int | None, tps: float | None = None) -> ModelSchema:
    data = {
        "id": "hf/tiny:q4",
        "name": "tiny",
        "provider": "hf",
        "capabilities": ["generate"],
        "source": {"kind": "gguf", "hf_repo": "x/y", "filename": "m.gguf"},
        "cost": {"size_mb": size_mb} if size_mb else {},
        "performance": {"tokens_per_second": tps} if tps else {},
    }
    return ModelSchema.model_validate(data)


def test_default_latency() -> None:
    assert default_latency_ms(remote("a/x", latency_ms=1234)) == 1234
    assert default_latency_ms(remote("a/x")) == 600 + TYPICAL_OUTPUT_TOKENS / 60 * 1000
    assert default_latency_ms(_gguf(None, tps=128)) == 300 + 2000
    small, large = default_latency_ms(_gguf(500)), default_latency_ms(_gguf(8000))
    assert small < large  # bigger local models are slower on the same machine
    assert default_latency_ms(_gguf(None)) == 300 + TYPICAL_OUTPUT_TOKENS / 20 * 1000


def test_catalog_view_rebuilds_only_when_the_registry_changes() -> None:
    reg = registry(
        remote("a/x", caps=("generate", "tool_use")), local("l/y"), remote("e/emb", caps=("embed",))
    )
    view = CatalogView()
    view.sync(reg)
    version = view.version
    view.sync(reg)
    assert view.version == version
    pool = view.pool(frozenset({"generate"}))
    assert [v.model_id for v in pool.models] == ["a/x", "l/y"]
    assert pool.excluded == {"e/emb": "lacks generate"}
    assert [v.model_id for v in pool.local] == ["l/y"]
    assert view.pool(frozenset({"generate"})) is pool  # cached
    tools = view.pool(frozenset({"generate", "tool_use"}))
    assert tools.excluded["l/y"] == "lacks tool_use"
    reg.register(remote("b/new"))
    view.sync(reg)
    assert view.version == version + 1
    assert "b/new" in {v.model_id for v in view.pool(frozenset({"generate"})).models}


def test_prices_are_per_token() -> None:
    view = CatalogView()
    view.sync(registry(remote("a/x", price=(3.0, 15.0))))
    v = view.models["a/x"]
    assert v.in_rate == 3e-6 and v.out_rate == 15e-6
    assert not v.supports_thinking and not v.is_local
