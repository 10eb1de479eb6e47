"""InferenceEngine: resolve -> route -> run with fallbacks -> record. The one facade.

The engine is the only module that knows every layer. The CLI and the server talk to it (and to
``config``/``errors``) and nothing else. Its methods are async; ``SyncInferenceEngine`` wraps
them for scripts and notebooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from . import backends as backend_table
from .backends.base import BackendContext, GenerationOutput
from .backends.cache import ModelCache
from .config import CarConfig, load_config
from .errors import (
    AllModelsFailed,
    InferenceError,
    InferenceFailed,
    ModelUnavailable,
    SpendLimitExceeded,
    UnsupportedMode,
)
from .keys import KeyPool
from .registry import UnifiedRegistry
from .requests import (
    Classification,
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferenceResult,
    RerankRequest,
    RerankResult,
    TokenizeResult,
    TokenUsage,
    parse_boxes,
)
from .schema import ModelCapability, ModelSchema
from .stream import Done, ErrorEvent, StreamEvent, UsageEvent

__all__ = ["InferenceEngine", "SyncInferenceEngine"]

T = TypeVar("T")

DONE_TOOL_INSTRUCTION = (
    "IMPORTANT: When calling the `done` tool, the `result` field MUST contain a DETAILED summary of "
    "everything you found and did. This is the ONLY output the user sees. Do NOT just say 'completed' "
    "— include specific findings, data, and conclusions."
)


def _new_trace_id() -> str:
    return uuid.uuid4().hex


class InferenceEngine:
    """One API over every model in the registry.

    ``InferenceEngine()`` reads ``$CAR_HOME`` (default ``~/.car``): ``config.toml`` and
    ``models.toml``. Pass ``config`` to use settings built in code.
    """

    def __init__(self, config: CarConfig | None = None, *, home: Path | None = None) -> None:
        self.config = config if config is not None else load_config(home)
        self.keys = KeyPool.for_config(self.config)
        self.registry = UnifiedRegistry.from_config(
            self.config, key_check=self.keys.has_key, backend_check=backend_table.backend_available
        )
        self.cache = ModelCache(self.config.local.cache_mb)
        self._backend_ctx = BackendContext(config=self.config, cache=self.cache, keys=self.keys)
        self._backends: dict[str, Any] = {}
        self._backends_lock = threading.Lock()

    # --- models ------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelSchema:
        """The model called ``name`` (id, name or alias); ``ModelNotFound`` suggests close names."""
        return self.registry.resolve(name)

    def list_models(self) -> list[ModelSchema]:
        return self.registry.list()

    def register_model(self, schema: ModelSchema) -> ModelSchema:
        return self.registry.register(schema)

    def register_endpoint(
        self, base_url: str, model: str, *, api_key_env: str | None = None, name: str = "endpoint"
    ) -> ModelSchema:
        """Make ``model`` on an OpenAI-compatible server at ``base_url`` a catalog model
        (``{name}/{model}``) for this engine, e.g. for ``car generate --base-url``."""
        from .catalog import EndpointConfig

        endpoint = EndpointConfig(name=name, base_url=base_url, api_key_env=api_key_env, models=[model])
        return self.registry.register(endpoint.to_schemas()[0])

    async def discover_endpoints(
        self, names: Iterable[str] | None = None
    ) -> dict[str, list[str] | InferenceError]:
        """Ask each configured endpoint (``[[endpoints]]`` in models.toml; by default those with
        ``discover = true``) which models it serves and register them. Returns, per endpoint, the
        model ids registered or the error that stopped it."""
        from .runtimes.endpoints import list_served_models

        wanted = set(names) if names is not None else None
        report: dict[str, list[str] | InferenceError] = {}
        for endpoint in self.registry.endpoints:
            if (wanted is None and not endpoint.discover) or (
                wanted is not None and endpoint.name not in wanted
            ):
                continue
            try:
                served = await list_served_models(endpoint, timeout_s=self.config.remote.connect_timeout_s)
            except InferenceError as exc:
                report[endpoint.name] = exc
                continue
            report[endpoint.name] = [self.registry.register(s).id for s in endpoint.to_schemas(served)]
        return report

    def _backend(self, model: ModelSchema) -> Any:
        with self._backends_lock:
            backend = self._backends.get(model.kind)
            if backend is None:
                cls = backend_table.load_backend_class(model.kind, model.id)
                backend = self._backends[model.kind] = cls(self._backend_ctx)
            return backend

    def _runnable(self, model: ModelSchema) -> Any:
        """The backend for ``model``, or ``ModelUnavailable`` saying what to do about it."""
        if not model.available:
            raise ModelUnavailable(model.id, self.registry.unavailable_reason(model))
        return self._backend(model)

    def _task_method(
        self, model: ModelSchema, capability: ModelCapability, method: str
    ) -> Callable[..., Any]:
        if not model.has_capability(capability):
            raise UnsupportedMode(str(capability), model.kind, f"{model.id} does not declare {capability}")
        backend = self._runnable(model)
        fn = getattr(backend, method, None)
        if fn is None:
            raise UnsupportedMode(
                str(capability), model.kind, f"the {model.kind} backend does not implement {method}"
            )
        return fn

    def default_model(self, capability: ModelCapability) -> ModelSchema | None:
        """The configured model for ``capability`` (preferred, then default), if it resolves."""
        for name in (
            self.config.preferred.for_capability(capability),
            self.config.defaults.for_capability(capability),
        ):
            if name:
                found = self.registry.find(name)
                if found is not None:
                    return found
        return None

    def pull(self, name: str) -> Path:
        """Download a model's files from Hugging Face into the HF cache (the only code path that
        downloads weights; nothing else ever does). Returns the local file or folder."""
        from .catalog.pull import pull_model

        model = self.resolve(name)
        path = pull_model(model)
        self.registry.refresh_availability()
        return path

    async def warm_up(self, model_ids: Iterable[str]) -> list[InferenceError | None]:
        """Load models ahead of the first request; one entry per id (None when it loaded)."""
        results: list[InferenceError | None] = []
        for model_id in model_ids:
            try:
                model = self.resolve(model_id)
                backend = self._runnable(model)
                warm = getattr(backend, "warm_up", None)
                if warm is not None:
                    await asyncio.get_running_loop().run_in_executor(None, warm, model)
                results.append(None)
            except InferenceError as exc:
                results.append(exc)
        return results

    # --- generation --------------------------------------------------------------------------

    def _candidates(self, request: GenerateRequest) -> list[ModelSchema]:
        """The model to try first and its fallbacks."""
        if request.model:
            return [self.resolve(request.model)]
        configured = self.default_model(ModelCapability.GENERATE)
        if configured is not None and configured.available:
            return [configured]
        local = self.registry.query(
            capabilities=[ModelCapability.GENERATE], available_only=True, local_only=True
        )
        if local:
            return local[:1]
        if configured is not None:
            return [configured]  # unavailable: the attempt explains why
        raise ModelUnavailable(
            "generate", "no text generation model is available; install 'car-inference[gguf]'"
        )

    def _prepare(self, request: GenerateRequest, model: ModelSchema) -> GenerateRequest:
        """Apply the model's sampling defaults (explicit request values win) and the seed's
        ``done``-tool instruction."""
        update: dict[str, Any] = {}
        if model.default_params:
            given = request.params.model_fields_set
            defaults = {k: v for k, v in model.default_params.items() if k not in given}
            if defaults:
                update["params"] = request.params.model_copy(update=defaults)
        if request.tools and any(_tool_name(t) == "done" for t in request.tools):
            update["context"] = f"{request.context or ''}\n\n{DONE_TOOL_INSTRUCTION}"
        return request.model_copy(update=update) if update else request

    def _result(
        self, model: ModelSchema, out: GenerationOutput, trace_id: str, start: float
    ) -> InferenceResult:
        usage = out.usage
        usage = _with_cost(model, usage)
        return InferenceResult(
            text=out.text,
            tool_calls=out.tool_calls,
            bounding_boxes=parse_boxes(out.text) if model.has_capability(ModelCapability.GROUNDING) else [],
            trace_id=trace_id,
            model_used=model.id,
            latency_ms=round((time.perf_counter() - start) * 1000, 3),
            time_to_first_token_ms=out.time_to_first_token_ms,
            usage=usage,
            provider_output_items=out.provider_output_items,
            thinking=out.thinking,
        )

    async def generate(self, request: GenerateRequest) -> InferenceResult:
        """Generate text; on failure, try the fallbacks in order. Raises ``AllModelsFailed`` listing
        every attempt when none succeeds."""
        start = time.perf_counter()
        trace_id = _new_trace_id()
        attempts: list[tuple[str, InferenceError]] = []
        for model in self._candidates(request):
            try:
                backend = self._runnable(model)
                out = await backend.generate(model, self._prepare(request, model))
            except SpendLimitExceeded:
                raise
            except InferenceError as exc:
                attempts.append((model.id, exc))
                continue
            return self._result(model, out, trace_id, start)
        raise _final_error(attempts)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """Stream events for ``request``; the last is a ``Done`` carrying the trace id, model,
        latency and usage. A model whose stream fails before its first event is replaced by the
        next fallback; a failure after that ends the stream with an ``ErrorEvent``."""
        start = time.perf_counter()
        trace_id = _new_trace_id()
        attempts: list[tuple[str, InferenceError]] = []
        for model in self._candidates(request):
            started = False
            ttft: float | None = None
            usage: TokenUsage | None = None
            try:
                backend = self._runnable(model)
                events = backend.stream(model, self._prepare(request, model))
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, Done):
                            usage = _with_cost(model, event.usage or usage)
                            yield event.model_copy(
                                update={
                                    "model_used": model.id,
                                    "trace_id": trace_id,
                                    "latency_ms": round((time.perf_counter() - start) * 1000, 3),
                                    "time_to_first_token_ms": ttft,
                                    "usage": usage,
                                }
                            )
                            return
                        if isinstance(event, UsageEvent):
                            usage = event.usage
                        elif ttft is None:
                            ttft = round((time.perf_counter() - start) * 1000, 3)
                        started = True
                        yield event
            except SpendLimitExceeded:
                raise
            except InferenceError as exc:
                if started:
                    yield ErrorEvent(message=str(exc), retryable=getattr(exc, "retryable", False))
                    return
                attempts.append((model.id, exc))
                continue
            if started:
                yield ErrorEvent(message=f"{model.id}: stream ended without a final event")
                return
            attempts.append((model.id, InferenceFailed(f"{model.id}: stream ended before any output")))
        raise _final_error(attempts)

    # --- tokens ------------------------------------------------------------------------------

    def _tokenizer(self, name: str) -> tuple[ModelSchema, Any]:
        model = self.resolve(name)
        if not model.is_local:
            raise UnsupportedMode(
                "tokenize/detokenize",
                "remote",
                "remote provider tokenizer is not exposed by the runtime; use a local model "
                "(a GGUF model) for tokenizer-correctness checks",
            )
        backend = self._runnable(model)
        if not hasattr(backend, "tokenize"):
            raise UnsupportedMode(
                "tokenize/detokenize", model.kind, f"the {model.kind} backend has no tokenizer"
            )
        return model, backend

    async def tokenize(self, model: str, text: str) -> TokenizeResult:
        schema, backend = self._tokenizer(model)
        return TokenizeResult(model_used=schema.id, tokens=await backend.tokenize(schema, text))

    async def detokenize(self, model: str, tokens: list[int]) -> TokenizeResult:
        schema, backend = self._tokenizer(model)
        text = await backend.detokenize(schema, tokens)
        return TokenizeResult(model_used=schema.id, tokens=list(tokens), text=text)

    # --- embeddings, rerank, classify --------------------------------------------------------

    def _model_for(
        self, name: str | None, capability: ModelCapability, fallback: ModelCapability | None = None
    ) -> ModelSchema:
        if name:
            return self.resolve(name)
        for cap in (capability, fallback):
            if cap is not None and (model := self.default_model(cap)) is not None:
                return model
        available = self.registry.query(capabilities=[capability], available_only=True, local_only=True)
        if available:
            return available[0]
        raise ModelUnavailable(str(capability), f"no model is configured for {capability}")

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        model = self._model_for(request.model, ModelCapability.EMBED)
        return await self._task_method(model, ModelCapability.EMBED, "embed")(model, request)

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Documents ordered by relevance. With no model: the configured reranker, else embedding
        similarity on the default embedding model."""
        if not request.documents:
            return RerankResult(ranked=[], model_used=None, method="none")
        model = self._model_for(request.model, ModelCapability.RERANK, ModelCapability.EMBED)
        capability = (
            ModelCapability.RERANK if model.has_capability(ModelCapability.RERANK) else ModelCapability.EMBED
        )
        return await self._task_method(model, capability, "rerank")(model, request)

    async def classify(self, request: ClassifyRequest) -> Classification:
        """Zero-shot classification: label log-likelihoods on a generative model, or similarity
        on an embedding model. With no model: the configured classifier, else the default
        embedding model, else the default generation model."""
        model = self._classifier(request)
        if request.method == "embedding" and not model.has_capability(ModelCapability.EMBED):
            raise UnsupportedMode("classify/embedding", model.kind, f"{model.id} has no embeddings")
        if request.method == "likelihood" and model.kind != "gguf":
            raise UnsupportedMode(
                "classify/likelihood", model.kind, f"{model.id} exposes no token likelihoods"
            )
        return await self._task_method(model, ModelCapability.CLASSIFY, "classify")(model, request)

    def _classifier(self, request: ClassifyRequest) -> ModelSchema:
        if request.model:
            return self.resolve(request.model)
        order = {
            "auto": (ModelCapability.CLASSIFY, ModelCapability.EMBED, ModelCapability.GENERATE),
            "embedding": (ModelCapability.EMBED,),
            "likelihood": (ModelCapability.GENERATE,),
        }[request.method]
        for capability in order:
            model = self.default_model(capability)
            if model is not None and model.available and model.has_capability(ModelCapability.CLASSIFY):
                return model
        return self._model_for(None, order[0])


