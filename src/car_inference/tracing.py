"""OpenTelemetry spans for a request, across replicas: a no-op unless tracing is configured.

Spans (the seed's ``inference.generate`` and its fields; the others named after it):

- ``inference.generate``: one generate or stream call; ``model``, ``max_tokens``, ``prompt_tokens``,
  ``completion_tokens``, ``latency_ms``, ``ttft_ms`` of the answer;
- ``inference.route``: the routing decision; ``model``, ``strategy``, ``reason``, ``task_family``,
  ``fallbacks``;
- ``inference.attempt``: one model's try, from its gates to its outcome; ``model``, ``trace_id``
  (the outcome trace feedback rates), ``outcome`` (success, failure, abandoned), ``error``;
- ``inference.provider_call``: the backend's call inside an attempt (a stream: until its last event);
  ``model``, ``provider``;
- ``inference.record``: the attempt's outcome written to the state store (later, on the writer
  thread: a child of its attempt); ``model``, ``trace_id``.
- the other tasks, one span each around the backend's call (``traced_task``):
  ``inference.embed``, ``inference.rerank``, ``inference.classify``, ``inference.transcribe``,
  ``inference.synthesize``, ``inference.voices``, ``inference.generate_image``,
  ``inference.generate_video``, ``inference.ground`` (a grounder's own; a VLM grounds through
  ``inference.generate``), ``inference.tokenize``, ``inference.detokenize``; ``model``,
  ``provider``. A failed call marks its span failed.

With the server, ``car serve`` wraps each HTTP request in a server span whose parent is the
client's W3C ``traceparent`` (and ``tracestate``), so a request's spans on any replica join the
caller's trace.

Configuration: the standard OpenTelemetry variables. ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) makes ``configure_from_env`` (called by ``car serve``)
export spans over OTLP/HTTP in batches, with ``OTEL_SERVICE_NAME`` (default ``car-inference``) and
the exporter's own variables (headers, timeout); ``OTEL_SDK_DISABLED=true`` keeps it off. The
spans still queued are sent when the process exits (or ``uninstall``), for at most
``SHUTDOWN_S``: a collector that does not answer costs a stopping server one second, not the
exporter's retries (10 s and more). A program
embedding the library calls ``install(tracer_provider)`` with a provider of its own (tests use the
SDK's in-memory exporter that way). Needs the ``otel`` extra (``opentelemetry-sdk`` and the OTLP
exporter); without it, or unconfigured, every hook is one global check and nothing else.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = [
    "ATTEMPT",
    "GENERATE",
    "PROVIDER_CALL",
    "RECORD",
    "ROUTE",
    "TraceContextMiddleware",
    "active",
    "configure_from_env",
    "end",
    "install",
    "set_attributes",
    "span",
    "start",
    "traced_stream",
    "traced_task",
    "uninstall",
]

log = logging.getLogger("car_inference.tracing")

GENERATE = "inference.generate"  # the seed's span name
ROUTE = "inference.route"
ATTEMPT = "inference.attempt"
PROVIDER_CALL = "inference.provider_call"
RECORD = "inference.record"

# How long the spans still queued may take to reach the collector at exit (``uninstall``).
SHUTDOWN_S = 1.0


class _State:
    tracer: Any = None  # an opentelemetry Tracer once installed; None: every hook is a no-op
    provider: Any = None  # the provider configure_from_env made (shut down by uninstall)


_state = _State()

T = TypeVar("T")


def active() -> bool:
    return _state.tracer is not None


def install(provider: Any) -> None:
    """Trace with ``provider`` (an ``opentelemetry.sdk.trace.TracerProvider``) from now on."""
    from . import __version__

    _state.tracer = provider.get_tracer("car_inference", __version__)


def uninstall(timeout_s: float = SHUTDOWN_S) -> None:
    """Stop tracing. The spans already ended are exported by a provider ``configure_from_env``
    made, for at most ``timeout_s`` (the exporter retries a collector that does not answer for
    10 s and more: its shutdown runs on a daemon thread, given up on after that)."""
    _state.tracer = None
    provider, _state.provider = _state.provider, None
    if provider is None:
        return
    closing = threading.Thread(target=provider.shutdown, name="car-otel-shutdown", daemon=True)
    closing.start()
    closing.join(timeout_s)
    if closing.is_alive():
        log.warning("tracing: the collector took no spans within %g s; the last ones are dropped", timeout_s)


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Export over OTLP/HTTP when the OpenTelemetry variables ask for it; whether tracing is on."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or _state.provider is not None:
        return active()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing needs the otel extra:"
            " pip install 'car-inference[otel]'; spans are not exported"
        )
        return False
    name = env.get("OTEL_SERVICE_NAME") or "car-inference"
    # Shut down at exit by uninstall (bounded), not by the provider's own handler (unbounded).
    provider = TracerProvider(resource=Resource.create({"service.name": name}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads the OTEL_* variables
    install(provider)
    _state.provider = provider
    atexit.unregister(uninstall)  # once, however often tracing is configured again
    atexit.register(uninstall)
    log.info("tracing: spans exported over OTLP to %s as service %s", endpoint, name)
    return True


# --- hooks (each a single check when tracing is off) -------------------------------------------


def start(name: str, parent: Any = None, **attributes: Any) -> Any:
    """A span started now and not made current (it may outlive the code that started it): a
    child of ``parent`` (a span) or else of the current span. None when tracing is off."""
    if _state.tracer is None:
        return None
    from opentelemetry import trace

    context = trace.set_span_in_context(parent) if parent is not None else None
    return _state.tracer.start_span(name, context=context, attributes=_clean(attributes))


def end(span: Any, error: BaseException | str | None = None, **attributes: Any) -> None:
    """End ``span`` (None: nothing), with an error status when ``error`` is given."""
    if span is None:
        return
    if attributes:
        span.set_attributes(_clean(attributes))
    if error is not None:
        _fail(span, error)
    span.end()


def set_attributes(span: Any, **attributes: Any) -> None:
    if span is not None:
        span.set_attributes(_clean(attributes))


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def span(name: str, parent: Any = None, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span current for the block (an exception escaping it marks it failed); None when off."""
    if _state.tracer is None:
        return _OFF  # one shared do-nothing context: no generator per call
    return _span(name, parent, attributes)


