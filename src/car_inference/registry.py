"""UnifiedRegistry: every model the engine knows, looked up by id, name or alias, and filtered.

Availability is computed honestly and without network: a packaged model is available when its
package is installed, a pulled one when its file is in the cache, a hosted one when a key for it
is set, an endpoint when it is configured; and in every case only when a backend for its kind is
installed and implements one of the model's tasks (a speech model on a backend that only chats
cannot run). The engine passes the checks it owns (keys, backends, their tasks) as functions.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field

from .catalog import Catalog, EndpointConfig, load_catalog
from .catalog.locate import local_path
from .config import CarConfig
from .errors import ModelNotFound, ModelUnavailable, close_matches
from .kinds import Locality
from .schema import TASK_CAPABILITIES, HostConfig, ModelCapability, ModelSchema
from .secrets import no_usable_key

__all__ = ["ModelFilter", "UnifiedRegistry"]

KeyCheck = Callable[[str], bool]
BackendCheck = Callable[[str], bool]
# The capabilities whose task the backend of a source kind implements (see backends.base).
TaskCheck = Callable[[str], frozenset[ModelCapability]]
# Is a runner registered for this (delegated) model? The engine's runner table answers.
RunnerCheck = Callable[[ModelSchema], bool]
# Why a model whose server we start (``managed``) cannot start here, or None: the engine asks the
# runtimes (``runtimes.specs.runtime_problem``).
RuntimeCheck = Callable[[ModelSchema], str | None]


class ModelFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    capabilities: list[ModelCapability] = Field(default_factory=list)
    local_only: bool = False
    remote_only: bool = False
    available_only: bool = False
    provider: str | None = None
    kind: str | None = None
    tag: str | None = None

    def matches(self, m: ModelSchema) -> bool:
        return (
            all(c in m.capabilities for c in self.capabilities)
            and not (self.local_only and not m.is_local)
            and not (self.remote_only and m.is_local)
            and not (self.available_only and not m.available)
            and (self.provider is None or m.provider.lower() == self.provider.lower())
            and (self.kind is None or m.kind == self.kind)
            and (self.tag is None or self.tag in m.tags)
        )


def env_key_check(config: CarConfig | None = None) -> KeyCheck:
    """A key counts as set when its environment variable (or the plural ``..._KEYS``) is non-empty
    or the config lists keys under its name."""

    def check(env_var: str) -> bool:
        if os.environ.get(env_var, "").strip() or os.environ.get(env_var + "S", "").strip():
            return True
        return bool(config and config.keys.get(env_var))

    return check


class UnifiedRegistry:
    def __init__(
        self,
        models: Iterable[ModelSchema] = (),
        *,
        hosts: dict[str, HostConfig] | None = None,
        endpoints: list[EndpointConfig] | None = None,
        key_check: KeyCheck | None = None,
        backend_check: BackendCheck | None = None,
        task_check: TaskCheck | None = None,
        runner_check: RunnerCheck | None = None,
        key_refused: KeyCheck | None = None,
        runtime_check: RuntimeCheck | None = None,
    ) -> None:
        self.hosts = dict(hosts or {})
        self.endpoints = list(endpoints or [])
        self._key_check = key_check or env_key_check()
        self._key_refused = key_refused or (lambda env_var: False)
        self.on_miss: Callable[[str], bool] | None = None
        self.miss_reason: Callable[[str], str | None] | None = None  # why on_miss found nothing
        self._backend_check = backend_check or (lambda kind: True)
        self._task_check = task_check
        self._runner_check = runner_check or (lambda schema: False)
        self._runtime_check = runtime_check or (lambda schema: None)
        self._models: dict[str, ModelSchema] = {}
        self._names: dict[str, str] = {}
        # Bumped whenever a model or its availability changes: caches of derived data (the
        # router's per-model views) compare it instead of walking every schema.
        self.version = 0
        for model in models:
            self.register(model)

    @classmethod
    def from_config(
        cls,
        config: CarConfig,
        *,
        key_check: KeyCheck | None = None,
        backend_check: BackendCheck | None = None,
        task_check: TaskCheck | None = None,
        runner_check: RunnerCheck | None = None,
        key_refused: KeyCheck | None = None,
        runtime_check: RuntimeCheck | None = None,
    ) -> UnifiedRegistry:
        """``key_refused(env_var)``: whether the variable's keys are all refused by the provider
        (the reason a model is unavailable then names, instead of "set" a variable that is set);
        ``runtime_check(schema)``: why a model whose server we start cannot start here, or None."""
        catalog: Catalog = load_catalog(config.paths.models_file)
        return cls(
            catalog.models,
            hosts=catalog.hosts,
            endpoints=catalog.endpoints,
            key_check=key_check or env_key_check(config),
            backend_check=backend_check,
            task_check=task_check,
            runner_check=runner_check,
            key_refused=key_refused,
            runtime_check=runtime_check,
        )

    # --- registration ------------------------------------------------------------------------

    def register(self, schema: ModelSchema) -> ModelSchema:
        """Add or replace a model; its availability is computed now."""
        schema = schema.model_copy(update={"available": self._compute_available(schema)})
        old = self._models.get(schema.id)
        if old is not None:
            self._drop_names(old)
        self._models[schema.id] = schema
        for key in self._lookup_keys(schema):
            self._names.setdefault(key, schema.id)
        self.version += 1
        return schema

    def unregister(self, *model_ids: str) -> None:
        """Remove models; the names they shared with others come back to those, in one pass over
        the catalog (one pass per model: a runner bringing 16,000 models held the server's event
        loop for 99 s when it left)."""
        gone = [old for model_id in model_ids if (old := self._models.pop(model_id, None)) is not None]
        if gone:
            self.version += 1
            for old in gone:
                self._drop_names(old)
            for m in self._models.values():
                for key in self._lookup_keys(m):
                    self._names.setdefault(key, m.id)

    def _drop_names(self, schema: ModelSchema) -> None:
        for key in self._lookup_keys(schema):
            if self._names.get(key) == schema.id:
                del self._names[key]

    @staticmethod
    def _lookup_keys(schema: ModelSchema) -> list[str]:
        return schema.lookup_keys()

    # --- availability ------------------------------------------------------------------------

    def refresh_availability(self, locality: Locality | None = None) -> bool:
        """Recompute availability, of every model or of those whose kind has ``locality``;
        whether any changed (``version`` moves only then: the router's views stay cached)."""
        changed = False
        for model_id, schema in list(self._models.items()):
            if locality is None or schema.spec.locality is locality:
                available = self._compute_available(schema)
                if available != schema.available:
                    self._models[model_id] = schema.model_copy(update={"available": available})
                    changed = True
        if changed:
            self.version += 1
        return changed

    def implements(self, schema: ModelSchema, capability: ModelCapability) -> bool:
        """Does the backend of ``schema`` implement ``capability``'s task? True for capabilities
        that are no task of their own (vision, tool_use...) and when no task check was given."""
        if self._task_check is None or capability not in TASK_CAPABILITIES:
            return True
        return capability in self._task_check(schema.kind)

    def _missing_tasks(self, schema: ModelSchema) -> list[ModelCapability] | None:
        """The model's tasks when its backend implements none of them, else None."""
        tasks = [c for c in schema.capabilities if c in TASK_CAPABILITIES]
        if not tasks or any(self.implements(schema, c) for c in tasks):
            return None
        return tasks

    def _compute_available(self, schema: ModelSchema) -> bool:
        # The task check comes last: it reads the backend's source, needed only for runnable models.
        return (
            self._backend_check(schema.kind)
            and self._can_reach(schema)
            and self._missing_tasks(schema) is None
        )

    def _can_reach(self, schema: ModelSchema) -> bool:
        """Files present, server configured, key set or runner registered: what the kind's
        locality asks (kinds.py)."""
        return self._reach_problem(schema) is None

    def _reach_problem(self, schema: ModelSchema) -> str | None:
        return _REACH[schema.spec.locality](self, schema) or self._runtime_check(schema)

    def _files_problem(self, schema: ModelSchema) -> str | None:
        try:
            local_path(schema)
        except ModelUnavailable as exc:
            return exc.reason
        return None

    def _server_problem(self, schema: ModelSchema) -> str | None:
        return None  # configured; reachability is checked when it is used or discovered

    def _key_problem(self, schema: ModelSchema) -> str | None:
        source = schema.source
        base_url = getattr(source, "base_url", None)
        key_env = getattr(source, "api_key_env", None)
        if getattr(source, "needs_key", True) is False:
            return None if base_url else "no base_url is configured"
        if isinstance(key_env, str) and key_env:
            if self._key_check(key_env):
                return None
            return no_usable_key(key_env, self._key_refused(key_env))
        return "not configured"

    def _runner_problem(self, schema: ModelSchema) -> str | None:
        if self._runner_check(schema):
            return None
        return "no inference runner is registered for it (InferenceEngine.register_runner or runner.register)"

    def backend_installed(self, kind: str) -> bool:
        """Whether the backend of ``kind`` models can be imported here (its extra is installed)."""
        return bool(self._backend_check(kind))

    def recheck(self, schema: ModelSchema) -> str | None:
        """Why ``schema`` cannot run now, its availability refreshed first: None when it can. Its
        flag may be stale (a key reset in another replica is seen at the next refresh, and until
        then a request naming it was told "not available: not configured")."""
        available = self._compute_available(schema)
        if available != schema.available and self._models.get(schema.id) is schema:
            self._models[schema.id] = schema.model_copy(update={"available": available})
            self.version += 1
        return None if available else self.unavailable_reason(schema)

    def unavailable_reason(self, schema: ModelSchema) -> str:
        """Why ``schema`` cannot run, in words a user can act on."""
        if not self._backend_check(schema.kind):
            return f"no backend installed for {schema.kind!r} models ({schema.spec.install_hint()})"
        missing = self._missing_tasks(schema)
        if missing is not None:
            tasks = ", ".join(str(c) for c in missing)
            return f"the {schema.kind} backend does not implement {tasks} (nothing here can run it)"
        return self._reach_problem(schema) or "not configured"

    def why_none(self, capability: ModelCapability, *, local: bool | None = None) -> str:
        """Why no model of ``capability`` (of one side: ``local``) can run, in words a user can
        act on: each reason with the catalog models it stops, the commonest first."""
        stopped: dict[str, list[str]] = {}
        for m in self.query(capabilities=[capability]):
            if local is not None and m.is_local != local:
                continue
            if not m.available:
                stopped.setdefault(self.unavailable_reason(m), []).append(m.id)
            elif not self.implements(m, capability):
                stopped.setdefault(f"the {m.kind} backend does not implement {capability}", []).append(m.id)
        side = "" if local is None else "local " if local else "hosted "
        if not stopped:
            return f"the catalog has no {side}{capability} model (models.toml can add one)"
        parts = []
        for reason, ids in sorted(stopped.items(), key=lambda kv: -len(kv[1]))[:4]:
            more = f" and {len(ids) - 2} more" if len(ids) > 2 else ""
            parts.append(f"{', '.join(ids[:2])}{more}: {reason}")
        return "; ".join(parts)

    # --- lookup ------------------------------------------------------------------------------

    def list(self) -> list[ModelSchema]:
        return list(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def get(self, model_id: str) -> ModelSchema | None:
        return self._models.get(model_id)

    def find(self, name: str) -> ModelSchema | None:
        """By id, name, alias, id without variant, or name after the provider (case-insensitive)."""
        exact = self._models.get(name)
        if exact is not None:
            return exact
        model_id = self._names.get(name.lower())
        return self._models.get(model_id) if model_id else None

    def resolve(self, name: str, capability: ModelCapability | None = None) -> ModelSchema:
        """Like ``find`` but raises ``ModelNotFound`` with up to three close names (of models
        with ``capability``, when given). A name no
        model has is first offered to ``on_miss`` (the engine asks a ``discover = true`` endpoint
        the name points at what it serves), which returns whether it registered anything."""
        found = self.find(name)
        if found is None and self.on_miss is not None and self.on_miss(name):
            found = self.find(name)
        if found is None:
            near = close_matches(name, [*self._models, *self._names], n=6 if capability is None else 12)
            ids = list(dict.fromkeys(self._names.get(k.lower(), k) for k in near))
            if capability is not None:  # only models that can do it: a voice was offered for a completion
                ids = [i for i in ids if i in self._models and self._models[i].has_capability(capability)]
            why = self.miss_reason(name) if self.miss_reason is not None else None
            raise ModelNotFound(name, ids[:3], why)
        return found

    def query(self, flt: ModelFilter | None = None, **kwargs: object) -> builtins.list[ModelSchema]:
        """The models ``flt`` matches; ``available_only`` with ``capabilities`` also requires
        that the backend implements each of those tasks."""
        flt = flt or ModelFilter.model_validate(kwargs)
        found = [m for m in self._models.values() if flt.matches(m)]
        if flt.available_only and flt.capabilities:
            found = [m for m in found if all(self.implements(m, c) for c in flt.capabilities)]
        return found


# What makes a model reachable, by the locality of its kind: a problem in words, or None.
_REACH: dict[Locality, Callable[[UnifiedRegistry, ModelSchema], str | None]] = {
    Locality.IN_PROCESS: UnifiedRegistry._files_problem,
    Locality.SERVER: UnifiedRegistry._server_problem,
    Locality.REMOTE: UnifiedRegistry._key_problem,
    Locality.RUNNER: UnifiedRegistry._runner_problem,
}
