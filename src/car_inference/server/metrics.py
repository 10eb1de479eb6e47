"""Prometheus metrics on a registry of the server's own (never the process-global one), so two
apps in one process (tests, an embedding application) keep separate counts.

Label values are bounded: routes are the server's own paths, models are catalog ids the engine
resolved (``-`` when none was; ``client-model`` for one a client brought with ``runner.register``:
any client could add series without end), errors are exception class names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..errors import AllModelsFailed, ModelUnavailable, ProviderError
from ..requests import TokenUsage

if TYPE_CHECKING:
    from ..engine.bookkeeping import Bookkeeper
    from ..routing.coord import Fleet
    from ..routing.coord_limit import FleetLimiter

__all__ = ["CLIENT_MODEL", "CONTENT_TYPE", "NO_MODEL", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
NO_MODEL = "-"
CLIENT_MODEL = "client-model"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "car_requests", "Requests served, by route, model and HTTP status", ["route", "model", "status"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("car_requests_in_flight", "Requests being served now", registry=r)
        self.latency = Histogram(
            "car_request_latency_seconds", "Generation latency per model (whole answer)", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "car_time_to_first_token_seconds", "Time to the first generated token, per model", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens_in = Counter("car_input_tokens", "Prompt tokens per model", ["model"], registry=r)
        self.tokens_out = Counter("car_output_tokens", "Completion tokens per model", ["model"], registry=r)
        self.errors = Counter(
            "car_errors", "Failures per model and error class", ["model", "error"], registry=r
        )
        self.fallbacks = Counter(
            "car_fallbacks", "Times a model failed and the next candidate took over", ["model"], registry=r
        )
        self.decisions = Counter(
            "car_routing_decisions", "Routing decisions by strategy", ["strategy"], registry=r
        )

    def _gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when scraped."""
        Gauge(name, help_text, registry=self.registry).set_function(read)

    def watch_state(self, store: object) -> None:
        """Gauges of a state store that buffers writes while its database is away (PostgreSQL,
        ``[state] buffer_records``), read when scraped: records waiting, records lost."""
        if not hasattr(store, "buffered"):
            return
        self._gauge(
            "car_state_buffered_records",
            "Writes waiting in memory for the state database to return",
            lambda: float(getattr(store, "buffered", 0)),
        )
        self._gauge(
            "car_state_dropped_records",
            "Writes lost beyond [state] buffer_records since the start",
            lambda: float(getattr(store, "dropped", 0)),
        )

    def watch_records(self, bookkeeper: Bookkeeper) -> None:
        """Gauges of the engine's writer queue, read when scraped: answers' records not written
        yet and how long the oldest has waited (a store that does not keep up shows here first)."""
        self._gauge(
            "car_records_pending",
            "Outcome, spend and trace records not yet written to the state store",
            lambda: float(bookkeeper.pending),
        )
        self._gauge(
            "car_records_lag_seconds",
            "How long the oldest record not yet written has waited",
            lambda: bookkeeper.lag_s,
        )

    def watch_fleet(self, fleet: Fleet | None, limiter: FleetLimiter | None) -> None:
        """Gauges of the replica's link to the fleet (``[coordination] redis_url``), read when
        scraped: whether Redis answers (0: degraded to local-only), the reloads of learned router
        state other replicas caused, and the fleet's concurrency slots."""
        if fleet is None:
            return
        self._gauge(
            "car_coordination_reachable",
            "1 while the fleet's Redis answers, 0 while degraded to local",
            lambda: float(fleet.reachable),
        )
        self._gauge(
            "car_router_reloads",
            "Reloads of learned router state announced by other replicas",
            lambda: float(fleet.reloads),
        )
        if limiter is None:
            return
        self._gauge(
            "car_fleet_requests_in_flight",
            "Requests in flight across the fleet at the last slot taken",
            lambda: float(limiter.fleet_in_flight or 0),
        )
        self._gauge(
            "car_fleet_slots_held", "Fleet concurrency slots this replica holds", lambda: float(limiter.held)
        )
        self._gauge(
            "car_fleet_concurrency_limit", "[coordination] global_concurrency", lambda: float(limiter.limit)
        )

    # Whether a model is one a client brought (set by the app: the engine's runners know).
    client_model: Callable[[str], bool] = staticmethod(lambda model: False)

    def _model(self, model: str | None) -> str:
        return NO_MODEL if not model else CLIENT_MODEL if self.client_model(model) else model

    def request(self, route: str, model: str | None, status: int) -> None:
        self.requests.labels(route, self._model(model), str(status)).inc()

    def generation(
        self,
        model: str,
        latency_ms: float | None,
        ttft_ms: float | None,
        usage: TokenUsage | None,
    ) -> None:
        """One answered generation (the model that answered)."""
        model = self._model(model)
        if latency_ms is not None:
            self.latency.labels(model).observe(latency_ms / 1000)
        if ttft_ms is not None:
            self.ttft.labels(model).observe(ttft_ms / 1000)
        if usage is not None:
            if usage.prompt_tokens:
                self.tokens_in.labels(model).inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self.tokens_out.labels(model).inc(usage.completion_tokens)

    def decision(self, strategy: str) -> None:
        self.decisions.labels(strategy).inc()

    def fallback(self, failed: Iterable[str]) -> None:
        """Models that failed before another one answered."""
        for model in failed:
            self.fallbacks.labels(self._model(model)).inc()

    def error(self, model: str | None, error: str) -> None:
        self.errors.labels(self._model(model), error).inc()

    def failure(self, exc: BaseException, capability: str | None = None) -> None:
        """A request that failed: counted against the models that failed, where known. On a route
        of ``capability``, a ``ModelUnavailable`` naming the capability (no model has it) names no
        model."""
        if isinstance(exc, AllModelsFailed):
            for model, error in exc.attempts:
                self.error(model, type(error).__name__)
        elif isinstance(exc, ProviderError):
            self.error(exc.model, type(exc).__name__)
        elif isinstance(exc, ModelUnavailable):
            self.error(None if exc.model_id == capability else exc.model_id, type(exc).__name__)
        else:
            self.error(None, type(exc).__name__)

    def render(self) -> bytes:
        return generate_latest(self.registry)
