"""The engine over the embedded local models (real inference, offline)."""

from __future__ import annotations

import pytest

from car_inference.engine import InferenceEngine
from car_inference.errors import ModelNotFound, ModelUnavailable, ProviderError, UnsupportedMode
from car_inference.requests import (
    AudioBlock,
    ContentBlock,
    EmbedRequest,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    Message,
    TextBlock,
    ThinkingMode,
)
from car_inference.routing.complexity import estimate_tokens
from car_inference.stream import Done, RouteEvent, TextDelta
from fakes import FakeProviderServer, Fault, Reply
from fakes.remote_kit import PNG

from .conftest import RemoteEngine

SMOL = "huggingface/smollm2-135m-instruct:q4_1"


def greedy(prompt: str, max_tokens: int = 40, **kw: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=GenerateParams(temperature=0, max_tokens=max_tokens), **kw)  # type: ignore[arg-type]


async def test_capital_of_france_is_paris(local_engine: InferenceEngine) -> None:
    result = await local_engine.generate(greedy("What is the capital of France?"))
    assert "Paris" in result.text
    assert result.model_used == SMOL
    assert len(result.trace_id) == 32
    assert result.latency_ms > 0 and result.time_to_first_token_ms is not None
    assert result.time_to_first_token_ms <= result.latency_ms
    assert result.time_to_first_token_ms == round(result.time_to_first_token_ms, 3), "as latency_ms"
    assert result.usage is not None and result.usage.cost_usd == 0.0
    assert set(result.model_dump()) == {
        "text", "tool_calls", "trace_id", "model_used", "latency_ms", "time_to_first_token_ms", "usage"
    }  # fmt: skip


async def test_stream_reassembles_to_the_same_text(local_engine: InferenceEngine) -> None:
    request = greedy("What is the capital of France?")
    events = [e async for e in local_engine.stream(request)]
    done = events[-1]
    assert isinstance(done, Done)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.text
    assert done.text == (await local_engine.generate(request)).text
    assert done.model_used == SMOL and done.trace_id and done.latency_ms and done.time_to_first_token_ms
    assert done.usage is not None and done.usage.completion_tokens > 0


async def test_model_defaults_apply_but_explicit_params_win(local_engine: InferenceEngine) -> None:
    model = local_engine.resolve(SMOL)
    prepared = local_engine._prepare(greedy("x"), model)
    assert prepared.params.repeat_penalty == 1.1
    explicit = GenerateRequest(prompt="x", params=GenerateParams(repeat_penalty=1.0))
    assert local_engine._prepare(explicit, model).params.repeat_penalty == 1.0


async def test_done_tool_adds_the_seed_instruction(local_engine: InferenceEngine) -> None:
    model = local_engine.resolve(SMOL)
    tools = [{"type": "function", "function": {"name": "done", "parameters": {"type": "object"}}}]
    prepared = local_engine._prepare(GenerateRequest(prompt="x", context="base", tools=tools), model)
    assert prepared.context is not None
    assert prepared.context.startswith("base\n\nIMPORTANT: When calling the `done` tool")


async def test_messages_and_system_context(local_engine: InferenceEngine) -> None:
    from car_inference.requests import Message

    history = [Message(role="user", content="My name is Ada."), Message(role="assistant", content="Hi Ada!")]
    question = Message(role="user", content="What is my name?")
    with_history = await local_engine.generate(
        GenerateRequest(
            messages=[*history, question], context="You are terse.", params=GenerateParams(max_tokens=8)
        )
    )
    alone = await local_engine.generate(
        GenerateRequest(messages=[question], context="You are terse.", params=GenerateParams(max_tokens=8))
    )
    assert with_history.text and with_history.usage and alone.usage
    # Every turn and the system text reach the model through its chat template.
    assert with_history.usage.prompt_tokens > alone.usage.prompt_tokens + 10


async def test_unknown_and_unavailable_models_give_clear_errors(local_engine: InferenceEngine) -> None:
    with pytest.raises(ModelNotFound) as info:
        await local_engine.generate(greedy("x", model="qwen3-9b"))
    assert "qwen/qwen3-8b:q4_k_m" in info.value.suggestions
    with pytest.raises(ModelUnavailable, match="car models pull"):
        await local_engine.generate(greedy("x", model="qwen3-8b"))
    with pytest.raises(ModelUnavailable, match="ANTHROPIC_API_KEY"):
        await local_engine.generate(greedy("x", model="claude-opus-5-5"))
    with pytest.raises(UnsupportedMode):
        await local_engine.embed(EmbedRequest(texts=["x"], model=SMOL))  # declares no embed capability


