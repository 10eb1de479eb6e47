"""Delegated models run on runners the host registers in Python (InferenceEngine.register_runner):
real engines, real runners (async functions, generators, objects); no patching."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from car_inference.backends.base import GenerationOutput
from car_inference.backends.delegated import result_events
from car_inference.engine import InferenceEngine
from car_inference.errors import (
    AllModelsFailed,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    ProviderError,
    UnsupportedMode,
)
from car_inference.requests import ClassifyRequest, EmbedRequest, GenerateRequest, TokenUsage, ToolCall
from car_inference.schema import ModelSchema
from car_inference.stream import (
    Done,
    StreamAccumulator,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageEvent,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_examples() -> list[str]:
    """The Python blocks of the README's section on delegated models."""
    text = README.read_text()
    section = text.split("## Host-supplied inference (delegated models)\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


CATALOG = """
[[models]]
id = "host/echo"
name = "echo"
provider = "host"
capabilities = ["generate", "embed"]
context_length = 8192
[models.source]
kind = "delegated"

[[models]]
id = "host/slow"
name = "slow"
provider = "host"
capabilities = ["generate"]
context_length = 8192
fallbacks = ["host/echo"]
[models.source]
kind = "delegated"
"""


@pytest.fixture
def engine(isolated_home: Path) -> Any:
    (isolated_home / "models.toml").write_text(CATALOG)
    (isolated_home / "config.toml").write_text("[routing]\nprefer_local = false\nexploration_rate = 0.0\n")
    engine = InferenceEngine()
    yield engine
    engine.close()


def _ask(prompt: str, model: str | None = None) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, model=model)


async def _echo(model: ModelSchema, request: GenerateRequest) -> str:
    return f"{model.name}: {request.last_user_text()}"


async def test_a_delegated_model_runs_only_while_a_runner_serves_it(engine: InferenceEngine) -> None:
    echo = engine.resolve("host/echo")
    assert not echo.available
    assert "no inference runner is registered" in engine.registry.unavailable_reason(echo)
    with pytest.raises(ModelUnavailable, match="no inference runner is registered"):
        await engine.generate(_ask("hi", "host/echo"))

    registration = engine.register_runner(_echo, ["echo"])  # a name resolves like anywhere else
    assert registration.models == {"host/echo"} and registration.name == "_echo"
    assert engine.resolve("host/echo").available and not engine.resolve("host/slow").available
    result = await engine.generate(_ask("hi", "host/echo"))
    assert result.text == "echo: hi" and result.model_used == "host/echo" and result.trace_id

    assert engine.unregister_runner(_echo)  # by the runner object, as well as by registration
    assert not engine.resolve("host/echo").available
    assert not engine.unregister_runner(_echo)


async def test_the_router_takes_a_delegated_model_like_any_other(engine: InferenceEngine) -> None:
    brought = ModelSchema.model_validate(
        {"id": "app/best", "name": "best", "provider": "app", "capabilities": ["generate"],
         "context_length": 100000, "quality": 1.0, "source": {"kind": "delegated", "hint": "the app"}}
    )  # fmt: skip
    registration = engine.register_runner(_echo, [brought])
    decision = engine.route(_ask("Summarize local-first AI in one sentence."))
    assert decision.model_id == "app/best"
    result = await engine.generate(_ask("Summarize local-first AI in one sentence."))
    assert result.model_used == "app/best" and result.text.startswith("best: ")
    engine.breakers.record_failure("app/best")  # a breaker that has seen it
    assert "app/best" in engine.model_health().circuit_breakers
    engine.unregister_runner(registration)  # the model it brought leaves with it, breaker too
    with pytest.raises(ModelNotFound):
        engine.resolve("app/best")
    assert "app/best" not in engine.model_health().circuit_breakers


