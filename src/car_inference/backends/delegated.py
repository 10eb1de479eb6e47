"""Delegated models: inference the host application supplies (the seed's ``InferenceRunner``).

A model whose source is ``{kind = "delegated"}`` runs on a *runner* the host registers at run time,
``InferenceEngine.register_runner(runner, models=[...])``, or a JSON-RPC client that sends
``runner.register`` (server/runner_rpc.py). Until one is registered the model is unavailable; then
it is routed, falls back and is recorded like any other model. A runner is either

- a callable ``runner(model, request)`` (async; a plain function runs in a worker thread) taking
  the ``ModelSchema`` and ``GenerateRequest`` and returning the text (``str``), a
  ``GenerationOutput`` or a dict of its fields, or an async iterator of text pieces / stream events
  (a streamed answer); or
- an object with the backend task methods (``generate``/``stream``, ``embed``, ``rerank``,
  ``classify``, ``transcribe``, ``synthesize``, ``generate_image``, ``generate_video``) with the
  signatures of ``backends.base``'s protocols: it does the tasks it has.

A registration's ``timeout_s`` bounds a whole answer (and, streamed, the wait for each event); a
runner that does not answer in time fails the attempt as a retryable timeout, so the router's
fallbacks take over. Cancelling the caller cancels the runner's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import InferenceError, ModelUnavailable, ProviderError, UnsupportedMode
from ..requests import (
    Classification,
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    GenerateImageRequest,
    GenerateImageResult,
    GenerateRequest,
    GenerateVideoRequest,
    GenerateVideoResult,
    RerankRequest,
    RerankResult,
    SynthesizeRequest,
    SynthesizeResult,
    TokenUsage,
    TranscribeRequest,
    TranscribeResult,
)
from ..schema import ModelSchema
from ..stream import (
    Done,
    ErrorEvent,
    StreamAccumulator,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageEvent,
)
from .base import BackendContext, GenerationOutput, SegmentCallback

__all__ = [
    "DelegatedBackend",
    "RunnerRegistration",
    "RunnerTable",
    "as_output",
    "result_events",
    "stream_problem",
]

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)
_names = itertools.count(1)


@dataclass(eq=False)
class RunnerRegistration:
    """One registered runner: the models it serves (None: every delegated model), its timeout, the
    models its registration added to the catalog (removed with it), and whether the costs it
    reports are the engine owner's spend (``spends``: True for a runner the host registers in
    process; a client's runner over the server's socket is not, see server/runner_rpc.py)."""

    runner: Any
    models: frozenset[str] | None = None
    timeout_s: float | None = None
    name: str = ""
    owned_models: set[str] = field(default_factory=set)
    spends: bool = True

    def serves(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


class RunnerTable:
    """The runners registered with an engine; the latest registration serving a model wins."""

    def __init__(self) -> None:
        self._entries: list[RunnerRegistration] = []

    def add(
        self,
        runner: Any,
        *,
        models: list[str] | None = None,
        timeout_s: float | None = None,
        name: str | None = None,
    ) -> RunnerRegistration:
        if not (callable(runner) or any(callable(getattr(runner, m, None)) for m in _TASK_METHODS)):
            raise TypeError("a runner is an async callable or an object with task methods (generate, ...)")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        entry = RunnerRegistration(
            runner,
            None if models is None else frozenset(models),
            timeout_s,
            name or getattr(runner, "__name__", None) or f"runner-{next(_names)}",
        )
        self._entries.append(entry)
        return entry

    def remove(self, registration: RunnerRegistration | Any) -> RunnerRegistration | None:
        """Drop a registration (or every registration of a runner object); the one dropped."""
        for entry in reversed(self._entries):
            if entry is registration or entry.runner is registration:
                self._entries.remove(entry)
                return entry
        return None

    def find(self, model_id: str) -> RunnerRegistration | None:
        """The runner for ``model_id``: the one that brought it to the catalog, if one did (no
        other runner, not even one serving every delegated model, gets its calls), else the
        latest that serves it."""
        owner = next((e for e in self._entries if model_id in e.owned_models), None)
        return owner or next((e for e in reversed(self._entries) if e.serves(model_id)), None)

    def serves(self, model: ModelSchema) -> bool:
        return self.find(model.id) is not None

    def spends(self, model_id: str) -> bool:
        """Whether what ``model_id`` costs is the owner's spend: False when a runner that does not
        spend (a client's) serves it."""
        entry = self.find(model_id)
        return entry is None or entry.spends

    def list(self) -> list[RunnerRegistration]:
        return list(self._entries)


_TASK_METHODS = (
    "generate", "stream", "embed", "rerank", "classify", "transcribe", "synthesize",
    "generate_image", "generate_video",
)  # fmt: skip


# What a runner may stream besides text pieces (route events are the engine's own).
_EVENT_TYPES = (TextDelta, ThinkingDelta, ToolCallStart, ToolCallDelta, UsageEvent, Done)


def as_output(value: Any, model_id: str, runner: str, context_length: int = 0) -> GenerationOutput:
    """What a runner answered, as a ``GenerationOutput``: text, the output itself, or its fields;
    its usage's total and context window filled in where it left them out (0)."""
    if isinstance(value, GenerationOutput):
        out = value
    elif isinstance(value, str):
        out = GenerationOutput(text=value)
    elif isinstance(value, Done):
        out = GenerationOutput.from_done(value, None)
    elif isinstance(value, dict):
        try:
            out = GenerationOutput.model_validate(value)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise _runner_error(runner, model_id, f"answered an invalid result: {problem}") from None
    else:
        raise _runner_error(runner, model_id, f"answered a {type(value).__name__}, not text or a result")
    _check_finish(out.finish_reason, model_id, runner)
    if out.usage is not None and (usage := filled_usage(out.usage, context_length)) is not out.usage:
        out = out.model_copy(update={"usage": usage})
    return out


# What a generation may say it finished for (OpenAI's words, which every wire speaks through us).
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})