async def test_thinking_on_a_model_without_a_thinking_mode_is_refused(local_engine: InferenceEngine) -> None:
    """``thinking=on`` on SmolLM2 (no thinking mode) was ignored: the answer came without the
    thinking asked for, and nothing said so. Named or routed, it is refused; auto and off run."""
    on = GenerateRequest(
        prompt="2+2?", model=SMOL, params=GenerateParams(thinking=ThinkingMode.ON, max_tokens=4)
    )
    with pytest.raises(UnsupportedMode, match="has no thinking mode") as refused:
        await local_engine.generate(on)
    assert refused.value.param == "thinking"
    with pytest.raises(UnsupportedMode, match="has no thinking mode"):
        await local_engine.generate(on.model_copy(update={"model": None}))  # no local model thinks
    for mode in (ThinkingMode.AUTO, ThinkingMode.OFF):
        params = GenerateParams(thinking=mode, max_tokens=4, temperature=0)
        assert (await local_engine.generate(GenerateRequest(prompt="2+2?", model=SMOL, params=params))).text
    # OpenAI's way to ask the same, reasoning_effort, was ignored while thinking=on was refused.
    effort = GenerateRequest(
        prompt="2+2?", model=SMOL, params=GenerateParams(reasoning_effort="high", max_tokens=4)
    )
    with pytest.raises(UnsupportedMode, match="leave thinking and reasoning_effort unset") as refused:
        await local_engine.generate(effort)
    assert refused.value.param == "reasoning_effort"  # the field the client sent (was "thinking")
    none = effort.model_copy(update={"params": GenerateParams(reasoning_effort="none", max_tokens=4)})
    assert (await local_engine.generate(none)).text  # no reasoning asked for


async def test_media_to_a_text_model_names_the_media(local_engine: InferenceEngine) -> None:
    """Audio sent to SmolLM2 was refused as "reads text only (no vision)"."""
    audio = AudioBlock(data="UklGRg==", media_type="audio/wav")
    request = GenerateRequest(
        messages=[Message(role="user", content=[audio, TextBlock(text="?")])], model=SMOL
    )
    with pytest.raises(UnsupportedMode, match="reads text only: no audio input"):
        await local_engine.generate(request)


async def test_a_stopped_stream_is_an_abandoned_trace_and_done_is_not(local_engine: InferenceEngine) -> None:
    stream = local_engine.stream(greedy("Count from one to fifty.", max_tokens=200, model=SMOL))
    route = await anext(stream)
    await anext(stream)  # the first token
    await stream.aclose()  # the consumer walks away
    local_engine.bookkeeper.flush()
    assert isinstance(route, RouteEvent)
    row = local_engine.store.trace(route.trace_id)
    assert row is not None and row["outcome"] == "abandoned" and row["quality"] is None
    # Stopping right after Done is not abandoning: the answer was delivered.
    async for event in local_engine.stream(greedy("Say hi.", max_tokens=4, model=SMOL)):
        if isinstance(event, Done):
            trace = event.trace_id
            break
    local_engine.bookkeeper.flush()
    assert trace is not None
    done_row = local_engine.store.trace(trace)
    assert done_row is not None and done_row["outcome"] == "success"


async def test_a_cut_answer_says_so_and_an_ordinary_one_keeps_its_keys(local_engine: InferenceEngine) -> None:
    """A truncated answer (max_tokens reached) carries finish_reason "length" in its serialized
    form; an answer that stopped by itself keeps exactly the locked keys."""
    cut = await local_engine.generate(
        greedy("Write a long story about a dragon.", max_tokens=4, response_format={"type": "json_object"})
    )
    assert cut.finish_reason == "length" and cut.model_dump(mode="json")["finish_reason"] == "length"
    events = [
        e async for e in local_engine.stream(greedy("Write a long story about a dragon.", max_tokens=4))
    ]
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "length"
    whole = await local_engine.generate(greedy("Say OK.", max_tokens=200))
    assert whole.finish_reason == "stop"
    assert set(whole.model_dump(mode="json")) == {
        "text", "tool_calls", "trace_id", "model_used", "latency_ms", "time_to_first_token_ms", "usage",
    }  # fmt: skip