async def test_a_model_a_runner_brought_is_its_alone(engine: InferenceEngine) -> None:
    """Another runner registering it (or serving every delegated model) took its calls."""
    brought = ModelSchema.model_validate(
        {"id": "app/own", "name": "own", "provider": "app", "capabilities": ["generate"],
         "source": {"kind": "delegated"}}
    )  # fmt: skip

    async def other(model: ModelSchema, request: GenerateRequest) -> str:
        return "not the owner"

    owner = engine.register_runner(_echo, [brought], name="owner")
    with pytest.raises(InvalidInput, match=r"app/own is served by the runner that brought it \(owner\)"):
        engine.register_runner(other, ["app/own"])
    everything = engine.register_runner(other)  # every delegated model
    try:
        assert engine.runners.find("app/own") is owner
        assert (await engine.generate(_ask("hi", model="app/own"))).text.startswith("own: ")
    finally:
        engine.unregister_runner(everything)
        engine.unregister_runner(owner)


async def test_a_streaming_runner_streams_and_also_answers_whole(engine: InferenceEngine) -> None:
    async def runner(model: ModelSchema, request: GenerateRequest) -> AsyncIterator[Any]:
        yield ThinkingDelta(text="hmm")
        for piece in ("one ", "two"):
            await asyncio.sleep(0)
            yield piece
        yield UsageEvent(usage=TokenUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5))

    engine.register_runner(runner, ["host/echo"])
    events = [e async for e in engine.stream(_ask("count", "host/echo"))]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    done = events[-1]
    assert deltas == ["one ", "two"] and isinstance(done, Done)
    assert done.text == "one two" and done.thinking == "hmm" and done.usage is not None
    assert done.usage.total_tokens == 5 and done.model_used == "host/echo"
    result = await engine.generate(_ask("count", "host/echo"))
    assert result.text == "one two" and result.usage is not None and result.usage.completion_tokens == 2


async def test_a_runner_that_contradicts_its_own_stream_is_an_invalid_answer(engine: InferenceEngine) -> None:
    async def orphan_arguments(model: ModelSchema, request: GenerateRequest) -> AsyncIterator[Any]:
        yield ToolCallDelta(index=0, arguments='{"city": "Oslo"}')  # no ToolCallStart: no id, no name

    engine.register_runner(orphan_arguments, ["host/echo"])
    with pytest.raises(ProviderError, match="arguments for tool call 0 before its tool_call_start"):
        await engine.generate(_ask("x", "host/echo"))
    with pytest.raises(ProviderError, match="answered a result whose text does not continue"):
        list(result_events(GenerationOutput(text="xyz"), _streamed(TextDelta(text="abc")), "host/echo", "r"))
    call = ToolCallStart(index=0, id="c1", name="get_weather")
    streamed = _streamed(call, ToolCallDelta(index=0, arguments='{"city": "Oslo"}'))
    other = GenerationOutput(
        text="", tool_calls=[ToolCall(id="c1", name="get_weather", arguments={"city": "Rome"})]
    )
    with pytest.raises(ProviderError, match="tool calls are not the ones it streamed"):
        list(result_events(other, streamed, "host/echo", "r"))

    async def done_contradicts(model: ModelSchema, request: GenerateRequest) -> AsyncIterator[Any]:
        yield "abc"
        yield Done(text="xyz")  # a 200: the stream said one thing and the answer another

    engine.register_runner(done_contradicts, ["host/echo"])
    with pytest.raises(ProviderError, match="whose text does not continue the text it streamed"):
        await engine.generate(_ask("x", "host/echo"))

    async def done_goes_on(model: ModelSchema, request: GenerateRequest) -> AsyncIterator[Any]:
        yield "abc"
        yield Done(text="abcdef", tool_calls=[ToolCall(id="c1", name="f", arguments={})])

    engine.register_runner(done_goes_on, ["host/echo"])
    events = [e async for e in engine.stream(_ask("x", "host/echo"))]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "abcdef"
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["f"]  # streamed, not only in Done
    longer = result_events(GenerationOutput(text="abcdef"), _streamed(TextDelta(text="abc")), "m", "r")
    more = [e.text for e in longer if isinstance(e, TextDelta)]
    assert more == ["def"]  # a result that goes on from the stream streams the rest


def _streamed(*events: Any) -> StreamAccumulator:
    accumulator = StreamAccumulator()
    for event in events:
        accumulator.push(event)
    return accumulator


