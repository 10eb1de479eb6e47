"""SyncInferenceEngine: the engine's methods for code that does not run an event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from ..errors import InferenceError, InvalidInput, validation_summary
from ..requests import (
    Classification,
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    GenerateImageRequest,
    GenerateImageResult,
    GenerateParams,
    GenerateRequest,
    GenerateVideoRequest,
    GenerateVideoResult,
    GroundRequest,
    GroundResult,
    InferenceResult,
    RerankRequest,
    RerankResult,
    SynthesizeRequest,
    SynthesizeResult,
    TokenizeResult,
    TranscribeRequest,
    TranscribeResult,
)
from ..stream import StreamEvent
from .core import InferenceEngine

if TYPE_CHECKING:
    from pathlib import Path

    from ..backends.base import SegmentCallback
    from ..backends.delegated import RunnerRegistration
    from ..backends.voices import VoiceList
    from ..routing import RoutingDecision
    from ..routing.profiles import ModelProfile
    from ..routing.spend import SpendStatus
    from ..schema import ModelCapability, ModelSchema
    from .health import ModelHealthReport

Progress = Callable[[int, int], None]

__all__ = ["SyncInferenceEngine"]

T = TypeVar("T")


class SyncInferenceEngine:
    """Blocking facade: the same methods as ``InferenceEngine``, run on a private event-loop thread.

    Use it from scripts and notebooks; inside async code use ``InferenceEngine`` directly (a call
    from the loop thread itself, as an async runner's, is refused: it would wait for itself).
    ``close`` (or leaving a ``with`` block) stops the loop and closes the engine it made; an engine
    passed in stays open for its owner. A closed facade refuses calls.
    """

    def __init__(self, engine: InferenceEngine | None = None, **kwargs: Any) -> None:
        if engine is not None and not isinstance(engine, InferenceEngine):
            # A path given positionally was taken as the engine: AttributeError at the first call.
            raise InvalidInput(
                f"SyncInferenceEngine: engine must be an InferenceEngine, not {type(engine).__name__}"
                " (a home folder is home=...)"
            )
        if engine is not None and kwargs:  # they were ignored: the engine given has its settings
            raise InvalidInput(
                f"SyncInferenceEngine: {', '.join(kwargs)} make a new engine; an engine given has its own"
            )
        self._owns = engine is None
        self.engine = engine if engine is not None else InferenceEngine(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="car-inference-loop", daemon=True)
        self._thread.start()
        self._closed = False
        # A facade dropped without close() kept its loop thread for good (one per facade made in
        # a loop); its engine, if it made one, cleans up after itself as any engine does.
        weakref.finalize(self, _stop_loop, self._loop, self._thread)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed or threading.current_thread() is self._thread:
            coro.close()  # never awaited: no "coroutine was never awaited" warning
            if self._closed:
                raise InferenceError("this SyncInferenceEngine is closed")
            raise InferenceError(
                "SyncInferenceEngine called from its own event-loop thread (an async runner?): "
                "await the InferenceEngine (its .engine) there instead"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:  # close() from another thread ended the call
                raise InferenceError("this SyncInferenceEngine was closed during the call") from None
            raise
        except BaseException:  # Ctrl-C (KeyboardInterrupt) in the caller: the work stops too
            future.cancel()  # a generation went on to max_tokens, the next call waiting for it
            raise

    def generate(self, request: GenerateRequest | str, **kwargs: Any) -> InferenceResult:
        return self._run(self.engine.generate(_request(request, kwargs)))

    def stream(self, request: GenerateRequest | str, **kwargs: Any) -> Iterator[StreamEvent]:
        agen = self.engine.stream(_request(request, kwargs))
        try:
            while True:
                try:
                    yield self._run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            # A stream dropped after close() (or alive at exit) has no loop to close it on: its
            # engine is closed already; raising here was an "Exception ignored" traceback.
            if not self._closed and self._loop.is_running():
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

    def ground(self, request: GroundRequest) -> GroundResult:
        return self._run(self.engine.ground(request))

    def transcribe(
        self, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        return self._run(self.engine.transcribe(request, on_segment))

    def synthesize(self, request: SynthesizeRequest) -> SynthesizeResult:
        return self._run(self.engine.synthesize(request))

    def list_voices(self, model: str | None = None) -> VoiceList:
        from .speech import list_voices

        return self._run(list_voices(self.engine, model))

    def generate_image(
        self, request: GenerateImageRequest, progress: Progress | None = None
    ) -> GenerateImageResult:
        """``progress(done, total)`` is called from a worker thread, as with the async engine."""
        return self._run(self.engine.generate_image(request, progress=progress))

    def generate_video(
        self, request: GenerateVideoRequest, progress: Progress | None = None
    ) -> GenerateVideoResult:
        return self._run(self.engine.generate_video(request, progress=progress))

    # A str goes through as it is (the engine takes one id or name alone): list() split it into
    # characters, each "not found", and nothing was loaded or asked, without an error.
    def warm_up(self, model_ids: Iterable[str]) -> list[InferenceError | None]:
        return self._run(self.engine.warm_up(model_ids if isinstance(model_ids, str) else list(model_ids)))

    def discover_endpoints(self, names: Iterable[str] | None = None) -> dict[str, list[str] | InferenceError]:
        wanted = None if names is None else names if isinstance(names, str) else list(names)
        return self._run(self.engine.discover_endpoints(wanted))

    def route_async(self, request: GenerateRequest) -> RoutingDecision:
        return self._run(self.engine.route_async(request))

    def route_adaptive(self, prompt: str, **params: Any) -> RoutingDecision:
        return self._run(self.engine.route_adaptive(prompt, **params))

    # The engine's blocking methods, for a script that holds only this facade (refused once it is
    # closed, as the rest are: route, report and export answered after close()).

    def _live(self) -> InferenceEngine:
        if self._closed:
            raise InferenceError("this SyncInferenceEngine is closed")
        return self.engine

    def route(self, request: GenerateRequest | str, **kwargs: Any) -> RoutingDecision:
        """``InferenceEngine.route``; a prompt string with request fields as ``generate`` takes
        (``route("Hi.", max_tokens=8)``): a str was refused while ``generate`` took one."""
        return self._live().route(_request(request, kwargs))

    def resolve(self, name: str) -> ModelSchema:
        return self._live().resolve(name)

    def list_models(self) -> list[ModelSchema]:
        return self._live().list_models()

    def model_health(self) -> ModelHealthReport:
        return self._live().model_health()

    def feedback(
        self,
        trace_id: str,
        score: float,
        *,
        latency_ms: float | None = None,
        output_tokens: int | None = None,
        cost_usd: float | None = None,
        success: bool = True,
    ) -> None:
        """A rating of ``trace_id``'s answer (``InferenceEngine.feedback``)."""
        self._live().feedback(
            trace_id,
            score,
            latency_ms=latency_ms,
            output_tokens=output_tokens,
            cost_usd=cost_usd,
            success=success,
        )

    def report(
        self,
        decision: RoutingDecision,
        *,
        success: bool = True,
        score: float | None = None,
        cost_usd: float | None = None,
        latency_ms: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int = 0,
        model_id: str | None = None,
        prompt: str | None = None,
    ) -> str:
        """The outcome of a decision the caller executed itself (``InferenceEngine.report``)."""
        return self._live().report(
            decision, success=success, score=score, cost_usd=cost_usd, latency_ms=latency_ms,
            input_tokens=input_tokens, output_tokens=output_tokens, model_id=model_id, prompt=prompt,
        )  # fmt: skip

    def forget_model(self, name: str) -> tuple[str, int]:
        return self._live().forget_model(name)

    def register_model(self, schema: ModelSchema) -> ModelSchema:
        return self._live().register_model(schema)

    def register_endpoint(
        self, base_url: str, model: str, *, api_key_env: str | None = None, name: str = "endpoint"
    ) -> ModelSchema:
        return self._live().register_endpoint(base_url, model, api_key_env=api_key_env, name=name)

    def default_model(self, capability: ModelCapability) -> ModelSchema | None:
        return self._live().default_model(capability)

    def spend_status(self) -> SpendStatus:
        return self._live().spend_status()

    def export_profiles(self) -> list[ModelProfile]:
        return self._live().export_profiles()

    def import_profiles(self, profiles: list[ModelProfile | dict[str, Any]]) -> int:
        return self._live().import_profiles(profiles)

    def pull(self, name: str) -> Path:
        return self._live().pull(name)

    def flush(self) -> None:
        self._live().flush()

    def call(self, fn: Callable[[InferenceEngine], Awaitable[T]]) -> T:
        """Run any engine coroutine: ``sync.call(lambda e: e.warm_up([...]))``."""

        async def run() -> T:
            return await fn(self.engine)

        return self._run(run())

    def register_runner(
        self,
        runner: Any,
        models: Iterable[str | ModelSchema] | None = None,
        *,
        timeout_s: float | None = None,
        name: str | None = None,
    ) -> RunnerRegistration:
        """``InferenceEngine.register_runner``; an async runner runs on this facade's loop thread."""
        return self._live().register_runner(runner, models, timeout_s=timeout_s, name=name)

    def unregister_runner(self, registration: RunnerRegistration | Any) -> bool:
        return self.engine.unregister_runner(registration)

    def close(self) -> None:
        """Stop the loop thread and close the engine this facade made (``InferenceEngine.close``:
        pending records written, loaded models released). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            # Calls in flight from other threads are cancelled and their cleanup runs (a caller
            # blocked in one waited for ever: the loop stopped under it); they raise InferenceError.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        if self._owns:
            self.engine.close()

    def __enter__(self) -> SyncInferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """A dropped facade's loop: stopped, its thread ended (close() did this only when called)."""
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


async def _cancel_all(timeout_s: float = 5.0) -> None:
    """Cancel every other task of this loop and give them ``timeout_s`` to finish."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


def _request(request: GenerateRequest | str, fields: dict[str, Any]) -> GenerateRequest:
    """``generate("Hi.", max_tokens=8, model="smollm2")``: a prompt with request fields and
    ``GenerateParams`` fields side by side, as a ``GenerateRequest``; a wrong field or value is
    ``InvalidInput`` naming it."""
    if not isinstance(request, str):
        if fields:
            raise InvalidInput("keyword fields go with a prompt string, not with a GenerateRequest")
        return request
    params = {k: fields.pop(k) for k in list(fields) if k in GenerateParams.model_fields}
    if params and "params" in fields:
        raise InvalidInput(f"{', '.join(params)}: give them in params= or as keywords, not both")
    try:
        if params:
            fields["params"] = GenerateParams(**params)
        return GenerateRequest(prompt=request, **fields)
    except ValidationError as exc:
        raise InvalidInput(f"generate: {validation_summary(exc)}") from None


def _shared_docs() -> None:
    """``help(SyncInferenceEngine.generate)`` says what ``InferenceEngine.generate`` does (the
    facade's methods had no docstrings of their own)."""
    for name, method in vars(SyncInferenceEngine).items():
        source = getattr(InferenceEngine, name, None)
        if callable(method) and not name.startswith("_") and not method.__doc__ and source is not None:
            method.__doc__ = source.__doc__


_shared_docs()
