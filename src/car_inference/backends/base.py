"""What a backend is: small task protocols, the output of a generation, and shared plumbing.

A backend serves one source ``kind`` (``gguf``, ``openai``...) and implements the task methods its
models can do. The engine knows a model can embed from ``ModelSchema.capabilities`` (data), then
calls ``backend.embed``; a backend without the method yields ``UnsupportedMode``. Which tasks a
backend class implements (``TASK_PROTOCOLS``, ``class_tasks``) decides whether its models are
available at all: a model whose backend implements none of its tasks cannot run.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import math
import threading
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InferenceFailed, InvalidInput
from ..requests import (
    Classification,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateImageRequest,
    GenerateImageResult,
    GenerateRequest,
    GenerateVideoRequest,
    GenerateVideoResult,
    RerankedDocument,
    RerankRequest,
    RerankResult,
    SynthesizeRequest,
    SynthesizeResult,
    TokenUsage,
    ToolCall,
    TranscribedSegment,
    TranscribeRequest,
    TranscribeResult,
)
from ..schema import ModelCapability, ModelSchema
from ..stream import Done, StreamEvent
from .fair import FairExecutor

if TYPE_CHECKING:
    from ..config import CarConfig
    from .cache import ModelCache

__all__ = [
    "PAUSE",
    "TASK_PROTOCOLS",
    "Backend",
    "BackendContext",
    "Classifier",
    "Embedder",
    "GenerationOutput",
    "ImageGenerator",
    "KeyProvider",
    "PromptCounter",
    "Reranker",
    "SegmentCallback",
    "Synthesizer",
    "TextGenerator",
    "Tokenizer",
    "Transcriber",
    "VideoChecker",
    "VideoGenerator",
    "class_tasks",
    "cosine",
    "iterate_in_thread",
    "label_distribution",
    "ranked_result",
    "run_blocking",
    "run_stoppable",
    "until_stopped",
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

    def acquire(self, env_var: str, *, resting: bool = True) -> str | None: ...
    def report(self, env_var: str, key: str, *, status: int | None, retry_after: float | None) -> None: ...
    def refused(self, env_var: str) -> bool:
        """Whether every key of ``env_var`` was refused by the provider (why ``acquire`` gives none)."""
        ...

    def rest_left(self, env_var: str) -> float:
        """Seconds until a usable key of ``env_var`` is free after a 429; 0 while one is."""
        ...


@dataclass
class BackendContext:
    """What every backend gets: settings, the shared loaded-model cache, and the key pool."""

    config: CarConfig
    cache: ModelCache
    keys: KeyProvider | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # Whether image URLs on loopback or private addresses are fetched (``image_input``): the
    # engine's ``private_urls_ok``, off in the server for its clients.
    private_urls_ok: bool = True


@runtime_checkable
class TextGenerator(Protocol):
    async def generate(self, model: ModelSchema, request: GenerateRequest) -> GenerationOutput: ...
    def stream(self, model: ModelSchema, request: GenerateRequest) -> AsyncGenerator[StreamEvent, None]: ...


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


# Called with each stretch of a transcript as it is decoded, from the worker thread decoding it,
# by backends that decode in steps (faster-whisper, a 30-second window a step); others call nothing.
SegmentCallback = Callable[[TranscribedSegment], None]


@runtime_checkable
class Transcriber(Protocol):
    async def transcribe(
        self, model: ModelSchema, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult: ...


@runtime_checkable
class Synthesizer(Protocol):
    async def synthesize(self, model: ModelSchema, request: SynthesizeRequest) -> SynthesizeResult: ...


@runtime_checkable
class ImageGenerator(Protocol):
    async def generate_image(
        self, model: ModelSchema, request: GenerateImageRequest, progress: Any = None
    ) -> GenerateImageResult: ...


@runtime_checkable
class VideoGenerator(Protocol):
    async def generate_video(
        self, model: ModelSchema, request: GenerateVideoRequest, progress: Any = None
    ) -> GenerateVideoResult: ...


@runtime_checkable
class VideoChecker(Protocol):
    """A video backend that can say, without calling anything, what it would refuse of a request
    (a field its API has no place for, a mode or format it cannot make): a server refuses such a
    request when the job is asked for, not as a job that fails later."""

    def check_video(self, model: ModelSchema, request: GenerateVideoRequest) -> None: ...


@runtime_checkable
class PromptCounter(Protocol):
    """An in-process backend that counts a request's prompt tokens on the model's own tokenizer."""

    def count_prompt_tokens(self, model: ModelSchema, request: GenerateRequest) -> int: ...

    def count_text_tokens(self, model: ModelSchema, text: str) -> int:
        """The tokens of ``text`` as the model writes it (no BOS, control tokens as text)."""
        ...


# What the engine holds for a model kind: an object doing one or more of the tasks above. Callers
# narrow it with isinstance (the protocols are runtime-checkable) before calling a task.
Backend = (
    TextGenerator
    | Embedder
    | Reranker
    | Classifier
    | Tokenizer
    | Transcriber
    | Synthesizer
    | ImageGenerator
    | VideoGenerator
)


# The task a capability asks of a backend. The other capabilities (vision, tool_use, code...)
# qualify generation and need no method of their own.
TASK_PROTOCOLS: dict[ModelCapability, type] = {
    ModelCapability.GENERATE: TextGenerator,
    ModelCapability.EMBED: Embedder,
    ModelCapability.RERANK: Reranker,
    ModelCapability.CLASSIFY: Classifier,
    ModelCapability.SPEECH_TO_TEXT: Transcriber,
    ModelCapability.TEXT_TO_SPEECH: Synthesizer,
    ModelCapability.IMAGE_GENERATION: ImageGenerator,
    ModelCapability.VIDEO_GENERATION: VideoGenerator,
}


def _protocol_methods(protocol: type) -> frozenset[str]:
    return frozenset(name for name, value in vars(protocol).items() if callable(value) and name[0] != "_")


def _tasks(methods: Callable[[str], bool]) -> frozenset[ModelCapability]:
    return frozenset(
        capability
        for capability, protocol in TASK_PROTOCOLS.items()
        if all(methods(name) for name in _protocol_methods(protocol))
    )


@functools.cache
def class_tasks(target: str) -> frozenset[ModelCapability]:
    """The capabilities whose task protocol the backend class ``module:Class`` implements.

    Read from the class's source and its bases' when they can be (importing a hosted SDK takes
    seconds, and availability is computed for every model at start-up); otherwise the class is
    imported and asked."""
    module, _, name = target.partition(":")
    methods = _source_methods(module, name)
    if methods is not None:
        return _tasks(methods.__contains__)
    cls = getattr(importlib.import_module(module), name)
    return _tasks(lambda method: callable(getattr(cls, method, None)))


@functools.cache
def _source_methods(module: str, name: str) -> frozenset[str] | None:
    """Names the class ``name`` of ``module`` and its bases define, read from source; None when
    that cannot be known without running the module (no source, a base from elsewhere)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    node = classes.get(name)
    if node is None:
        return None
    names = {item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)} | {
        t.id
        for item in node.body
        if isinstance(item, ast.Assign)
        for t in item.targets
        if isinstance(t, ast.Name)
    }
    imported = _imported_names(tree, module if spec.submodule_search_locations else module.rpartition(".")[0])
    for base in node.bases:
        if not isinstance(base, ast.Name):
            return None
        if base.id in classes:
            inherited = _source_methods(module, base.id)
        elif base.id in imported:
            inherited = _source_methods(*imported[base.id])
        else:
            return None
        if inherited is None:
            return None
        names |= inherited
    return frozenset(names)