async def test_a_whole_answer_streams_as_one_delta(engine: InferenceEngine) -> None:
    async def runner(model: ModelSchema, request: GenerateRequest) -> dict[str, Any]:
        return {"text": "all at once", "finish_reason": "stop"}

    engine.register_runner(runner, ["host/echo"])
    events = [e async for e in engine.stream(_ask("x", "host/echo"))]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["all at once"]
    assert isinstance(events[-1], Done) and events[-1].text == "all at once"


async def test_a_whole_answer_streams_its_tool_calls_and_fills_in_its_usage(engine: InferenceEngine) -> None:
    async def runner(model: ModelSchema, request: GenerateRequest) -> dict[str, Any]:
        call = {"id": "c1", "name": "get_weather", "arguments": {"city": "Oslo"}}
        return {"text": "", "tool_calls": [call], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}

    engine.register_runner(runner, ["host/echo"])
    events = [e async for e in engine.stream(_ask("x", "host/echo"))]
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    arguments = "".join(e.arguments for e in events if isinstance(e, ToolCallDelta))
    assert [s.name for s in starts] == ["get_weather"] and json.loads(arguments) == {"city": "Oslo"}
    done = events[-1]
    assert isinstance(done, Done) and done.usage is not None
    assert (done.usage.total_tokens, done.usage.context_window) == (7, 8192)  # it said 0 and 0
    result = await engine.generate(_ask("x", "host/echo"))
    assert result.usage is not None and (result.usage.total_tokens, result.usage.context_window) == (7, 8192)


def _sync_raises(model: ModelSchema, request: GenerateRequest) -> str:
    raise RuntimeError("sync boom")


def _sync_answers(model: ModelSchema, request: GenerateRequest) -> str:
    time.sleep(0.05)  # a blocking runner: in a worker thread, not on the loop
    return f"sync: {request.last_user_text()}"


async def test_a_plain_function_runner_runs_in_a_thread_and_its_failure_falls_back(
    engine: InferenceEngine,
) -> None:
    engine.register_runner(_sync_raises, ["host/slow"])
    with pytest.raises(AllModelsFailed) as caught:  # its fallback, host/echo, has no runner yet
        await engine.generate(_ask("hi", "host/slow"))
    failure = dict(caught.value.attempts)["host/slow"]
    assert isinstance(failure, ProviderError) and "failed: RuntimeError: sync boom" in str(failure)
    engine.register_runner(_sync_answers, ["host/echo"])
    result = await engine.generate(_ask("hi", "host/slow"))
    assert result.model_used == "host/echo" and result.text == "sync: hi"
    events = [e async for e in engine.stream(_ask("yo", "host/echo"))]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["sync: yo"]


async def test_an_embedding_runner_must_answer_one_vector_per_text(engine: InferenceEngine) -> None:
    class OneVector:
        async def embed(self, model: ModelSchema, request: EmbedRequest) -> dict[str, Any]:
            return {"embeddings": [[1.0, 0.0]], "model_used": model.id, "dimensions": 2}

    engine.register_runner(OneVector(), ["host/echo"])
    with pytest.raises(ProviderError, match="holds 1 vectors for 2 texts"):
        await engine.embed(EmbedRequest(texts=["a", "b"], model="host/echo"))


async def test_an_async_function_returning_an_async_iterator_streams(engine: InferenceEngine) -> None:
    """The README allows it; it was "answered a async_generator, not text or a result"."""

    async def pieces() -> AsyncIterator[str]:
        for piece in ("one ", "two"):
            yield piece

    async def runner(model: ModelSchema, request: GenerateRequest) -> AsyncIterator[str]:
        return pieces()

    engine.register_runner(runner, ["host/echo"])
    events = [e async for e in engine.stream(_ask("x", "host/echo"))]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["one ", "two"]
    assert (await engine.generate(_ask("x", "host/echo"))).text == "one two"


