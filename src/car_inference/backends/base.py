"""What a backend is: small task protocols, the output of a generation, and shared plumbing.

A backend serves one source ``kind`` (``gguf``, ``openai``...) and implements the task methods its
models can do. The engine knows a model can embed from ``ModelSchema.capabilities`` (data), then
calls ``backend.embed``; a backend without the method yields ``UnsupportedMode``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from ..requests import (
    Classification,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    RerankedDocument,
    RerankRequest,
    RerankResult,
    TokenUsage,
    ToolCall,
)
from ..schema import ModelSchema
from ..stream import Done, StreamEvent

if TYPE_CHECKING:
    from ..config import CarConfig
    from .cache import ModelCache

__all__ = [
    "BackendContext",
    "Classifier",
    "Embedder",
    "GenerationOutput",
    "KeyProvider",
    "Reranker",
    "TextGenerator",
    "Tokenizer",
    "iterate_in_thread",
    "label_distribution",
    "ranked_result",
    "run_blocking",
]


class GenerationOutput(BaseModel):
    """What a backend's ``generate`` returns; the engine adds trace id, model and latency."""

    model_config = ConfigDict(extra="forbid")

    text: str = ""
    thinking: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: TokenUsage | None = None
    time_to_first_token_ms: float | None = None
    finish_reason: str | None = None
    provider_output_items: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def from_done(cls, done: Done, ttft_ms: float | None) -> GenerationOutput:
        return cls.model_construct(
            text=done.text,
            thinking=done.thinking,
            tool_calls=list(done.tool_calls),
            usage=done.usage,
            time_to_first_token_ms=ttft_ms,
            finish_reason=done.finish_reason,
            provider_output_items=list(done.provider_output_items),
        )


class KeyProvider(Protocol):
    """Hands out API keys per key variable and learns from how they fared (see ``keys.KeyPool``)."""

    def acquire(self, env_var: str) -> str | None: ...
    def report(self, env_var: str, key: str, *, status: int | None, retry_after: float | None) -> None: ...


@dataclass
class BackendContext:
    """What every backend gets: settings, the shared loaded-model cache, and the key pool."""

    config: CarConfig
    cache: ModelCache
    keys: KeyProvider | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TextGenerator(Protocol):
    async def generate(self, model: ModelSchema, request: GenerateRequest) -> GenerationOutput: ...
    def stream(self, model: ModelSchema, request: GenerateRequest) -> AsyncIterator[StreamEvent]: ...


@runtime_checkable
class Embedder(Protocol):
    async def embed(self, model: ModelSchema, request: EmbedRequest) -> EmbedResult: ...


@runtime_checkable
class Reranker(Protocol):
    async def rerank(self, model: ModelSchema, request: RerankRequest) -> RerankResult: ...


@runtime_checkable
class Classifier(Protocol):
    async def classify(self, model: ModelSchema, request: ClassifyRequest) -> Classification: ...


@runtime_checkable
class Tokenizer(Protocol):
    async def tokenize(self, model: ModelSchema, text: str) -> list[int]: ...
    async def detokenize(self, model: ModelSchema, tokens: list[int]) -> str: ...


T = TypeVar("T")

_END = object()


# Model work gets its own threads: a request waiting for a busy model's lock holds a thread, and
# the loop's default pool (cpu + 4 threads) would let a few such waits stall unrelated work.
_MODEL_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="car-model")


async def run_blocking(fn: Callable[[], T]) -> T:
    """Run blocking model work in the model thread pool, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_MODEL_THREADS, fn)


def label_distribution(labels: list[str], logits: list[float], model_id: str, method: str) -> Classification:
    """Softmax of per-label scores (log-likelihoods or scaled similarities), sorted best first."""
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = sum(weights)
    results = [ClassifyResult(label=lab, score=w / total) for lab, w in zip(labels, weights, strict=True)]
    results.sort(key=lambda r: -r.score)
    return Classification(results=results, model_used=model_id, method=method)


def ranked_result(request: RerankRequest, scores: list[float], model_id: str, method: str) -> RerankResult:
    """Documents sorted by score, ties in input order, cut to ``top_n``."""
    docs = [
        RerankedDocument(index=i, score=float(s), document=d)
        for i, (d, s) in enumerate(zip(request.documents, scores, strict=True))
    ]
    docs.sort(key=lambda d: (-d.score, d.index))
    if request.top_n is not None:
        docs = docs[: request.top_n]
    return RerankResult(ranked=docs, model_used=model_id, method=method)


async def iterate_in_thread(
    make_iterator: Callable[[threading.Event], Iterator[T]],
) -> AsyncIterator[T]:
    """Run a blocking iterator in a worker thread and yield its items on the event loop.

    The iterator gets a ``threading.Event`` that is set when the consumer stops reading (breaks
    out, is cancelled, or closes the generator); it must check it between items and return, so a
    stream nobody reads stops generating. Exceptions raised in the thread re-raise here.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def produce() -> None:
        try:
            for item in make_iterator(cancelled):
                if cancelled.is_set():
                    break
                put(item)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            put(_END)

    worker = loop.run_in_executor(_MODEL_THREADS, produce)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        # The worker notices at its next item and returns, releasing the model lock it holds.
        cancelled.set()
        worker.add_done_callback(_consume_exception)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass
class _Failure:
    exc: BaseException
