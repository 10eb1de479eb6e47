"""InferenceEngine: resolve -> route -> run with fallbacks -> record. The one facade.

The engine is the only part of the package that knows every layer; the CLI and the server talk to
it (and to ``config``/``errors``) and nothing else. Its methods are async; ``SyncInferenceEngine``
wraps them. The class is assembled from focused mixins: generation and routing
(``generation.py``), the other tasks (``tasks.py``) and reports (``health.py``).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .. import backends as backend_table
from .. import tracing
from ..backends.base import Backend, BackendContext, run_blocking
from ..backends.cache import ModelCache
from ..backends.delegated import RunnerRegistration, RunnerTable
from ..config import CarConfig, load_config, make_home
from ..errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    UnsupportedMode,
    close_matches,
    expect,
    validation_summary,
)
from ..keys import KeyPool
from ..kinds import Locality
from ..registry import UnifiedRegistry
from ..routing import (
    AdaptiveRouter,
    OutcomeTracker,
    SpendControl,
    apply_benchmark_priors,
    load_all_benchmark_priors,
    open_store,
)
from ..routing.breaker_redis import circuit_breakers
from ..routing.coord import Fleet
from ..runtimes.endpoints import EndpointDiscovery
from ..runtimes.managed import RuntimeSupervisor
from ..runtimes.specs import runtime_problem, runtime_specs
from ..schema import ModelCapability, ModelSchema
from .bookkeeping import Bookkeeper
from .generation import GenerationMixin
from .health import HealthMixin
from .learning import LearningMixin
from .meter import EngineMeter
from .tasks import TaskMixin

__all__ = ["InferenceEngine"]

log = logging.getLogger("car_inference.engine")

# How old hosted models' availability may be (``_keys_fresh``): as often as a refused key's reset
# elsewhere is seen (keys.py).
KEY_RECHECK_S = 2.0


class InferenceEngine(LearningMixin, GenerationMixin, TaskMixin, HealthMixin):
    """One API over every model in the registry.

    ``InferenceEngine()`` reads ``$CAR_HOME`` (default ``~/.car``): ``config.toml``,
    ``models.toml``, and the learned routing state in ``state.db``. Pass ``config`` to use
    settings built in code.
    """

    def __init__(
        self, config: CarConfig | None = None, *, home: str | os.PathLike[str] | None = None
    ) -> None:
        if config is not None and not isinstance(config, CarConfig):  # a path, positionally: AttributeError
            raise InvalidInput(
                f"config must be a CarConfig, not {type(config).__name__} (a home folder is home=...)"
            )
        if config is not None and home is not None:  # home was ignored: the config names its own
            raise InvalidInput(
                "give config or home, not both: a CarConfig has its home (CarConfig(home=...))"
            )
        if home is not None and not isinstance(home, Path):
            if not isinstance(home, str | os.PathLike):  # a str was a bare TypeError from deep inside
                raise InvalidInput(f"home must be a path or a str, not {type(home).__name__}")
            home = Path(home)
        self.config = config if config is not None else load_config(home)
        # The learned state first: an unreachable PostgreSQL refuses the start with one error,
        # before anything else (the key statistics) tries the same database.
        make_home(self.config.home)
        state = self.config.state
        self.store = open_store(
            state.url,
            self.config.paths.state_db,
            buffer_records=state.buffer_records,
            answer_timeout_s=state.answer_timeout_s,
        )
        self.fleet = Fleet.for_settings(self.config.coordination)  # state shared with replicas, or None
        self.keys = KeyPool.for_config(self.config, fleet=self.fleet)
        self.runners = RunnerTable()  # what runs delegated models (register_runner)
        self.registry = UnifiedRegistry.from_config(
            self.config,
            key_check=self.keys.has_key,
            key_refused=self.keys.refused,
            backend_check=backend_table.backend_available,
            task_check=backend_table.backend_tasks,
            runner_check=self.runners.serves,
            runtime_check=functools.partial(runtime_problem, runtime_specs(self.config.home)),
        )
        self._keys_checked_at = 0.0  # _keys_fresh
        self.discovery = EndpointDiscovery(self.registry, self.config.remote.connect_timeout_s)
        self.registry.on_miss = self.discovery
        self.registry.miss_reason = self.discovery.why
        self.cache = ModelCache(self.config.local.cache_mb, record_dir=self.config.home / "loaded")
        self._backend_ctx = BackendContext(
            config=self.config, cache=self.cache, keys=self.keys, extras={"runners": self.runners}
        )
        self._backends: dict[str, Backend] = {}
        self._backends_lock = threading.Lock()
        self._handed: OrderedDict[str, str] = OrderedDict()  # LearningMixin._hand_on
        self.runtimes = RuntimeSupervisor(self.config, self.registry)  # servers we start on first use
        self._warn_unknown_choices()
        self._warn_unknown_spend_scopes()
        self._warn_unknown_fallbacks()
        self._warn_unknown_key_names()
        self._init_routing()

    @property
    def private_urls_ok(self) -> bool:
        """Whether image URLs on loopback or private addresses are fetched: yes for the library
        and the CLI; the server turns it off for its clients unless ``[server]
        fetch_private_urls`` (``backends/image_input.py``). Every backend sees the same value."""
        return self._backend_ctx.private_urls_ok

    @private_urls_ok.setter
    def private_urls_ok(self, value: bool) -> None:
        self._backend_ctx.private_urls_ok = value

    def _warn_unknown_choices(self) -> None:
        """A ``[defaults]``/``[preferred]`` name the catalog does not know is said once at start
        (with close names): it is passed over until a model of that name is registered (a
        delegated runner, a discovered endpoint), so a typo would otherwise go unnoticed."""
        for section in ("preferred", "defaults"):
            choices = getattr(self.config, section)
            for capability, name in choices.model_dump().items():
                if not name:
                    continue
                try:
                    found = self.registry.resolve(name)
                except ModelNotFound as exc:
                    near = f" (did you mean {', '.join(exc.suggestions)}?)" if exc.suggestions else ""
                    log.warning(
                        "config [%s] %s names %r, which is not in the catalog%s: it is passed over",
                        section, capability, name, near,
                    )  # fmt: skip
                    continue
                # ([defaults] generate is only tokenize's: generation without a model is routed)
                if not found.has_capability(capability) and (section, capability) != ("defaults", "generate"):
                    log.warning(
                        "config [%s] %s names %s, which does not do %s: such requests without a model fail",
                        section, capability, found.id, capability,
                    )  # fmt: skip

    def _warn_unknown_fallbacks(self) -> None:
        """A ``fallbacks`` entry no model answers to is said once at start (a typo showed only
        when the model it backs up failed); one under an endpoint may be discovered later."""
        endpoints = {e.name for e in self.registry.endpoints}
        known = [m.id for m in self.registry.list()]
        for model in self.registry.list():
            for name in model.fallbacks:
                if self.registry.find(name) is None and name.partition("/")[0] not in endpoints:
                    near = close_matches(name, known)
                    hint = f" (did you mean {', '.join(near)}?)" if near else ""
                    message = "model %s: its fallback %r is not in the catalog%s: it is skipped"
                    log.warning(message, model.id, name, hint)

    def _warn_unknown_spend_scopes(self) -> None:
        """A ``[spend.providers.NAME]`` no model is billed under limits nothing: said once at start
        (Gemini's models are billed under "google", so a ``gemini`` limit let every call through)."""
        models = self.registry.list()
        providers = {m.provider.lower() for m in models}
        billed: dict[str, set[str]] = {}  # host (as models.toml names it) -> the providers it bills
        for m in models:
            if host := getattr(m.source, "host", None):
                billed.setdefault(str(host).lower(), set()).add(m.provider)
        for name in self.config.spend.providers:
            if name.lower() in providers:
                continue
            if hosts := sorted(billed.get(name.lower(), ())):
                hint = f": the models of host {name} are billed under {', '.join(hosts)}"
            else:
                near = close_matches(name, sorted(providers))
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
            log.warning(
                "config [spend.providers.%s] limits a provider no model is billed under%s: it limits"
                " nothing until one is",
                name, hint,
            )  # fmt: skip

    def _warn_unknown_key_names(self) -> None:
        """A ``[keys]`` name no model reads its key from is said once at start: the keys under
        `openai_api_key` (lower case) were never used, and OpenAI stayed unavailable unsaid."""
        used = {getattr(m.source, "api_key_env", None) for m in self.registry.list()}
        used |= {e.api_key_env for e in self.registry.endpoints}
        names = sorted(n for n in used if isinstance(n, str) and n)
        for name in self.config.keys:
            if name in names:
                continue
            near = [n for n in names if n.lower() == name.lower()] or close_matches(name, names)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            log.warning("config [keys] %s is no model's key variable%s: its keys are not used", name, hint)

    def _init_routing(self) -> None:
        home = self.config.home
        self.tracker = OutcomeTracker(self.store, self.config.routing)
        self._import_legacy_profiles(home / "models" / "outcome_profiles.json")
        apply_benchmark_priors(self.tracker, load_all_benchmark_priors(home))
        self.breakers = circuit_breakers(self.config.breaker, self.config.coordination, self.fleet)
        self.spend = SpendControl(self.config.spend, self.store, fleet=self.fleet)
        if self.fleet is not None:
            self.fleet.share_learning(self.tracker)
        self.router = AdaptiveRouter(
            self.config.routing, self.tracker, self.breakers, self.spend, meter=EngineMeter(self)
        )
        self.bookkeeper = Bookkeeper(self.store.batch, pause=self.store.writer_pause, thread_on_loop=True)
        # Records still queued when the program ends (a script that never calls close, a loop that
        # stopped before the drain) are written on the way out.
        atexit.register(_flush_at_exit, weakref.ref(self.bookkeeper))

    def _import_legacy_profiles(self, path: Path) -> None:
        """A first start next to the seed's ``outcome_profiles.json`` takes its profiles over."""
        if not path.is_file() or self.tracker.model_ids():
            return
        import json

        try:
            self.tracker.import_profiles(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)

    def flush(self) -> None:
        """Wait until every outcome and spend record made so far is in the store."""
        self.bookkeeper.flush()

    def close(self) -> None:
        """Write pending records and key statistics, close the outcome store, and take this
        engine's loaded models out of ``car models ps``. Its methods then raise InferenceError."""
        self._closed = True
        self.bookkeeper.close()
        self.keys.close()  # its statistics written, its connection to state.db closed
        self.store.close()
        self.bookkeeper.retired = True  # what a stream left open records later is dropped, said
        self.runtimes.close()
        self.cache.close()
        self.breakers.close()
        if self.fleet is not None:
            self.fleet.close()

    # --- models ------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelSchema:
        """The model called ``name`` (id, name or alias); ``ModelNotFound`` suggests close names."""
        expect(name, str, "resolve")
        if not name.strip():
            raise InvalidInput("resolve: the model name is empty")
        return self.registry.resolve(name)

    def list_models(self) -> list[ModelSchema]:
        """Every model of the catalog, with whether it can run here now (``available``)."""
        self._keys_fresh()
        return self.registry.list()

    def _keys_fresh(self) -> None:
        """Hosted models' availability follows their keys now, at most ``KEY_RECHECK_S`` old: a
        key reset from another process, stored with `car secrets put` or refused (401) moved it
        only at start, so a server that started with refused keys said "not configured" until
        restarted, and one whose keys were all refused kept routing to those models."""
        now = time.monotonic()
        if now >= self._keys_checked_at:
            self._keys_checked_at = now + KEY_RECHECK_S
            self.registry.refresh_availability(Locality.REMOTE)

    def register_model(self, schema: ModelSchema) -> ModelSchema:
        """Add (or, by the same id, replace) a model in this engine's catalog, in memory only;
        returned with its availability computed now."""
        expect(schema, ModelSchema, "register_model")
        return self.registry.register(schema)

    def register_runner(
        self,
        runner: Any,
        models: Iterable[str | ModelSchema] | None = None,
        *,
        timeout_s: float | None = None,
        name: str | None = None,
    ) -> RunnerRegistration:
        """Let ``runner`` run delegated models (see backends/delegated.py for what a runner is):
        those named in ``models`` (ids or names of delegated models, or ``ModelSchema``s, which
        are added to the catalog until the runner is unregistered), or every delegated model when
        ``models`` is None. They become available and are routed like any other model."""
        wanted = self.runner_models(models)
        ids = None if wanted is None else [schema.id for schema, _ in wanted]
        registration = self.runners.add(runner, models=ids, timeout_s=timeout_s, name=name)
        for schema, new in wanted or ():
            if new:
                self.registry.register(schema)
                registration.owned_models.add(schema.id)
        # A new runner is a new server: the failures of the one before (a client's that timed out
        # and left) kept the model's breaker open for the runner that took over.
        for model_id in ids or ():
            self.breakers.reset(model_id)
        self.registry.refresh_availability(Locality.RUNNER)
        return registration

    def runner_models(
        self, models: Iterable[str | ModelSchema] | None, *, replacing: RunnerRegistration | None = None
    ) -> list[tuple[ModelSchema, bool]] | None:
        """What ``register_runner(runner, models)`` would serve: (the model, whether it is new to
        the catalog) each; raises what it would refuse, as if ``replacing`` were gone."""
        if models is None:
            return None
        wanted = [self._runner_model(item, replacing) for item in models]
        owners = {m: r for r in self.runners.list() if r is not replacing for m in r.owned_models}
        for schema, _new in wanted:
            owner = owners.get(schema.id)
            if owner is not None:  # another client's model: its calls (prompts) would come here
                raise InvalidInput(f"{schema.id} is served by the runner that brought it ({owner.name})")
        return wanted

    def _runner_model(
        self, item: str | ModelSchema, replacing: RunnerRegistration | None
    ) -> tuple[ModelSchema, bool]:
        """(the model a runner would serve, whether it is new to the catalog); only a model of a
        runner kind (``delegated``) takes a runner, and a new one needs an id no model answers to."""
        if not isinstance(item, ModelSchema):
            known = self.resolve(item)
        elif replacing is not None and item.id in replacing.owned_models:
            known = None  # the replaced registration's own model: new again once it is gone
        else:
            known = self.registry.get(item.id)
            other = self.registry.find(item.id) if known is None else None
            if other is not None:  # a client's "meta-llama/Llama-3.1-8B-Instruct" took gpubox's prompts
                raise InvalidInput(
                    f"{item.id} is a name of {other.id}: a model of a runner's own needs an id of its own"
                )
        schema = known or item
        assert isinstance(schema, ModelSchema)
        if schema.spec.locality is not Locality.RUNNER:
            raise InvalidInput(f"{schema.id} is a {schema.kind} model; runners serve delegated ones")
        return schema, known is None

    def unregister_runner(self, registration: RunnerRegistration | Any) -> bool:
        """Stop using a runner (its registration, or the runner object); the models it served
        become unavailable unless another runner serves them, and those it added are removed."""
        removed = self.runners.remove(registration)
        if removed is None:
            return False
        gone = [m for m in removed.owned_models if self.runners.find(m) is None]
        self.registry.unregister(*gone)
        # Not listed in health after it left (it was); a model another runner serves now starts
        # afresh there (the leaver's failures are not the next runner's).
        for model_id in (*gone, *(removed.models or ())):
            self.breakers.reset(model_id)
        self.registry.refresh_availability(Locality.RUNNER)
        return True

    def register_endpoint(
        self, base_url: str, model: str, *, api_key_env: str | None = None, name: str = "endpoint"
    ) -> ModelSchema:
        """Make ``model`` on an OpenAI-compatible server at ``base_url`` a catalog model
        (``{name}/{model}``) for this engine, e.g. for ``car generate --base-url``. It takes
        images too (``vision``): the caller who names a server knows what it reads, and a model
        without vision is refused images before the call."""
        from ..catalog import EndpointConfig

        seen = [ModelCapability.GENERATE, ModelCapability.VISION]
        try:
            endpoint = EndpointConfig(
                name=name, base_url=base_url, api_key_env=api_key_env, models=[model], capabilities=seen
            )
        except ValidationError as exc:
            raise InvalidInput(f"register_endpoint: {validation_summary(exc)}") from None
        return self.registry.register(endpoint.to_schemas()[0])

    async def discover_endpoints(
        self, names: Iterable[str] | None = None
    ) -> dict[str, list[str] | InferenceError]:
        """Ask each configured endpoint (``[[endpoints]]`` in models.toml; by default those with
        ``discover = true``) which models it serves and register them. Returns, per endpoint, the
        model ids registered or the error that stopped it."""
        from ..runtimes.endpoints import claimable, list_served_models

        wanted = {names} if isinstance(names, str) else set(names) if names is not None else None
        chosen = [
            e for e in self.registry.endpoints
            if (e.discover if wanted is None else e.name in wanted)
        ]  # fmt: skip
        unknown = sorted((wanted or set()) - {e.name for e in chosen})
        if unknown:  # a typo asked nothing and answered {} without a word
            known = [e.name for e in self.registry.endpoints]
            raise InvalidInput(
                f"no endpoint named {', '.join(map(repr, unknown))} in models.toml"
                + (f" (endpoints: {', '.join(known)})" if known else " (it has no [[endpoints]])")
            )
        timeout_s = self.config.remote.connect_timeout_s
        # Asked together: a hanging endpoint costs the start its timeout once, not once per endpoint.
        answers = await asyncio.gather(
            *(list_served_models(e, timeout_s=timeout_s) for e in chosen), return_exceptions=True
        )
        report: dict[str, list[str] | InferenceError] = {}
        for endpoint, served in zip(chosen, answers, strict=True):
            if isinstance(served, InferenceError):
                report[endpoint.name] = served
            elif isinstance(served, BaseException):
                raise served
            else:
                claimed = claimable(self.registry, endpoint, served)
                report[endpoint.name] = [self.registry.register(s).id for s in claimed]
        return report

    def pull(self, name: str) -> Path:
        """Download a model's files from Hugging Face into the HF cache (the only code path that
        downloads weights; nothing else ever does). Returns the local file or folder."""
        from ..catalog.pull import pull_model

        model = self.resolve(name)
        path = pull_model(model)
        self.registry.refresh_availability()
        return path

    async def warm_up(self, model_ids: Iterable[str]) -> list[InferenceError | None]:
        """Load models ahead of the first request; one entry per id (None when it loaded). One id
        alone may be given as a str (it was read one character at a time)."""
        self._check_open()
        if isinstance(model_ids, str):
            model_ids = [model_ids]
        results: list[InferenceError | None] = []
        for model_id in model_ids:
            try:
                model = self.resolve(model_id)
                backend = self._runnable(model)
                warm = getattr(backend, "warm_up", None)
                if warm is not None:
                    await run_blocking(functools.partial(warm, model))
                results.append(None)
            except InferenceError as exc:
                results.append(exc)
        return results

    def default_model(self, capability: ModelCapability) -> ModelSchema | None:
        """The configured model for ``capability`` (preferred, then default), if it resolves."""
        if not isinstance(capability, ModelCapability):
            try:
                capability = ModelCapability(capability)
            except ValueError:
                known = ", ".join(c.value for c in ModelCapability)
                raise InvalidInput(f"default_model: {capability!r} is not a capability ({known})") from None
        for name in (
            self.config.preferred.for_capability(capability),
            self.config.defaults.for_capability(capability),
        ):
            if name:
                found = self.registry.find(name)
                if found is not None:
                    return found
        return None

    # --- backends ----------------------------------------------------------------------------

    def _backend(self, model: ModelSchema) -> Backend:
        with self._backends_lock:
            backend = self._backends.get(model.kind)
            if backend is None:
                cls = backend_table.load_backend_class(model.kind, model.id)
                backend = self._backends[model.kind] = cls(self._backend_ctx)
            return backend

    def _runnable(self, model: ModelSchema) -> Backend:
        """The backend for ``model``, or ``ModelUnavailable`` saying what to do about it."""
        if not model.available:
            raise ModelUnavailable(model.id, self.registry.unavailable_reason(model))
        return self.runtimes.backend_for(model, self._backend)  # a managed model starts its server

    def _task_method(
        self, model: ModelSchema, capability: ModelCapability, method: str
    ) -> Callable[..., Any]:
        model.require(capability)
        backend = self._runnable(model)
        fn = getattr(backend, method, None)
        if fn is None:
            raise UnsupportedMode(
                str(capability), model.kind, f"the {model.kind} backend does not implement {method}"
            )
        return tracing.traced_task(f"inference.{method}", fn, model=model.id, provider=model.provider)


def _flush_at_exit(ref: weakref.ref[Bookkeeper]) -> None:
    keeper = ref()
    if keeper is not None:
        keeper.flush()