class TaskRunner:
    """A runner object: it generates and embeds, and classifies nothing."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def generate(self, model: ModelSchema, request: GenerateRequest) -> GenerationOutput:
        self.seen.append(request.last_user_text())
        return GenerationOutput(text="object says hi")

    async def embed(self, model: ModelSchema, request: EmbedRequest) -> dict[str, Any]:
        vectors = [[float(len(t)), 1.0] for t in request.texts]
        return {"embeddings": vectors, "model_used": model.id, "dimensions": 2}


async def test_a_runner_object_does_the_tasks_it_has(engine: InferenceEngine) -> None:
    runner = TaskRunner()
    engine.register_runner(runner, ["host/echo"])
    assert (await engine.generate(_ask("yo", "host/echo"))).text == "object says hi" and runner.seen == ["yo"]
    embedded = await engine.embed(EmbedRequest(texts=["abc", "de"], model="host/echo"))
    assert embedded.embeddings == [[3.0, 1.0], [2.0, 1.0]] and embedded.dimensions == 2
    with pytest.raises(UnsupportedMode, match="does not declare classify"):
        await engine.classify(ClassifyRequest(text="x", labels=["a", "b"], model="host/echo"))


async def test_a_runner_that_takes_too_long_times_out_and_the_fallback_answers(
    engine: InferenceEngine,
) -> None:
    cancelled = asyncio.Event()

    async def slow(model: ModelSchema, request: GenerateRequest) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "too late"

    engine.register_runner(slow, ["host/slow"], timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(AllModelsFailed, match=r"host/slow: no answer in 0.2 s") as caught:
        await engine.generate(_ask("hi", "host/slow"))  # its fallback (host/echo) has no runner yet
    timeout = dict(caught.value.attempts)["host/slow"]
    assert isinstance(timeout, ProviderError) and timeout.retryable and timeout.timeout
    assert "no inference runner is registered" in str(dict(caught.value.attempts)["host/echo"])
    assert cancelled.is_set()
    assert time.monotonic() - started < 5
    engine.register_runner(_echo, ["host/echo"])
    result = await engine.generate(_ask("hi", "host/slow"))
    assert result.model_used == "host/echo" and result.text == "echo: hi"


async def test_cancelling_the_caller_cancels_the_runner(engine: InferenceEngine) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waits(model: ModelSchema, request: GenerateRequest) -> AsyncIterator[str]:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield "never"

    engine.register_runner(waits, ["host/echo"])
    task = asyncio.create_task(engine.generate(_ask("hi", "host/echo")))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (RuntimeError("boom"), "failed: RuntimeError: boom"),
        (42, "answered a int, not text or a result"),
        ({"txt": "typo"}, "answered an invalid result"),
        ({"text": "x", "finish_reason": "garbage"}, "finish_reason 'garbage' is not one of"),
        (Done(text="x", finish_reason="garbage"), "finish_reason 'garbage' is not one of"),
        ("stream", "finish_reason 'garbage' is not one of"),  # a streamed Done, the same
    ],
)
async def test_a_runner_failure_is_a_provider_error_naming_it(
    engine: InferenceEngine, answer: Any, words: str
) -> None:
    async def streamed() -> Any:
        yield "x"
        yield Done(text="x", finish_reason="garbage")

    async def runner(model: ModelSchema, request: GenerateRequest) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return streamed() if answer == "stream" else answer

    engine.register_runner(runner, ["host/echo"], name="flaky")
    with pytest.raises(ProviderError, match=words) as caught:
        await engine.generate(_ask("hi", "host/echo"))
    assert "runner flaky host/echo" in str(caught.value)


def test_only_delegated_models_take_runners(engine: InferenceEngine) -> None:
    with pytest.raises(InvalidInput, match="is a gguf model; runners serve delegated ones"):
        engine.register_runner(_echo, ["huggingface/smollm2-135m-instruct:q4_1"])
    with pytest.raises(ModelNotFound, match="host/echo"):
        engine.register_runner(_echo, ["host/ecoh"])
    with pytest.raises(TypeError, match="async callable or an object with task methods"):
        engine.register_runner(object(), ["host/echo"])
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        engine.register_runner(_echo, ["host/echo"], timeout_s=0)
    assert engine.runners.list() == [] and not engine.resolve("host/echo").available


async def test_a_runner_for_every_delegated_model_and_the_latest_wins(engine: InferenceEngine) -> None:
    async def other(model: ModelSchema, request: GenerateRequest) -> str:
        return "other"

    engine.register_runner(_echo)  # every delegated model
    assert engine.resolve("host/echo").available and engine.resolve("host/slow").available
    assert (await engine.generate(_ask("a", "host/slow"))).text == "slow: a"
    latest = engine.register_runner(other, ["host/slow"])
    assert (await engine.generate(_ask("a", "host/slow"))).text == "other"
    engine.unregister_runner(latest)
    assert (await engine.generate(_ask("a", "host/slow"))).text == "slow: a"
    health = {k.kind: k for k in engine.model_health().kinds}
    assert health["delegated"].runners == 1 and health["delegated"].available_models == 2


def test_a_model_of_a_runners_own_cannot_take_a_name_another_model_answers_to(
    engine: InferenceEngine,
) -> None:
    """A client's model "meta-llama/Llama-3.1-8B-Instruct" took the prompts meant for an endpoint's
    model of that upstream name: an exact id is found before another model's names."""
    for taken in ("huggingface/smollm2-135m-instruct", "host/ECHO"):  # an id without its variant; a case
        mine = ModelSchema.model_validate(
            {"id": taken, "name": "x", "provider": "huggingface", "capabilities": ["generate"],
             "source": {"kind": "delegated"}}
        )  # fmt: skip
        with pytest.raises(InvalidInput, match=f"{taken} is a name of .*: a model of a runner's own"):
            engine.register_runner(_echo, [mine])
    assert engine.runners.list() == [] and engine.resolve("host/echo").id == "host/echo"


