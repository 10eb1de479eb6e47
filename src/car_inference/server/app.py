"""The ASGI app: ``create_app(engine, settings)`` assembles the routes around one shared engine.

Routes: the OpenAI-compatible API (``routes.py``, ``media.py``), JSON-RPC over WebSocket at
``/ws`` (``jsonrpc.py``), ``/health`` (liveness), ``/v1/health`` (the engine's model health
report), ``/metrics`` (Prometheus) and ``/openapi.json`` (``openapi.py``). ``guard.py`` sits in
front of all of them. The protocol is documented in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__, tracing
from ..config import ServerSettings
from ..engine import InferenceEngine
from ..errors import InferenceError
from ..runtimes.endpoints import SERVER_LOOP_WAIT_S
from . import grounding, images, jsonrpc, media, route_api, routes
from .common import Limiter, ServerState, dumps, json_response
from .errors import ApiError, describe, error_response, guarded
from .guard import Guard, route_label
from .logs import install_redaction
from .metrics import CONTENT_TYPE, Metrics
from .openapi import openapi_schema

__all__ = ["create_app"]

log = logging.getLogger("car_inference.server")

# Traces older than ``[state] trace_retention_days`` and templates not seen for
# ``template_retention_days`` are deleted, and the spend ledger's past days rolled up, at start and
# this often after.
PRUNE_EVERY_S = 3600.0


async def _prune_periodically(engine: InferenceEngine, stop: threading.Event) -> None:
    """``engine.prune_traces``, ``engine.forget_templates`` and ``engine.compact_spend`` at start
    and every ``PRUNE_EVERY_S``, off the event loop (until ``stop``): without them every request's
    trace, every template ever seen and every paid call's spend entry stay in the state store for
    good."""
    while True:
        jobs = (
            ("deleting old traces", engine.prune_traces),
            ("forgetting dormant templates", engine.forget_templates),
            ("rolling up spend", engine.compact_spend),
        )
        for what, job in jobs:
            try:
                await asyncio.to_thread(job, stop=stop)
            except Exception as exc:  # the store away, say: the next round tries again
                log.warning("%s failed: %s", what, exc)
        await asyncio.sleep(PRUNE_EVERY_S)


def create_app(engine: InferenceEngine | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """The server around ``engine`` (default: a new engine for ``$CAR_HOME``, closed when the app
    shuts down; an engine passed in stays the caller's). ``settings`` default to the engine's
    ``[server]`` config. Endpoints marked ``discover = true`` are asked for their models at start."""
    owned = engine is None
    engine = engine if engine is not None else InferenceEngine()
    settings = settings if settings is not None else engine.config.server
    engine.private_urls_ok = settings.fetch_private_urls  # image URLs clients send (SSRF)
    engine.discovery.loop_wait_s = SERVER_LOOP_WAIT_S  # a slow endpoint must not hold the loop
    limiter = Limiter(settings.max_concurrency, settings.max_in_flight_per_client)
    state = ServerState(engine, settings, Metrics(), limiter)
    state.metrics.watch_state(engine.store)
    state.metrics.client_model = lambda model: any(model in r.owned_models for r in engine.runners.list())
    state.metrics.watch_records(engine.bookkeeper)
    # A server answers many requests a second: their outcome records share commits (see
    # engine/bookkeeping.py); whatever is queued is written when the server stops.
    engine.bookkeeper.delay_s = settings.record_delay_ms / 1000
    engine.bookkeeper.start_writer()
    # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT says where; what this app set up it also
    # flushes as it stops (at exit was too late: uvicorn ends a SIGTERM by the signal itself).
    traced_here = not tracing.active() and tracing.configure_from_env()

    lifespan = _lifespan(engine, state, owned=owned, traced=traced_here)
    app = FastAPI(
        title="car-inference",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # ours is written out (openapi.py): the routes are plain Starlette ones
    )
    # `/v1/chat/completions/` was a 307 to an http:// URL built from the client's Host header (a
    # client that follows it posts its body twice, in clear behind TLS): an unknown route instead.
    app.router.redirect_slashes = False
    app.state.car = state
    schema = openapi_schema(__version__)
    app.openapi = lambda: schema  # type: ignore[method-assign]
    install_redaction(settings.api_keys)
    openapi_body = dumps(schema)

    _add_plain_routes(app, state, openapi_body)
    routes.register(app, state)
    media.register(app, state)
    images.register(app, state)
    route_api.register(app, state)
    grounding.register(app, state)
    jsonrpc.register(app, state)
    _add_error_handlers(app)
    known = frozenset(getattr(r, "path", "") for r in app.router.routes)
    app.add_middleware(Guard, state=state, routes=known)
    # Outermost: the client's traceparent; spans named by route as the metrics label them.
    app.add_middleware(tracing.TraceContextMiddleware, name_of=functools.partial(route_label, routes=known))
    return app


def _lifespan(
    engine: InferenceEngine, state: ServerState, *, owned: bool, traced: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's start (endpoint discovery, a frozen heap, state pruning) and its stop (shutdown
    hooks, then the engine closed if the app made it, else flushed)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        report = await engine.discover_endpoints()
        for name, outcome in report.items():
            if isinstance(outcome, InferenceError):
                log.warning("endpoint %s: discovery failed: %s", name, outcome)
            else:
                log.info("endpoint %s: %d model(s)", name, len(outcome))
        # What start-up made (modules, catalog, clients) lives as long as the server: out of the
        # cyclic collector's way, so that its full collections stay short mid-request.
        gc.collect()
        gc.freeze()
        stop_pruning = threading.Event()
        pruning = asyncio.create_task(_prune_periodically(engine, stop_pruning))
        try:
            yield
        finally:
            stop_pruning.set()  # a chunk under way finishes; none starts after it
            pruning.cancel()
            for done in state.on_shutdown:
                done()
            if owned:
                engine.close()
            else:
                engine.flush()
            if traced:
                tracing.uninstall()  # the spans still queued, for at most a second

    return lifespan


def _add_plain_routes(app: FastAPI, state: ServerState, openapi_body: bytes) -> None:
    """/health, /v1/health, /metrics and /openapi.json."""
    engine = state.engine

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

    @guarded()
    async def model_health(request: Request) -> Response:
        # Off the loop: it reads the state store (a slow or busy one holds this request only).
        report = await asyncio.to_thread(engine.model_health)
        return json_response(report.model_dump(mode="json"))

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/health", model_health, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/openapi.json", openapi, methods=["GET"])


def _add_error_handlers(app: FastAPI) -> None:
    """Starlette's own errors (unknown route, wrong method, a body FastAPI refused) and anything a
    route let through, in the API's error shape."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            error = ApiError(404, _no_route(request.method, request.url.path), code="unknown_route")
        elif exc.status_code == 405:
            error = ApiError(
                405,
                f"method {request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
            )
        else:
            error = ApiError(exc.status_code, str(exc.detail), code=None)
        return error_response(describe(error))

    async def validation_error(request: Request, exc: Exception) -> Response:
        return error_response(describe(ApiError(400, str(exc), code="invalid_value")))

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        # Routes catch their own errors; this is the last net, in the same shape (logged by describe).
        return error_response(describe(exc))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)


def _no_route(method: str, path: str) -> str:
    """A 404's message: where the thing asked for is, when we can tell."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if path.startswith("/v1/") and path.endswith("/") and len(path) > 4:
        return f"no route {method} {path}; the routes have no trailing slash: {path.rstrip('/')}"
    if path.startswith("/v1/") and name in jsonrpc.METHODS:
        return f"no route {method} {path}; {name} is a JSON-RPC method on /ws (docs/protocol.md)"
    if path.startswith("/v1/"):
        return f"no route {method} {path}; /openapi.json lists the routes"
    return f"no route {method} {path}; the API lives under /v1 (see /v1/models)"