@contextlib.contextmanager
def _span(name: str, parent: Any, attributes: dict[str, Any]) -> Iterator[Any]:
    from opentelemetry import trace

    s = start(name, parent, **attributes)
    try:
        with trace.use_span(s, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield s
    except BaseException as exc:
        _fail(s, exc)
        raise
    finally:
        s.end()


def traced_task(name: str, fn: Callable[..., Awaitable[T]], **attributes: Any) -> Callable[..., Awaitable[T]]:
    """``fn`` (an async callable) with each call inside a span ``name`` (``span``: a no-op when
    tracing is off, checked per call, so a provider installed later is used)."""

    async def call(*args: Any, **kwargs: Any) -> T:
        with span(name, **attributes):
            return await fn(*args, **kwargs)

    return call


def traced_stream(
    name: str,
    events: AsyncGenerator[T, None],
    *,
    parent: Any = None,
    on_item: Callable[[Any, T], None] | None = None,
    current: bool = False,
    **attributes: Any,
) -> AsyncGenerator[T, None]:
    """``events`` inside a span from the first item to the last (``events`` itself when off).
    ``current``: the span is the current one while each item is produced (attached and detached
    around each step, never across a ``yield``), so spans started meanwhile are its children.
    ``on_item(span, item)`` may add attributes as items pass."""
    if _state.tracer is None:
        return events
    return _traced(name, events, parent, on_item, current, attributes)


async def _traced(
    name: str,
    events: AsyncGenerator[T, None],
    parent: Any,
    on_item: Callable[[Any, T], None] | None,
    current: bool,
    attributes: dict[str, Any],
) -> AsyncGenerator[T, None]:
    from opentelemetry import trace

    s = start(name, parent, **attributes)
    error: BaseException | None = None
    try:
        while True:
            if current:
                with trace.use_span(
                    s, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    item = await anext(events, _END)
            else:
                item = await anext(events, _END)
            if item is _END:
                return
            if on_item is not None:
                on_item(s, item)
            yield item
    except BaseException as exc:
        error = exc
        raise
    finally:
        await events.aclose()
        if error is not None and not isinstance(error, GeneratorExit):
            _fail(s, error)
        s.end()


_END: Any = object()


def _fail(span: Any, error: BaseException | str) -> None:
    from opentelemetry.trace import Status, StatusCode

    description = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    span.set_status(Status(StatusCode.ERROR, description[:500]))
    if isinstance(error, BaseException):
        span.set_attribute("error.type", type(error).__name__)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float and lists of them; None is left out."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, str | bool | int | float):
            out[key] = value
        elif isinstance(value, list | tuple):
            out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    return out


# --- the server's side: the client's traceparent -------------------------------------------------


class TraceContextMiddleware:
    """ASGI middleware: each HTTP request in a server span whose parent is the client's W3C
    ``traceparent``/``tracestate`` (when given), current while the request is handled, so the
    engine's spans join the caller's trace. Passes requests straight through when tracing is off."""

    def __init__(self, app: Any, name_of: Callable[[str], str] = lambda path: path) -> None:
        self.app = app
        self.name_of = name_of  # the span's name from the path: bounded (a client's ids and made-up paths)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if _state.tracer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", ())
            if k in (b"traceparent", b"tracestate")
        }
        parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        method, path = scope.get("method", "GET"), scope.get("path", "")
        s = _state.tracer.start_span(
            f"{method} {self.name_of(path)}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        status: list[int] = []

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                s.set_attribute("http.response.status_code", status[0])
            await send(message)

        token = context.attach(trace.set_span_in_context(s, parent))
        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            _fail(s, exc)
            raise
        finally:
            context.detach(token)
            if status and status[0] >= 500:
                _fail(s, f"HTTP {status[0]}")
            s.end()