def _with_cost(model: ModelSchema, usage: TokenUsage | None) -> TokenUsage | None:
    """Usage with ``cost_usd`` from the catalog's prices, unless the backend already set it."""
    if usage is None or usage.cost_usd is not None:
        return usage
    cost = model.cost.estimate(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens or 0)
    return usage.model_copy(update={"cost_usd": cost})


def _tool_name(tool: dict[str, Any]) -> str | None:
    fn = tool.get("function", tool)
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def _final_error(attempts: list[tuple[str, InferenceError]]) -> InferenceError:
    if len(attempts) == 1:
        return attempts[0][1]
    return AllModelsFailed(attempts)


class SyncInferenceEngine:
    """Blocking facade: the same methods as ``InferenceEngine``, run on a private event loop thread.

    Use it from scripts and notebooks; inside async code use ``InferenceEngine`` directly.
    """

    def __init__(self, engine: InferenceEngine | None = None, **kwargs: Any) -> None:
        self.engine = engine if engine is not None else InferenceEngine(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="car-inference-loop", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, request: GenerateRequest | str, **kwargs: Any) -> InferenceResult:
        if isinstance(request, str):
            request = GenerateRequest(prompt=request, **kwargs)
        return self._run(self.engine.generate(request))

    def stream(self, request: GenerateRequest | str, **kwargs: Any) -> Iterable[StreamEvent]:
        if isinstance(request, str):
            request = GenerateRequest(prompt=request, **kwargs)
        agen = self.engine.stream(request)
        try:
            while True:
                try:
                    yield self._run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def embed(self, request: EmbedRequest) -> EmbedResult:
        return self._run(self.engine.embed(request))

    def rerank(self, request: RerankRequest) -> RerankResult:
        return self._run(self.engine.rerank(request))

    def classify(self, request: ClassifyRequest) -> Classification:
        return self._run(self.engine.classify(request))

    def tokenize(self, model: str, text: str) -> TokenizeResult:
        return self._run(self.engine.tokenize(model, text))

    def detokenize(self, model: str, tokens: list[int]) -> TokenizeResult:
        return self._run(self.engine.detokenize(model, tokens))

    def call(self, fn: Callable[[InferenceEngine], Awaitable[T]]) -> T:
        """Run any engine coroutine: ``sync.call(lambda e: e.warm_up([...]))``."""

        async def run() -> T:
            return await fn(self.engine)

        return self._run(run())

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncInferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()