def _imported_names(tree: ast.Module, package: str) -> dict[str, tuple[str, str]]:
    """``from X import Y as Z`` at the top of a module: Z -> (absolute X, Y)."""
    out: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:
                out[alias.asname or alias.name] = (source, alias.name)
    return out


T = TypeVar("T")

_END = object()


# Model work gets its own threads: a request waiting for a busy model's lock holds a thread, and
# the loop's default pool (cpu + 4 threads) would let a few such waits stall unrelated work.
_MODEL_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="car-model")


def openmp_thread(name: str) -> FairExecutor:
    """One thread for all of a native library's compute calls in this process (``run_blocking``
    and ``iterate_in_thread`` take it as their executor). llama.cpp and torch parallelise each step
    with OpenMP, and libgomp keeps a pool of threads per *calling* thread; once the process holds
    more pool threads than CPUs it stops spinning between steps and sleeps. Called from the model
    pool, the first requests that overlapped made every later one slower for good: on 2 cores
    SmolLM2's decode fell from 93 to 32 tokens/s, MiniLM's embeddings by 10-25 %. Work for the
    library's models then queues here, in fair turns between clients (``fair.FairExecutor``)."""
    return FairExecutor(name)


async def run_blocking(fn: Callable[[], T], executor: Executor | None = None) -> T:
    """Run blocking model work in the model thread pool (or ``executor``), off the event loop, in
    the caller's context (``fair.CLIENT`` says whose turn a model lock gives)."""
    in_context = functools.partial(contextvars.copy_context().run, fn)
    return await asyncio.get_running_loop().run_in_executor(executor or _MODEL_THREADS, in_context)


def until_stopped(items: Iterable[T], stop: threading.Event, what: str) -> Iterator[T]:
    """``items`` one at a time until ``stop`` is set (``run_stoppable``: the caller went away),
    then ``InferenceFailed`` saying ``what`` stopped: the work frees its model at the next step."""
    for item in items:
        if stop.is_set():
            raise InferenceFailed(f"{what} stopped: its caller went away")
        yield item


async def run_stoppable(work: Callable[[threading.Event], T], executor: Executor | None = None) -> T:
    """``run_blocking`` for work done in steps (a diffusion step, a sentence): ``work`` gets an
    event that is set when the caller stops waiting (cancelled: a client that went away), and is
    to check it between steps and give up, so a thread is not held for an answer nobody reads."""
    stop = threading.Event()
    try:
        return await run_blocking(lambda: work(stop), executor)
    except asyncio.CancelledError:
        stop.set()
        raise


