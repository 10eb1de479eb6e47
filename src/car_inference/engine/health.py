"""Reports: the model health report (the seed's ``model_health``), spend, and profile export.

``model_health()`` answers "what can this engine do right now": models by provider and capability,
the configured defaults and whether they can run, the routing settings, where four sample requests
would go, the benchmark priors in use, circuit breaker states, spend against limits, and each source
kind of the table (kinds.py) with its backend and models.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from ..errors import InferenceError, InvalidInput, expect, validation_summary
from ..hardware import HardwareOverview, hardware_overview
from ..kinds import Locality
from ..requests import ClassifyRequest, GenerateParams, GenerateRequest, ImageBlock, RoutingWorkload
from ..routing import (
    ModelProfile,
    SpendStatus,
    StateHealth,
    benchmark_priors_paths,
    load_benchmark_priors,
    state_health,
    went_unanswered,
)
from ..routing.breaker import CoordinationHealth
from ..runtimes.supervisor import RuntimeStatus
from ..schema import ALL_CAPABILITIES, KINDS, ModelCapability, ModelSchema
from .lifecycle import Lifecycle
from .speech import SpeechHealthReport, speech_health

log = logging.getLogger("car_inference.engine")

if TYPE_CHECKING:
    from ..backends.delegated import RunnerTable
    from ..config import CarConfig
    from ..registry import UnifiedRegistry
    from ..routing import CircuitBreakerRegistry, OutcomeTracker, RoutingDecision, SpendControl, StateStore
    from ..runtimes.managed import RuntimeSupervisor
    from .bookkeeping import Bookkeeper

__all__ = ["HealthMixin", "KindHealth", "ModelHealthReport"]


class ModelDefaultHealth(BaseModel):
    capability: ModelCapability
    configured_model: str
    available: bool
    is_local: bool
    provider: str | None = None


class ModelProviderHealth(BaseModel):
    provider: str
    configured: bool
    local_models: int
    remote_models: int
    available_models: int
    capabilities: list[ModelCapability]


class ModelCapabilityHealth(BaseModel):
    capability: ModelCapability
    total_models: int
    available_models: int
    local_available_models: int
    remote_available_models: int


class RoutingScenarioHealth(BaseModel):
    name: str
    workload: RoutingWorkload
    task_family: str
    has_tools: bool
    has_vision: bool
    prefer_local: bool
    exploration: float
    model_id: str | None
    model_name: str | None
    reason: str
    strategy: str | None


class KindHealth(BaseModel):
    """One source kind of the table (kinds.py): whether its backend is installed, its models."""

    kind: str
    locality: str
    origin: str = Field(description="built-in, or the plugin distribution that added it")
    backend_installed: bool
    install_hint: str | None = Field(default=None, description="what installs the backend, when it is not")
    models: int
    available_models: int
    runners: int | None = Field(default=None, description="registered runners, for runner kinds (delegated)")


class ModelBenchmarkPriorHealth(BaseModel):
    model_id: str
    model_name: str | None
    overall_score: float
    overall_latency_ms: float | None
    task_scores: dict[str, float]
    task_latency_ms: dict[str, float]
    source_path: str


class ModelHealthReport(BaseModel):
    total_models: int
    available_models: int
    local_models: int
    remote_models: int
    defaults: list[ModelDefaultHealth]
    providers: list[ModelProviderHealth]
    capabilities: list[ModelCapabilityHealth]
    routing_prefer_local: bool
    routing_exploration: float
    routing_settle_after: int
    routing_settled_width: float
    routing_prior_sd: float
    routing_quality_weight: float
    routing_latency_weight: float
    routing_cost_weight: float
    routing_scenarios: list[RoutingScenarioHealth]
    benchmark_priors: list[ModelBenchmarkPriorHealth]
    circuit_breakers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    spend: SpendStatus | None = None
    speech: SpeechHealthReport
    runtimes: list[RuntimeStatus] = Field(default_factory=list, description="managed servers")
    state: StateHealth | None = Field(default=None, description="where the learned state lives, its latency")
    coordination: CoordinationHealth | None = Field(
        default=None, description="where breaker state is shared (local or Redis), reachable, latency"
    )
    hardware: HardwareOverview | None = Field(default=None, description="this machine and what fits on it")
    kinds: list[KindHealth] = Field(default_factory=list, description="source kinds and their backends")


_SCENARIOS = (
    ("interactive_text", "Summarize the benefits of local-first AI routing in two sentences.", "text",
     RoutingWorkload.INTERACTIVE, False, False),
    ("background_code", "Write a Python function named fibonacci(n) that returns the nth Fibonacci number.",
     "code", RoutingWorkload.BACKGROUND, False, False),
    ("interactive_tool_use", "Use the provided weather tool to get the weather for Boston.", "tool_use",
     RoutingWorkload.INTERACTIVE, True, False),
    ("interactive_vision", "What is in this image? Answer in one word.", "vision",
     RoutingWorkload.INTERACTIVE, False, True),
)  # fmt: skip

_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
_PIXEL = ImageBlock(data="iVBORw0KGgo=", media_type="image/png")


class HealthMixin(Lifecycle):
    # Provided by InferenceEngine.
    config: CarConfig
    registry: UnifiedRegistry
    tracker: OutcomeTracker
    breakers: CircuitBreakerRegistry
    spend: SpendControl
    bookkeeper: Bookkeeper
    runtimes: RuntimeSupervisor
    store: StateStore
    runners: RunnerTable

    if TYPE_CHECKING:  # provided by InferenceEngine and the other mixins

        def default_model(self, capability: ModelCapability) -> ModelSchema | None: ...
        def route(self, request: GenerateRequest) -> RoutingDecision: ...
        def _classifier(self, request: ClassifyRequest) -> ModelSchema: ...

    def model_health(self) -> ModelHealthReport:
        """Each model's availability, circuit, key and outcome figures (what `car health` prints)."""
        self._check_open()
        self.bookkeeper.flush_unless_writer()
        self._keys_fresh()
        models = self.registry.list()
        routing = self.config.routing
        # The database first, bounded: while it does not answer (a hung server: the bounded read
        # timed out) the spend totals, read from it, are left out (None; ``state`` says why) rather
        # than waited for. A database that refuses is another matter: its totals come from what
        # was read last and what waits in memory.
        state = state_health(
            self.store,
            self.config.state.url or str(self.config.paths.state_db),
            pending=self.bookkeeper.pending,
            lag_s=self.bookkeeper.lag_s,
        )
        return ModelHealthReport(
            total_models=len(models),
            available_models=sum(m.available for m in models),
            local_models=sum(m.is_local for m in models),
            remote_models=sum(not m.is_local for m in models),
            defaults=[
                self._default_health(c)
                for c in (ModelCapability.GENERATE, ModelCapability.EMBED, ModelCapability.CLASSIFY)
            ],
            providers=_providers(models, self.registry),
            capabilities=[_capability_health(c, models) for c in ALL_CAPABILITIES],
            routing_prefer_local=routing.prefer_local,
            routing_exploration=routing.exploration,
            routing_settle_after=routing.settle_after,
            routing_settled_width=routing.settled_width,
            routing_prior_sd=routing.prior_sd,
            routing_quality_weight=routing.quality_weight,
            routing_latency_weight=routing.latency_weight,
            routing_cost_weight=routing.cost_weight,
            routing_scenarios=self.routing_scenarios(),
            benchmark_priors=self._prior_health(models),
            circuit_breakers={k: dict(v) for k, v in self.breakers.snapshot().items()},
            spend=None if went_unanswered(state) else self._spend_health(),
            speech=speech_health(self),  # type: ignore[arg-type]  # self is the InferenceEngine
            runtimes=self.runtimes.statuses(),
            state=state,
            coordination=self.breakers.coordination(),
            hardware=hardware_overview(models),  # detection is cached for the process
            kinds=_kind_health(models, len(self.runners.list())),
        )

    def _spend_health(self) -> SpendStatus | None:
        """Spend against the limits; None when the state store cannot say (its ``state`` entry
        says why): the report is how an operator finds out what is wrong, so it must not fail."""
        try:
            return self.spend.status()
        except Exception as exc:  # a table dropped by hand: /v1/health answered 500
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            log.warning("the health report has no spend: %s", reason)
            return None

    def routing_scenarios(self) -> list[RoutingScenarioHealth]:
        """Where four typical requests would go now; routing them records nothing."""
        routing = self.config.routing
        out = []
        for name, prompt, family, workload, tools, vision in _SCENARIOS:
            request = GenerateRequest(
                prompt=prompt,
                params=GenerateParams(workload=workload),
                tools=[_WEATHER_TOOL] if tools else None,
                images=[_PIXEL] if vision else None,
            )
            model_id: str | None
            model_name: str | None
            strategy: str | None
            try:
                decision = self.route(request)
                model_id, model_name, reason, strategy = (
                    decision.model_id, decision.model_name, decision.reason, str(decision.strategy)
                )  # fmt: skip
            except InferenceError as exc:
                model_id = model_name = strategy = None
                reason = str(exc)
            out.append(
                RoutingScenarioHealth(
                    name=name,
                    workload=workload,
                    task_family=family,
                    has_tools=tools,
                    has_vision=vision,
                    prefer_local=routing.prefer_local,
                    exploration=routing.exploration,
                    model_id=model_id,
                    model_name=model_name,
                    reason=reason,
                    strategy=strategy,
                )
            )
        return out

    def _default_health(self, capability: ModelCapability) -> ModelDefaultHealth:
        config = self.config
        configured = config.preferred.for_capability(capability) or config.defaults.for_capability(capability)
        model = self.default_model(capability)
        if model is None and capability is ModelCapability.CLASSIFY:
            with contextlib.suppress(InferenceError):  # what classify() uses when nothing is configured
                model = self._classifier(ClassifyRequest(text="x", labels=["x"]))
        return ModelDefaultHealth(
            capability=capability,
            configured_model=configured or (model.id if model else ""),
            available=bool(model and model.available),
            is_local=bool(model and model.is_local),
            provider=model.provider if model else None,
        )

    def _prior_health(self, models: list[ModelSchema]) -> list[ModelBenchmarkPriorHealth]:
        names = {m.id: m.name for m in models}
        found: dict[str, ModelBenchmarkPriorHealth] = {}
        for path in benchmark_priors_paths(self.config.home):
            try:
                priors = load_benchmark_priors(path)
            except InferenceError:
                continue
            for model_id, prior in priors.items():
                found[model_id] = ModelBenchmarkPriorHealth(
                    model_id=model_id,
                    model_name=names.get(model_id),
                    overall_score=prior.overall_score,
                    overall_latency_ms=prior.overall_latency_ms,
                    task_scores=dict(prior.task_scores),
                    task_latency_ms=dict(prior.task_latency_ms),
                    source_path=str(path),
                )
        return [found[k] for k in sorted(found)]

    # --- spend and profiles ----------------------------------------------------------------------

    def spend_status(self) -> SpendStatus:
        """Spend so far against each configured limit (records still queued are written first)."""
        self._check_open()
        self.bookkeeper.flush()
        return self.spend.status()

    def export_profiles(self) -> list[ModelProfile]:
        """Learned profiles in the seed's ``outcome_profiles.json`` shape."""
        self._check_open()
        self.bookkeeper.flush()
        return self.tracker.export_profiles()

    def import_profiles(self, profiles: list[ModelProfile | dict[str, Any]]) -> int:
        """Load profiles (e.g. from another machine's export), each replacing that model's learned
        state here (other models keep theirs); returns how many were imported.
        Anything but a list of profiles (the export's shape) is ``InvalidInput``."""
        self._check_open()
        expect(profiles, list, "import_profiles")
        try:
            return self.tracker.import_profiles(profiles)
        except ValidationError as exc:
            raise InvalidInput(f"import_profiles: {validation_summary(exc)}") from None
        except ValueError as exc:  # a model given twice
            raise InvalidInput(f"import_profiles: {exc}") from None
        except OverflowError:  # each number fits, their sums (the baselines) do not: nothing stored
            self.tracker.reload(full=True)  # the router's copy had taken them
            raise InvalidInput(
                "import_profiles: the profiles' counts add up past what can be stored"
            ) from None

    def export_profiles_file(self, path: Path) -> int:
        """Write the profiles to ``path`` as JSON, atomically: a temporary file of its own beside
        it (concurrent exports do not share one, a file named like it is left alone) renamed over
        it, so a reader sees the old file or the new one. A folder, a device or a path whose
        folder does not exist is ``InvalidInput`` (``media_files.output_path``). Returns how many
        profiles were written."""
        import json

        from ..backends.media_files import output_path, write_atomic

        target = output_path(str(path), "json", "car-profiles-")
        _not_our_own(target, self.config.home)
        profiles = [p.model_dump(mode="json") for p in self.export_profiles()]
        write_atomic(target, json.dumps(profiles, indent=2).encode())
        return len(profiles)