# --- what a call cut short spends ----------------------------------------------------------------

PRICEY = {"cheap": {"provider": "acme", "price": 20_000.0}}  # $0.02 a thousand tokens, in and out


def _spent(engine: InferenceEngine) -> float:
    engine.flush()
    entry = engine.spend_status().entry("global", "daily")
    return entry.spent_usd if entry is not None else 0.0


async def test_a_stream_its_consumer_leaves_is_spent_for_the_prompt_and_what_was_written(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    """The provider bills a call whose client went away; it was released as if free, so a client
    that disconnected after the first words spent past every limit."""
    engine = remote_engine(PRICEY, config="[spend]\ndaily_usd = 100\n")
    request = GenerateRequest(prompt="Tell me a story.", model="cheap", params=GenerateParams(max_tokens=300))
    fake.queue(Reply(text="once upon a time " * 40, chunk_chars=17, delay_s=0.01))
    written = ""
    events = engine.stream(request)
    async for event in events:
        if isinstance(event, TextDelta):
            written += event.text
            if len(written) > 60:
                break
    await events.aclose()
    prompt = engine.route(request).estimated_input_tokens
    assert _spent(engine) == pytest.approx((prompt + estimate_tokens(written)) * 20_000 / 1e6)


async def test_a_stream_that_breaks_after_text_is_spent_for_it_and_one_that_never_wrote_is_not(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(PRICEY, config="[spend]\ndaily_usd = 100\n")
    request = GenerateRequest(prompt="Say hello.", model="cheap", params=GenerateParams(max_tokens=64))
    fake.queue(Fault.server_error(500))
    with pytest.raises(ProviderError):  # before any output: a named model's own error
        [e async for e in engine.stream(request)]
    assert _spent(engine) == 0.0
    fake.queue(Fault.cut_stream(after_chunks=3, reply=Reply(text="hello there " * 20)))
    events = [e async for e in engine.stream(request)]
    written = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert written and not isinstance(events[-1], Done)
    prompt = engine.route(request).estimated_input_tokens
    assert _spent(engine) == pytest.approx((prompt + estimate_tokens(written)) * 20_000 / 1e6)


async def test_images_to_a_hosted_model_without_vision_are_refused_before_the_call(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    """An endpoint's text-only server (declared without `vision`) was sent the image, dropped it
    and answered as if it had seen it; a model declared with `vision` still gets it."""
    engine = remote_engine(
        {
            "textonly": {"capabilities": ["generate"]},
            "seeing": {"capabilities": ["generate", "vision"]},
        }
    )
    image: list[ContentBlock] = [
        TextBlock(text="What is this?"),
        ImageBlock(data=PNG, media_type="image/png"),
    ]
    with pytest.raises(UnsupportedMode, match="image"):
        await engine.generate(
            GenerateRequest(messages=[Message(role="user", content=image)], model="textonly")
        )
    assert fake.requests == [] and engine.breakers.allow("textonly/textonly")
    seen = await engine.generate(
        GenerateRequest(messages=[Message(role="user", content=image)], model="seeing")
    )
    assert seen.model_used == "seeing/seeing" and len(fake.requests) == 1


async def test_a_named_model_whose_availability_is_stale_runs_once_it_can(
    remote_engine: RemoteEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose models' availability was last computed while the key was refused (reset in
    another replica since) told a request naming the model "not available: not configured"
    until its next refresh. The model is checked again when named, and runs."""
    engine = remote_engine({"alpha": {}})
    monkeypatch.delenv("ALPHA_KEY")
    engine.registry.refresh_availability()
    with pytest.raises(ModelUnavailable, match="set ALPHA_KEY"):
        await engine.generate(GenerateRequest(prompt="hi", model="alpha"))
    monkeypatch.setenv("ALPHA_KEY", "key-alpha")  # no refresh: its flag still says unavailable
    assert not engine.resolve("alpha").available
    result = await engine.generate(GenerateRequest(prompt="hi", model="alpha"))
    assert result.model_used == "alpha/alpha" and engine.resolve("alpha").available
