"""The registry's models reduced to what routing reads per request, cached per registry state.

``ModelView`` holds one schema's routing data (capabilities as a set, prices per token, a default
latency); ``ModelPool`` the available models with one set of required capabilities, and why the
others are out. ``CatalogView.sync`` rebuilds both only when the registry changed: a registry
bumps ``UnifiedRegistry.version`` whenever a model or its availability changes.

Default latency when nothing has been observed: the catalog's ``latency_p50_ms``, else time to first
token (catalog, or 300 ms local / 600 ms remote) + 256 tokens at the catalog's tokens per second,
else 60 tok/s remote, and for local models 30,000 / size_mb tok/s clamped to 3..200 (20 when the size
is unknown): a 1 GB model about 30 tok/s, an 8 GB model about 4 tok/s on CPU.

A ``PromptMeter`` (the engine's, backed by the backends) tells routing what the catalog cannot: the
context window a model really runs with (a local GGUF is loaded with ``local.n_ctx``, often less
than the model's own window) and the exact token count of a request on a local model's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..registry import UnifiedRegistry
from ..requests import GenerateRequest
from ..schema import NAMED_ONLY, GenerateParam, ModelSchema

__all__ = [
    "TYPICAL_OUTPUT_TOKENS",
    "CatalogView",
    "ModelPool",
    "ModelView",
    "PromptMeter",
    "default_latency_ms",
]


class PromptMeter(Protocol):
    def window(self, model: ModelSchema) -> int:
        """The context window ``model`` runs with (0: unknown)."""
        ...

    def count(self, model: ModelSchema, request: GenerateRequest) -> int | None:
        """The exact prompt tokens of ``request`` on ``model``'s own tokenizer; None where there
        is none to use (a hosted model)."""
        ...


TYPICAL_OUTPUT_TOKENS = 256
LOCAL_FIRST = "prefer_local: a local model qualifies"


@dataclass(slots=True)
class ModelView:
    schema: ModelSchema
    model_id: str
    name: str
    provider: str
    is_local: bool
    caps: frozenset[str]
    context_length: int
    in_rate: float  # USD per token
    out_rate: float
    default_latency_ms: float
    catalog_quality: float | None
    supports_thinking: bool

    @classmethod
    def of(cls, m: ModelSchema, meter: PromptMeter | None = None) -> ModelView:
        window = meter.window(m) if meter is not None else m.context_length
        return cls(
            schema=m, model_id=m.id, name=m.name, provider=m.provider, is_local=m.is_local,
            caps=frozenset(c.value for c in m.capabilities), context_length=window,
            in_rate=m.cost.input_per_mtok / 1e6, out_rate=m.cost.output_per_mtok / 1e6,
            default_latency_ms=default_latency_ms(m), catalog_quality=m.quality,
            supports_thinking=m.supports_param(GenerateParam.EXTENDED_THINKING),
        )  # fmt: skip


def default_latency_ms(m: ModelSchema) -> float:
    """A typical request's latency before any is observed (see the module docstring)."""
    perf = m.performance
    if perf.latency_p50_ms:
        return perf.latency_p50_ms
    size = m.cost.size_mb
    if perf.tokens_per_second:
        tps = perf.tokens_per_second
    elif m.is_local:
        tps = min(200.0, max(3.0, 30_000 / size)) if size else 20.0
    else:
        tps = 60.0
    ttft = perf.time_to_first_token_ms or (300.0 if m.is_local else 600.0)
    return ttft + TYPICAL_OUTPUT_TOKENS / tps * 1000


class ModelPool:
    """Available models with a given capability set, and why the others are out."""

    __slots__ = ("excluded", "local", "min_context", "models", "prior_means", "remote_excluded")

    def __init__(self, models: list[ModelView], excluded: dict[str, str]) -> None:
        self.models = models
        self.excluded = excluded
        self.local = [v for v in models if v.is_local]
        self.remote_excluded = {v.model_id: LOCAL_FIRST for v in models if not v.is_local}
        known = [v.context_length for v in models if v.context_length]
        self.min_context = min(known) if known else 1 << 62
        self.prior_means: dict[tuple[str, int], float] = {}  # (family, priors version) -> mean prior


class CatalogView:
    def __init__(self, meter: PromptMeter | None = None) -> None:
        self.meter = meter
        self._key: tuple[int, int] = (0, -1)
        self.models: dict[str, ModelView] = {}
        self._unavailable: dict[str, str] = {}  # model id -> why it cannot run (the registry's words)
        self._pools: dict[frozenset[str], ModelPool] = {}
        self.version = 0  # bumped on every rebuild, for caches keyed on the catalog

    def sync(self, registry: UnifiedRegistry) -> None:
        key = (id(registry), registry.version)
        if key != self._key:
            # The key goes last: a thread that reads it meanwhile at worst rebuilds once more.
            listed = registry.list()
            self.models = {m.id: ModelView.of(m, self.meter) for m in listed}
            # --explain said only "not available" where the registry knows why (every key refused)
            self._unavailable = {m.id: registry.unavailable_reason(m) for m in listed if not m.available}
            self._pools = {}
            self.version += 1
            self._key = key

    def pool(self, required: frozenset[str]) -> ModelPool:
        pool = self._pools.get(required)
        if pool is None:
            models, excluded = [], {}
            for v in self.models.values():
                missing = required - v.caps
                if missing:
                    excluded[v.model_id] = "lacks " + ", ".join(sorted(missing))
                elif not v.schema.available:
                    why = self._unavailable.get(v.model_id)
                    excluded[v.model_id] = f"not available: {why}" if why else "not available"
                elif NAMED_ONLY in v.schema.tags:
                    excluded[v.model_id] = f"served only when named (tag {NAMED_ONLY})"
                else:
                    models.append(v)
            pool = self._pools[required] = ModelPool(models, excluded)
        return pool