def label_distribution(labels: list[str], logits: list[float], model_id: str, method: str) -> Classification:
    """Softmax of per-label scores (log-likelihoods or scaled similarities), sorted best first."""
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = sum(weights)
    results = [ClassifyResult(label=lab, score=w / total) for lab, w in zip(labels, weights, strict=True)]
    results.sort(key=lambda r: -r.score)
    return Classification(results=results, model_used=model_id, method=method)


def over_window(model: ModelSchema, counts: list[int], window: int, truncate: bool) -> list[int]:
    """The indices of the texts longer than ``window`` tokens (``counts``: each text's, uncut);
    with ``truncate`` False the first of them is ``InvalidInput`` naming it and the window."""
    cut = [i for i, n in enumerate(counts) if n > window]
    if cut and not truncate:
        i = cut[0]
        raise InvalidInput(
            f"texts[{i}] is {counts[i]} tokens; {model.id} reads at most {window}: split it, or "
            f"allow truncation to embed its first {window}",
            param=f"texts[{i}]",
        )
    return cut


def cosine(dot: float) -> float:
    """A dot product of unit vectors as a cosine: float error put a text against itself at
    1.0000001, past what a cosine can be."""
    return min(1.0, max(-1.0, float(dot)))


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


# What an iterator run by ``iterate_in_thread`` yields to give its thread to waiting work: the
# rest of it is queued again (``FairExecutor.resume``) and continues at its next turn.
PAUSE: Any = object()

# Items made but not yet read past which a pausing iterator stays paused until its reader has
# caught up to BACKLOG_LOW: a stream kept in a variable and not read (nor closed) generated on to
# max_tokens holding the model, and the same caller's next request waited for it (79 s).
BACKLOG_HIGH = 128
BACKLOG_LOW = 32


class StreamControl(threading.Event):
    """What ``iterate_in_thread`` hands its iterator: set when the consumer stops reading, and
    ``behind()``, whether the consumer is BACKLOG_HIGH items behind (pause when you can)."""

    def __init__(self) -> None:
        super().__init__()
        self._unread = 0
        self._lock = threading.Lock()
        self.parked: Iterator[Any] | None = None  # the rest of a paused iterator, waiting for reads

    def behind(self) -> bool:
        return self._unread >= BACKLOG_HIGH

    def made(self) -> None:
        with self._lock:
            self._unread += 1

    def park(self, items: Iterator[Any]) -> bool:
        """Keep ``items`` (paused) until the reader catches up; False when it has meanwhile."""
        with self._lock:
            if self._unread < BACKLOG_HIGH or self.is_set():
                return False
            self.parked = items
            return True

    def read(self) -> Iterator[Any] | None:
        """One item read; the parked rest to resume once the reader is down to BACKLOG_LOW."""
        with self._lock:
            self._unread -= 1
            if self.parked is None or self._unread > BACKLOG_LOW:
                return None
            items, self.parked = self.parked, None
            return items

    def unpark(self) -> Iterator[Any] | None:
        with self._lock:
            items, self.parked = self.parked, None
            return items


async def iterate_in_thread(
    make_iterator: Callable[[threading.Event], Iterator[T]], executor: Executor | None = None
) -> AsyncGenerator[T, None]:
    """Run a blocking iterator in a worker thread (of ``executor``, by default the model thread
    pool) and yield its items on the event loop.

    The iterator gets a ``StreamControl`` (a ``threading.Event``) that is set when the consumer
    stops reading (breaks out, is cancelled, or closes the generator); it must check it between
    items and return, so a stream nobody reads stops generating. Exceptions raised in the thread
    re-raise here. When it yields ``PAUSE`` (having let go of what it holds), its thread is given
    up and the rest runs later as new work of the same caller, first among that caller's (another
    client's turn) -- or, while the consumer is ``behind()``, once it has read its backlog down.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    control = StreamControl()
    pool = executor or _MODEL_THREADS
    context = contextvars.copy_context()
    resume = getattr(pool, "resume", pool.submit)

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def go_on(items: Iterator[T]) -> None:  # in a copy: a pool of several threads may start it first
        resume(contextvars.copy_context().run, produce, items)

    def produce(items: Iterator[T] | None = None) -> None:
        if control.is_set() and items is None:  # given up while it waited for a thread: start nothing
            put(_END)
            return
        ended = True
        try:
            if items is None:
                items = make_iterator(control)
            elif control.is_set():  # paused, then given up: closed below, without going on
                return
            for item in items:
                if control.is_set():
                    break
                if item is PAUSE:
                    ended = False
                    if not control.park(items):
                        go_on(items)
                    return
                control.made()
                put(item)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            if ended:
                if items is not None:
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()
                put(_END)

    worker = loop.run_in_executor(pool, context.run, produce)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            if isinstance(item, _Failure):
                raise item.exc
            parked = control.read()
            if parked is not None:
                go_on(parked)
            yield item
    finally:
        # The worker notices at its next item and returns, releasing the model lock it holds; a
        # parked rest is resumed to see it and close.
        control.set()
        parked = control.unpark()
        if parked is not None:
            go_on(parked)
        worker.add_done_callback(_consume_exception)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass
class _Failure:
    exc: BaseException