def test_a_runner_leaving_many_models_restores_names_in_one_pass(engine: InferenceEngine) -> None:
    """16,000 models brought by one runner took 99 s to leave (a pass over the catalog per model)."""
    brought = [
        ModelSchema.model_validate(
            {
                "id": f"app/m{i}",
                "name": f"m{i}",
                "provider": "app",
                "capabilities": ["generate"],
                "source": {"kind": "delegated"},
            }
        )
        for i in range(3)
    ]
    registration = engine.register_runner(_echo, brought)
    assert registration.owned_models == {"app/m0", "app/m1", "app/m2"}
    passes = 0
    lookup_keys = engine.registry._lookup_keys

    def counted(schema: ModelSchema) -> list[str]:
        nonlocal passes
        passes += schema.id == "host/echo"
        return lookup_keys(schema)

    engine.registry._lookup_keys = counted  # type: ignore[method-assign]
    engine.unregister_runner(registration)
    assert passes == 1, "each remaining model's names are restored once, not once per model that left"
    assert all(engine.registry.find(f"app/m{i}") is None for i in range(3))
    assert engine.registry.find("echo") is not None


async def test_a_new_runner_starts_with_a_closed_breaker(engine: InferenceEngine) -> None:
    """A runner that timed out and left kept host/echo's breaker open for the one that took over."""

    async def failing(model: ModelSchema, request: GenerateRequest) -> str:
        raise RuntimeError("down")

    good = engine.register_runner(_echo, ["host/echo"])
    bad = engine.register_runner(failing, ["host/echo"])
    for _ in range(10):
        engine.breakers.record_failure("host/echo")
    assert not engine.breakers.allow("host/echo")
    engine.unregister_runner(bad)
    assert engine.breakers.allow("host/echo")
    assert (await engine.generate(_ask("hi", "host/echo"))).text == "echo: hi"
    for _ in range(10):
        engine.breakers.record_failure("host/echo")
    engine.register_runner(_echo, ["host/echo"])
    assert engine.breakers.allow("host/echo")
    engine.unregister_runner(good)


def test_the_readme_example_runs(isolated_home: Path, tmp_path: Path) -> None:
    example = readme_examples()[0]
    env = {**os.environ, "CAR_HOME": str(isolated_home)}
    done = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "echo: hi\n"  # what the README says it prints