# The files of $CAR_HOME that a profiles export must never replace (nor any SQLite database).
_OWN_FILES = ("state.db", "state.db-wal", "state.db-shm", "config.toml", "models.toml", "secrets.json")


def _not_our_own(target: Path, home: Path) -> None:
    """``InvalidInput`` when ``target`` is one of the engine's own files or any SQLite database:
    `car profiles export $CAR_HOME/state.db` replaced the live database with JSON (exit 0), and a
    running `car serve` went on writing into the deleted file."""
    try:
        own = {(home / name).resolve() for name in _OWN_FILES}
        resolved = target.resolve()
    except OSError:
        return
    if resolved in own:
        raise InvalidInput(f"cannot write {target}: it is one of car's own files in {home}; export elsewhere")
    try:
        with open(resolved, "rb") as f:
            database = f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return  # not there yet, or unreadable: the write says what is wrong
    if database:
        raise InvalidInput(f"cannot write {target}: it is an SQLite database; export to a .json file")


def _providers(models: list[ModelSchema], registry: UnifiedRegistry) -> list[ModelProviderHealth]:
    by_provider: dict[str, list[ModelSchema]] = {}
    for m in models:
        by_provider.setdefault(m.provider, []).append(m)
    out = []
    for provider, group in sorted(by_provider.items()):
        caps = {c for m in group for c in m.capabilities}
        out.append(
            ModelProviderHealth(
                provider=provider,
                configured=any(m.available for m in group),
                local_models=sum(m.is_local for m in group),
                remote_models=sum(not m.is_local for m in group),
                available_models=sum(m.available for m in group),
                capabilities=[c for c in ALL_CAPABILITIES if c in caps],
            )
        )
    return out


def _kind_health(models: list[ModelSchema], runners: int) -> list[KindHealth]:
    """Every kind of the table, with what its backend needs and its models' counts."""
    out = []
    for kind, spec in KINDS.items():
        group = [m for m in models if m.kind == kind]
        installed = spec.installed()
        out.append(
            KindHealth(
                kind=kind,
                locality=str(spec.locality),
                origin=spec.origin,
                backend_installed=installed,
                install_hint=None if installed else spec.install_hint(),
                models=len(group),
                available_models=sum(m.available for m in group),
                runners=runners if spec.locality is Locality.RUNNER else None,
            )
        )
    return out


def _capability_health(capability: ModelCapability, models: list[ModelSchema]) -> ModelCapabilityHealth:
    relevant = [m for m in models if m.has_capability(capability)]
    available = [m for m in relevant if m.available]
    return ModelCapabilityHealth(
        capability=capability,
        total_models=len(relevant),
        available_models=len(available),
        local_available_models=sum(m.is_local for m in available),
        remote_available_models=sum(not m.is_local for m in available),
    )