def _check_finish(reason: str | None, model_id: str, runner: str) -> None:
    """A runner's ``finish_reason`` is one we pass on: "garbage" reached callers over HTTP too."""
    if reason is not None and reason not in FINISH_REASONS:
        known = ", ".join(sorted(FINISH_REASONS))
        raise _runner_error(
            runner, model_id, f"answered an invalid result: finish_reason {reason!r} is not one of {known}"
        )


def result_events(
    out: GenerationOutput, streamed: StreamAccumulator, model_id: str, runner: str
) -> Iterator[StreamEvent]:
    """The end of a stream whose runner answered ``out`` as a result: what it did not stream
    already (the rest of its thinking and text, its tool calls), then ``Done``. A streaming client
    saw only the role and the finish otherwise. A result that contradicts what was streamed (text
    "xyz" after "abc", other tool calls) is the runner's invalid answer: the client saw one answer
    and the record, the spend and a non-streaming caller would have had another."""
    text, calls = streamed.finish()
    yield from _rest(streamed.thinking or "", out.thinking or "", ThinkingDelta, "thinking", model_id, runner)
    yield from _rest(text, out.text, TextDelta, "text", model_id, runner)
    if (
        calls
        and out.tool_calls
        and [(c.name, c.arguments) for c in calls] != [(c.name, c.arguments) for c in out.tool_calls]
    ):
        raise _runner_error(
            runner, model_id, "answered a result whose tool calls are not the ones it streamed"
        )
    if not calls:
        for index, call in enumerate(out.tool_calls):
            yield ToolCallStart(index=index, id=call.id, name=call.name)
            yield ToolCallDelta(index=index, arguments=call.invalid_arguments or json.dumps(call.arguments))
    yield Done(
        text=out.text or text,
        tool_calls=out.tool_calls or calls,
        thinking=out.thinking or streamed.thinking,
        usage=out.usage or streamed.usage,
        finish_reason=out.finish_reason,
    )


def _rest(
    streamed: str,
    final: str,
    event: type[TextDelta] | type[ThinkingDelta],
    what: str,
    model_id: str,
    runner: str,
) -> Iterator[StreamEvent]:
    """The part of a result's ``final`` text past what was ``streamed`` of it (none where the
    result leaves it out)."""
    if not final or final == streamed:
        return
    if not final.startswith(streamed):
        raise _runner_error(
            runner, model_id, f"answered a result whose {what} does not continue the {what} it streamed"
        )
    yield event(text=final[len(streamed) :])


def stream_problem(event: StreamEvent, started: set[int]) -> str | None:
    """What is wrong with a runner's streamed ``event`` given the tool calls ``started`` so far
    (which it updates): arguments for a call never started made a call without id or name."""
    if isinstance(event, ToolCallStart):
        started.add(event.index)
    elif isinstance(event, ToolCallDelta) and event.index not in started:
        return f"streamed arguments for tool call {event.index} before its tool_call_start"
    return None


def _done_with_usage(done: Done, context_length: int) -> Done:
    if done.usage is None or (usage := filled_usage(done.usage, context_length)) is done.usage:
        return done
    return done.model_copy(update={"usage": usage})


def filled_usage(usage: TokenUsage, context_length: int) -> TokenUsage:
    """``usage`` with ``total_tokens`` (prompt + completion) and ``context_window`` (the model's)
    where a runner gave 0: they were reported as 0 alongside the counts it did give."""
    total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
    window = usage.context_window or context_length
    if (total, window) == (usage.total_tokens, usage.context_window):
        return usage
    return usage.model_copy(update={"total_tokens": total, "context_window": window})


def _runner_error(runner: str, model_id: str, message: str, **kw: Any) -> ProviderError:
    return ProviderError(message, provider=f"runner {runner}", model=model_id, **kw)


class DelegatedBackend:
    """Every task of a delegated model, handed to the runner registered for it."""

    kind = "delegated"

    def __init__(self, ctx: BackendContext) -> None:
        self.runners: RunnerTable = ctx.extras.setdefault("runners", RunnerTable())

    def _registration(self, model: ModelSchema) -> RunnerRegistration:
        entry = self.runners.find(model.id)
        if entry is None:
            raise ModelUnavailable(model.id, "no inference runner is registered for it")
        return entry

    async def _bounded(self, entry: RunnerRegistration, model: ModelSchema, work: Awaitable[T]) -> T:
        """``work`` within the registration's timeout; a runner's own failure becomes ours."""
        try:
            async with asyncio.timeout(entry.timeout_s):
                return await work
        except TimeoutError:
            raise _runner_error(
                entry.name, model.id, f"no answer in {entry.timeout_s:g} s", retryable=True, timeout=True
            ) from None
        except (InferenceError, StopAsyncIteration):
            raise
        except Exception as exc:
            raise _runner_error(entry.name, model.id, f"failed: {type(exc).__name__}: {exc}") from exc

    # --- generation --------------------------------------------------------------------------

    async def _start(self, entry: RunnerRegistration, model: ModelSchema, fn: Callable[..., Any],
                     *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """``fn(model, *args)``: what an async runner returns (an awaitable or an async iterator,
        the caller's to consume), or the answer of a plain function, run in a worker thread (it
        may block) within the timeout. Either's exception is the runner's failure, a ProviderError."""
        if not _is_async(fn):
            return await self._bounded(entry, model, asyncio.to_thread(fn, model, *args, **kwargs))
        try:
            return fn(model, *args, **kwargs)
        except InferenceError:
            raise
        except Exception as exc:  # raised before its first await (a sync wrapper, a bad signature)
            raise _runner_error(entry.name, model.id, f"failed: {type(exc).__name__}: {exc}") from exc

    async def _invoke(self, entry: RunnerRegistration, model: ModelSchema, request: GenerateRequest, *,
                      streaming: bool) -> Any:  # fmt: skip
        """The runner's answer to ``request``: an async iterator (a stream) or a whole answer (an
        awaitable is awaited within the timeout: an ``async def`` may return either)."""
        runner = entry.runner
        names = ("stream", "generate") if streaming else ("generate", "stream")
        method = next((m for n in names if callable(m := getattr(runner, n, None))), runner)
        if not callable(method):
            raise UnsupportedMode(
                "generate", "delegated", f"the runner for {model.id} does not generate text"
            )
        value = await self._start(entry, model, method, request)
        if inspect.isawaitable(value):
            value = await self._bounded(entry, model, value)
        return value

    async def generate(self, model: ModelSchema, request: GenerateRequest) -> GenerationOutput:
        entry = self._registration(model)
        value = await self._invoke(entry, model, request, streaming=False)
        if not isinstance(value, AsyncIterator):
            return as_output(value, model.id, entry.name, model.context_length)
        done: Done | None = None
        async with contextlib.aclosing(self._events(entry, model, value)) as events:
            async for event in events:
                done = event if isinstance(event, Done) else done
        assert done is not None  # _events always ends with Done
        return GenerationOutput.from_done(done, None)

    async def stream(self, model: ModelSchema, request: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        entry = self._registration(model)
        value = await self._invoke(entry, model, request, streaming=True)
        if isinstance(value, AsyncIterator):
            async with contextlib.aclosing(self._events(entry, model, value)) as events:
                async for event in events:
                    yield event
            return
        out = as_output(value, model.id, entry.name, model.context_length)
        for event in result_events(out, StreamAccumulator(), model.id, entry.name):
            yield event

    async def _events(
        self, entry: RunnerRegistration, model: ModelSchema, items: AsyncIterator[Any]
    ) -> AsyncGenerator[StreamEvent, None]:
        """A runner's stream as events (text pieces become deltas), each within the timeout,
        always ending with ``Done``."""
        accumulator = StreamAccumulator()
        started: set[int] = set()
        try:
            while True:
                try:
                    item = await self._bounded(entry, model, anext(items))
                except StopAsyncIteration:
                    break
                event = TextDelta(text=item) if isinstance(item, str) else item
                if isinstance(event, ErrorEvent):
                    raise _runner_error(entry.name, model.id, event.message, retryable=event.retryable)
                if not isinstance(event, _EVENT_TYPES):
                    raise _runner_error(entry.name, model.id, f"streamed a {type(item).__name__}")
                if problem := stream_problem(event, started):
                    raise _runner_error(entry.name, model.id, problem)
                if isinstance(event, Done):  # its answer, held to what it streamed as a result is
                    _check_finish(event.finish_reason, model.id, entry.name)
                    out = GenerationOutput.from_done(event, None)
                    for last in result_events(out, accumulator, model.id, entry.name):
                        yield _done_with_usage(last, model.context_length) if isinstance(last, Done) else last
                    return
                accumulator.push(event)
                yield event
        finally:
            await _close(items)
        text, calls = accumulator.finish()
        done = Done(text=text, tool_calls=calls, thinking=accumulator.thinking, usage=accumulator.usage)
        yield _done_with_usage(done, model.context_length)

    # --- the other tasks -----------------------------------------------------------------------

    async def _forward(
        self, model: ModelSchema, method: str, result: type[R], *args: Any, **kwargs: Any
    ) -> R:
        """The runner's ``method`` on this request; its answer as ``result`` (a dict of its fields is
        validated into one)."""
        entry = self._registration(model)
        fn: Callable[..., Awaitable[Any]] | None = getattr(entry.runner, method, None)
        if not callable(fn):
            raise UnsupportedMode(
                method, "delegated", f"the runner registered for {model.id} has no {method}"
            )
        value = await self._start(entry, model, fn, *args, **kwargs)
        if inspect.isawaitable(value):
            value = await self._bounded(entry, model, value)
        if isinstance(value, result):
            return value
        try:
            return result.model_validate(value)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise _runner_error(
                entry.name, model.id, f"answered an invalid {method} result: {problem}"
            ) from None

    async def embed(self, model: ModelSchema, request: EmbedRequest) -> EmbedResult:
        return await self._forward(model, "embed", EmbedResult, request)

    async def rerank(self, model: ModelSchema, request: RerankRequest) -> RerankResult:
        return await self._forward(model, "rerank", RerankResult, request)

    async def classify(self, model: ModelSchema, request: ClassifyRequest) -> Classification:
        return await self._forward(model, "classify", Classification, request)

    async def transcribe(
        self, model: ModelSchema, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        """The whole transcript at once: ``on_segment`` is never called."""
        return await self._forward(model, "transcribe", TranscribeResult, request)

    async def synthesize(self, model: ModelSchema, request: SynthesizeRequest) -> SynthesizeResult:
        return await self._forward(model, "synthesize", SynthesizeResult, request)

    async def generate_image(
        self, model: ModelSchema, request: GenerateImageRequest, progress: Any = None
    ) -> GenerateImageResult:
        return await self._forward(model, "generate_image", GenerateImageResult, request, progress=progress)

    async def generate_video(
        self, model: ModelSchema, request: GenerateVideoRequest, progress: Any = None
    ) -> GenerateVideoResult:
        return await self._forward(model, "generate_video", GenerateVideoResult, request, progress=progress)


async def _close(value: Any) -> None:
    close = getattr(value, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` starts asynchronous work (an ``async def`` function or generator, or
    an object whose ``__call__`` is one) rather than doing the work there and then."""
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own method
    return any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (fn, call) if f is not None
    )
