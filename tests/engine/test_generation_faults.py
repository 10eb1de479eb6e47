"""Routing, fallbacks, circuit breakers, spend limits and learning, against the fake provider server.

Every hosted model here is the fake server on loopback speaking the OpenAI or Anthropic wire format
through the official SDK; faults are injected per model by targeting its API key.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from car_inference.engine.bookkeeping import Bookkeeper
from car_inference.errors import (
    AllModelsFailed,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    ProviderError,
    ProviderRejectedInput,
    SpendLimitExceeded,
    TraceNotFound,
    UnsupportedMode,
)
from car_inference.requests import (
    AudioBlock,
    ContentBlock,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    Message,
    TextBlock,
    VideoBlock,
)
from car_inference.routing import CircuitState, RoutingStrategy
from car_inference.routing.complexity import estimate_tokens
from car_inference.stream import Done, RouteEvent, TextDelta
from fakes import FakeProviderServer, Fault, Reply
from fakes.remote_kit import PNG

from .conftest import RemoteEngine

TWO = {
    "alpha": {"provider": "acme", "quality": 0.95},
    "beta": {"provider": "bolt", "quality": 0.9},
}


def req(prompt: str = "Say hello.", **kw: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=GenerateParams(max_tokens=32), **kw)  # type: ignore[arg-type]


async def test_adaptive_routing_picks_the_best_available_model(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    result = await engine.generate(req())
    assert result.model_used == "acme/alpha"
    assert result.text == "echo: Say hello."
    routing = result.routing
    assert routing.decision.strategy is RoutingStrategy.ADAPTIVE
    assert routing.decision.fallbacks[0] == "bolt/beta", "a different provider first"
    assert "huggingface/smollm2-135m-instruct:q4_1" in routing.decision.fallbacks
    assert result.usage is not None and result.usage.cost_usd is not None


async def test_a_failing_model_falls_back_and_is_recorded(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO)
    fake.set_key_behavior("key-alpha", Fault.server_error(503))
    result = await engine.generate(req())
    assert result.model_used == "bolt/beta" and result.text == "echo: Say hello."
    assert result.routing.strategy == "fallback"
    assert result.routing.attempts[0][0] == "acme/alpha" and "503" in result.routing.attempts[0][1]
    assert [r.api_key for r in fake.requests] == ["key-alpha", "key-beta"], "the fallback ran at once"
    engine.flush()  # outcomes are written off the request path
    profile = engine.tracker.profile("acme/alpha")
    assert profile is not None and profile.fail_count == 1
    assert engine.tracker.profile("bolt/beta").success_count == 1  # type: ignore[union-attr]


async def test_a_refused_key_says_so_and_a_reset_elsewhere_brings_the_model_back(
    remote_engine: RemoteEngine, fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After one 401 a server answered "no usable key in BETA_KEY: set it" (it was set) and, after
    `car keys reset` in another process, kept answering so until restarted; the failed attempts
    also opened the model's circuit."""
    from car_inference import keys as keys_module
    from car_inference.keys import KeyPool

    monkeypatch.setattr(keys_module, "_RECHECK_S", 0.0)
    engine = remote_engine(TWO)
    fake.set_key_behavior("key-beta", Fault.unauthorized())
    with pytest.raises(ProviderError, match="401"):
        await engine.generate(req(model="beta"))
    for _ in range(3):
        with pytest.raises(
            ModelUnavailable,
            match=r"not available: every key in BETA_KEY was refused .* `car keys reset BETA_KEY`",
        ):
            await engine.generate(req(model="beta"))
    assert "every key in BETA_KEY was refused" in engine.registry.unavailable_reason(engine.resolve("beta"))
    fake.set_key_behavior("key-beta", None)  # the provider takes the key again
    elsewhere = KeyPool(engine.config, store=None)  # `car keys reset` in another process
    assert elsewhere.reset("BETA_KEY") == 1
    elsewhere.close()
    result = await engine.generate(req(model="beta"))
    assert result.model_used == "bolt/beta" and engine.breakers.allow("bolt/beta")


async def test_a_named_model_is_never_replaced(remote_engine: RemoteEngine, fake: FakeProviderServer) -> None:
    engine = remote_engine(TWO)
    fake.set_key_behavior("key-beta", Fault.rate_limit(retry_after=5))
    with pytest.raises(ProviderError) as info:
        await engine.generate(req(model="beta"))
    assert info.value.status == 429 and info.value.model == "bolt/beta"
    with pytest.raises(ProviderError) as info:  # its key rests: the same 429, no call, no other model
        await engine.generate(req(model="beta"))
    assert info.value.status == 429 and info.value.model == "bolt/beta" and len(fake.requests) == 1
    engine.keys.reset("BETA_KEY")
    fake.set_key_behavior("key-beta", Fault.unauthorized())
    with pytest.raises(ProviderError, match="401"):
        await engine.generate(req(model="beta"))
    assert {r.api_key for r in fake.requests} == {"key-beta"}, "no other model was asked"
    assert engine.route(req(model="beta")).fallbacks == []
    with pytest.raises(ModelNotFound):
        await engine.generate(req(model="gamma-9"))


async def test_a_named_model_gets_the_fallbacks_configured_for_it(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    models = {
        "alpha": {"provider": "acme", "quality": 0.95},
        "beta": {"provider": "bolt", "quality": 0.9, "fallbacks": ["no-such-model", "alpha"]},
        "gamma": {"provider": "crux", "quality": 0.99},
    }
    # An adaptive choice of beta tries its configured fallbacks before the router's.
    adaptive = remote_engine({**models, "beta": {**models["beta"], "quality": 0.995}})
    routed = adaptive.route(req())
    assert routed.model_id == "bolt/beta" and routed.strategy != RoutingStrategy.EXPLICIT
    assert routed.fallbacks[:2] == ["no-such-model", "acme/alpha"] and "crux/gamma" in routed.fallbacks

    engine = remote_engine(models)
    decision = engine.route(req(model="beta"))
    assert decision.strategy == RoutingStrategy.EXPLICIT
    assert decision.fallbacks == ["no-such-model", "acme/alpha"], "only its own, never the router's"
    fake.set_key_behavior("key-beta", Fault.server_error(503))
    result = await engine.generate(req(model="beta"))
    assert result.model_used == "acme/alpha" and result.routing.strategy == "fallback"
    assert [m for m, _ in result.routing.attempts] == ["bolt/beta", "no-such-model"]
    assert "model not found: no-such-model" in result.routing.attempts[1][1]
    assert "key-crux" not in {r.api_key for r in fake.requests}


async def test_when_every_model_fails_the_error_lists_each_attempt(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO, routing="max_fallbacks = 1")
    fake.set_key_behavior("key-alpha", Fault.server_error())
    fake.set_key_behavior("key-beta", Fault.unauthorized())
    with pytest.raises(AllModelsFailed) as info:
        await engine.generate(req())
    assert [m for m, _ in info.value.attempts] == ["acme/alpha", "bolt/beta"]
    assert "acme/alpha" in str(info.value) and "bolt/beta" in str(info.value)


async def test_breaker_opens_skips_then_recovers_after_a_probe(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    models = {
        "alpha": {"provider": "acme", "quality": 0.95, "fallbacks": ["beta"]},
        "beta": {"provider": "bolt", "quality": 0.9},
    }
    engine = remote_engine(models, config="[breaker]\nfailure_threshold = 2\ncooldown_s = 0.3\n")
    fake.set_key_behavior("key-alpha", Fault.server_error())
    for _ in range(2):
        assert (await engine.generate(req(model="alpha"))).model_used == "bolt/beta"
    assert engine.breakers.state("acme/alpha") == CircuitState.OPEN
    fake.requests.clear()
    result = await engine.generate(req(model="alpha"))
    assert result.model_used == "bolt/beta"
    assert [r.api_key for r in fake.requests] == ["key-beta"], "an open circuit is not called"
    assert "CircuitOpen" in result.routing.reason
    health = engine.model_health()
    assert health.circuit_breakers["acme/alpha"]["state"] == "open"

    fake.set_key_behavior("key-alpha", None)  # the provider recovers
    await asyncio.sleep(0.35)
    assert engine.breakers.state("acme/alpha") == CircuitState.HALF_OPEN
    result = await engine.generate(req(model="alpha"))
    assert result.model_used == "acme/alpha", "the half-open probe goes through"
    assert engine.breakers.state("acme/alpha") == CircuitState.CLOSED


async def test_a_broken_model_counts_double_toward_the_breaker(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO, config="[breaker]\nfailure_threshold = 4\ncooldown_s = 60\n")
    fake.set_key_behavior("key-alpha", Fault("status", status=404, message="The model does not exist"))
    with pytest.raises(ProviderError, match="404"):
        await engine.generate(req(model="alpha"))
    assert engine.breakers.state("acme/alpha") == CircuitState.CLOSED
    with pytest.raises(ProviderError, match="404"):
        await engine.generate(req(model="alpha"))
    assert engine.breakers.state("acme/alpha") == CircuitState.OPEN, "two 404s weigh as four failures"


async def test_errors_the_request_caused_never_open_a_breaker(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO, config="[breaker]\nfailure_threshold = 2\ncooldown_s = 60\n")
    fake.set_key_behavior("key-alpha", Fault.bad_request("Invalid schema for function 'f'"))
    for _ in range(3):
        with pytest.raises(ProviderRejectedInput) as info:
            await engine.generate(req(model="alpha"))
        assert isinstance(info.value, InvalidInput) and info.value.status == 400
    fake.set_key_behavior("key-alpha", Fault("status", status=422, message="unprocessable input"))
    with pytest.raises(ProviderRejectedInput):
        await engine.generate(req(model="alpha"))
    assert engine.breakers.state("acme/alpha") == CircuitState.CLOSED
    fake.set_key_behavior("key-alpha", None)
    assert (await engine.generate(req())).model_used == "acme/alpha", "other clients still get alpha"
    engine.flush()
    with sqlite3.connect(engine.config.paths.state_db) as db:
        rows = db.execute(
            "SELECT outcome, error_class FROM traces WHERE model_id = 'acme/alpha' ORDER BY started_at"
        ).fetchall()
    assert rows[:4] == [("abandoned", "ProviderRejectedInput")] * 4, "kept, counted nowhere"
    assert engine.tracker.profile("acme/alpha").fail_count == 0  # type: ignore[union-attr]


async def test_input_a_named_model_cannot_take_is_unsupported(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(
        {
            "alpha": {"provider": "acme", "capabilities": ["generate", "vision"]},
            "claude": {"provider": "anthro", "kind": "anthropic", "capabilities": ["generate", "vision"]},
            "gemma": {"provider": "gem", "capabilities": ["generate", "vision"], "quality": 0.99},
        },
        config="[breaker]\nfailure_threshold = 1\n",
    )
    video: list[ContentBlock] = [TextBlock(text="What happens?"), VideoBlock(url="https://example.com/v.mp4")]
    audio: list[ContentBlock] = [
        TextBlock(text="Transcribe."),
        AudioBlock(data="UklGRg==", media_type="audio/wav"),
    ]
    for name, blocks in (("alpha", video), ("claude", audio), ("claude", video)):
        request = GenerateRequest(messages=[Message(role="user", content=blocks)], model=name)
        with pytest.raises(UnsupportedMode):
            await engine.generate(request)
        with pytest.raises(UnsupportedMode):
            [e async for e in engine.stream(request)]
    assert fake.requests == [], "refused before any call, never answered by another model"
    assert all(engine.breakers.state(m) == CircuitState.CLOSED for m in ("acme/alpha", "anthro/claude"))


async def test_input_no_candidate_can_take_is_the_callers_error_not_an_outage(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    """Schemathesis found it: an audio block of a type no routed candidate takes failed on every
    candidate and came back as AllModelsFailed (a 502). Every attempt refused the input, so the
    answer is that refusal (a 400 from the server), and no breaker counts it."""
    engine = remote_engine(TWO, config="[breaker]\nfailure_threshold = 1\n")
    audio: list[ContentBlock] = [
        TextBlock(text="Hear this."),
        AudioBlock(data="UklGRg==", media_type="audio/ogg"),
    ]
    request = GenerateRequest(messages=[Message(role="user", content=audio)])
    with pytest.raises(UnsupportedMode):
        await engine.generate(request)
    assert fake.requests == []
    assert all(engine.breakers.state(m) == CircuitState.CLOSED for m in ("acme/alpha", "bolt/beta"))


async def test_images_to_the_local_text_model_are_unsupported_and_trip_nothing(
    remote_engine: RemoteEngine,
) -> None:
    engine = remote_engine(TWO, config="[breaker]\nfailure_threshold = 1\n")
    local = "huggingface/smollm2-135m-instruct:q4_1"
    image: list[ContentBlock] = [
        TextBlock(text="What is this?"),
        ImageBlock(data=PNG, media_type="image/png"),
    ]
    for _ in range(3):
        request = GenerateRequest(messages=[Message(role="user", content=image)], model=local)
        with pytest.raises(UnsupportedMode, match="image"):
            await engine.generate(request)
    assert engine.breakers.state(local) == CircuitState.CLOSED
    assert engine.cache.get(f"gguf:{local}") is None, "refused before the model was loaded"


def test_car_generate_with_a_named_model_and_a_bad_key_fails(
    fake: FakeProviderServer, isolated_home: Path
) -> None:
    """The issue's case: `car generate --model openai/gpt-6-luna` with a bad key answered 0 with
    SmolLM2's text; it must fail, on stderr, naming the model."""
    (isolated_home / "models.toml").write_text(f'[hosts.openai]\nbase_url = "{fake.openai_base_url}"\n')
    fake.set_key_behavior("sk-bad-key-123456", Fault.unauthorized())
    env = {**os.environ, "OPENAI_API_KEY": "sk-bad-key-123456", "CAR_HOME": str(isolated_home)}
    car = Path(sys.executable).with_name("car")
    out = subprocess.run(
        [str(car), "generate", "--model", "openai/gpt-6-luna", "Say hi.", "--max-tokens", "8"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode != 0, out.stdout
    assert "401" in out.stderr and "gpt-6-luna" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout.strip() == ""
    assert [r.api_key for r in fake.requests] == ["sk-bad-key-123456"]


async def test_no_request_is_lost_under_intermittent_faults(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    # Quality alone decides (the free local model would win on cost once alpha's failures lower
    # its belief): every answer must come from the fake provider's two models.
    engine = remote_engine(
        TWO,
        routing="quality_weight = 1.0\nlatency_weight = 0\ncost_weight = 0",
        config="[breaker]\nfailure_threshold = 100\n",
    )
    # A rate limit of a millisecond: its key rests that long (answered here meanwhile, no call).
    faults = [Fault.server_error(), Fault.rate_limit(0.001), Fault.malformed_json(), Fault.cut_stream(0)]
    outcomes = []
    for i in range(12):
        fake.queue(faults[i // 2 % 4], Reply()) if i % 2 == 0 else fake.queue(Reply())
        outcomes.append(await engine.generate(req(f"request {i}")))
    answered = [(r.model_used, r.text[:30]) for r in outcomes]
    assert all(r.text.startswith("echo: request") for r in outcomes), answered
    assert sum(r.routing.strategy == "fallback" for r in outcomes) == 6


async def test_stream_falls_back_before_the_first_token(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO)
    fake.queue(Fault.cut_stream(after_chunks=0), Reply(text="from the fallback"))
    events = [e async for e in engine.stream(req())]
    routes = [e for e in events if isinstance(e, RouteEvent)]
    assert [(r.model_id, r.strategy) for r in routes][1] == ("bolt/beta", "fallback")
    done = events[-1]
    assert isinstance(done, Done) and done.text == "from the fallback" and done.model_used == "bolt/beta"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "from the fallback"


async def test_a_named_model_whose_stream_breaks_ends_with_an_error_event(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO)
    fake.queue(
        Fault.cut_stream(after_chunks=2, reply=Reply(text="a long answer that gets cut", chunk_chars=3))
    )
    events = [e async for e in engine.stream(req(model="alpha"))]
    assert any(isinstance(e, TextDelta) for e in events)
    assert events[-1].type == "error" and events[-1].retryable
    assert len([e for e in events if isinstance(e, RouteEvent)]) == 1, "no fallback configured"
    engine.flush()
    assert engine.tracker.profile("acme/alpha").fail_count == 1  # type: ignore[union-attr]


async def test_the_providers_finish_reason_reaches_the_result(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO)
    fake.queue(Reply(text='{"answer": "a very lo', finish_reason="length"), Reply(text="ok"))
    cut = await engine.generate(req(response_format={"type": "json_object"}))
    assert cut.finish_reason == "length" and cut.model_dump(mode="json")["finish_reason"] == "length"
    assert "finish_reason" not in (await engine.generate(req())).model_dump(mode="json"), "stop is usual"
    fake.queue(Reply(text="cut sho", finish_reason="length"))
    done = [e async for e in engine.stream(req())][-1]
    assert isinstance(done, Done) and done.finish_reason == "length"


async def test_spend_limit_refuses_before_the_call(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(
        {"pricey": {"provider": "acme", "price": 1000.0}},
        config="[spend.providers.acme]\ndaily_usd = 0.01\n",
    )
    with pytest.raises(SpendLimitExceeded) as info:
        await engine.generate(req(model="pricey"))
    assert info.value.scope == "acme" and info.value.period == "daily"
    assert fake.requests == [], "refused before any call"
    routed = await engine.generate(req())
    assert routed.model_used != "acme/pricey", "adaptive routing leaves the over-limit model out"


async def test_actual_spend_is_recorded_from_usage(remote_engine: RemoteEngine) -> None:
    engine = remote_engine({"cheap": {"provider": "acme", "price": 2.0}}, config="[spend]\ndaily_usd = 100\n")
    result = await engine.generate(req(model="cheap"))
    assert result.usage is not None and result.usage.cost_usd
    status = engine.spend_status()
    daily = status.entry("global", "daily")
    assert daily is not None and daily.spent_usd == pytest.approx(result.usage.cost_usd)


async def test_an_answer_without_usage_is_spent_at_an_estimate_not_free(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    """Many OpenAI-compatible proxies drop the stream's usage: such answers were recorded as
    costing $0, so a spend limit never stopped them (8 calls through a limit of 1.6)."""
    engine = remote_engine(
        {"cheap": {"provider": "acme", "price": 20_000.0}}, config="[spend]\ndaily_usd = 3\n"
    )
    answer = b'{"choices": [{"index": 0, "delta": {"content": "' + b"word " * 20 + b'"}}]}'
    finish = b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'
    fake.queue(Fault.raw_stream(answer, finish, b"[DONE]"))
    result = await engine.generate(req(model="cheap"))
    assert result.usage is None, "no usage is made up for the answer"
    engine.flush()
    spent = engine.spend_status().entry("global", "daily").spent_usd  # type: ignore[union-attr]
    decision = result.routing.decision
    written = estimate_tokens("word " * 20)
    assert spent == pytest.approx((decision.estimated_input_tokens + written) * 20_000 / 1e6)
    assert spent > 0.5
    refused = 0
    for _ in range(8):
        fake.queue(Fault.raw_stream(answer, finish, b"[DONE]"))
        try:
            await engine.generate(req(model="cheap"))
        except SpendLimitExceeded:
            refused += 1
        engine.flush()
    assert refused >= 2, "the limit stops them once the estimates add up"


async def test_feedback_moves_the_learned_quality(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    result = await engine.generate(req())
    engine.flush()
    before = engine.tracker.task_stats(result.model_used, result.routing.decision.task_family)
    engine.feedback(result.trace_id, 0.0)
    after = engine.tracker.task_stats(result.model_used, result.routing.decision.task_family)
    assert before is not None and after is not None and after.ema_quality < before.ema_quality
    with pytest.raises(TraceNotFound):
        engine.feedback("no-such-trace", 1.0)
    with pytest.raises(InvalidInput, match=r"0\.\.1"):
        engine.feedback(result.trace_id, 3.0)


async def test_learning_switches_to_the_model_that_succeeds(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO, config="[breaker]\nfailure_threshold = 1000\n")
    assert (await engine.generate(req())).model_used == "acme/alpha"
    for i in range(15):  # alpha keeps answering badly; users rate it down and beta up
        result = await engine.generate(req(f"Tell me a joke number {i}.", model="alpha"))
        engine.feedback(result.trace_id, 0.0)
        result = await engine.generate(req(f"Tell me a joke number {i}.", model="beta"))
        engine.feedback(result.trace_id, 1.0)
    decision = engine.route(req("Tell me a joke number 99."))
    assert decision.model_id == "bolt/beta" and decision.strategy == RoutingStrategy.ADAPTIVE


async def test_complex_tasks_get_a_thinking_budget_on_thinking_models(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(
        {
            "claude": {
                "provider": "anthropic-fake",
                "kind": "anthropic",
                "params": ["max_tokens", "extended_thinking", "tools", "tool_choice"],
            }
        }
    )
    prompt = (
        "Prove step by step that there are infinitely many primes, then derive the prime number theorem's "
        "asymptotic density, analyze the error term, compare three different proofs and their trade-offs, "
        "and ensure every step is justified; you must not skip any lemma and should explain at least two "
        "historical approaches. " * 3
    )
    decision = engine.route(req(prompt, model="claude"))
    assert decision.complexity == "complex" and decision.thinking_budget == 8000
    fake.queue(Reply(text="ok", thinking="let me think"))
    result = await engine.generate(
        GenerateRequest(prompt=prompt, model="claude", params=GenerateParams(max_tokens=64))
    )
    sent = fake.requests[-1].json
    assert sent["thinking"]["budget_tokens"] == 8000
    assert result.thinking == "let me think" and result.text == "ok"


async def test_quick_retry_of_the_same_prompt_marks_the_first_answer(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    first = await engine.generate(req("What is 2+2?"))
    await engine.generate(req("What is 2+2?"))
    engine.bookkeeper.flush()  # records are written after the answer
    signals = [f["kind"] for f in engine.store.feedback_for(first.trace_id)]
    assert "quick_retry" in signals


async def test_state_survives_a_restart(remote_engine: RemoteEngine) -> None:
    engine = remote_engine(TWO)
    for i in range(3):
        await engine.generate(req(f"Say hello {i} times.", model="alpha"))
    engine.close()
    again = remote_engine(TWO)
    profile = again.tracker.profile("acme/alpha")
    assert profile is not None and profile.success_count == 3


def test_decision_latency_is_not_a_network_call(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO)
    start = time.perf_counter()
    for _ in range(50):
        engine.route(req("route me"))
    assert fake.requests == [], "routing never calls a provider"
    assert time.perf_counter() - start < 5  # generous: the speed target lives in benchmarks/routing.py


async def test_a_cancelled_request_is_an_abandoned_trace_not_a_failure(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    engine = remote_engine(TWO)
    fake.queue(Reply(text="slow", delay_s=5))
    task = asyncio.create_task(engine.generate(req(model="acme/alpha")))
    await asyncio.sleep(0.3)  # the request is out, waiting on the provider
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    engine.flush()
    with sqlite3.connect(engine.config.paths.state_db) as db:
        rows = db.execute("SELECT outcome, quality FROM traces WHERE model_id = 'acme/alpha'").fetchall()
    assert rows == [("abandoned", None)]
    profile = engine.tracker.profile("acme/alpha")
    assert profile is None or profile.total_calls == 0, "a cancel is no verdict on the model"
    assert engine.breakers.allow("acme/alpha")


async def test_records_waiting_for_a_slow_store_hold_the_answer_not_the_conversation(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    """While the store is behind, each waiting record holds what it will write (counts, the
    answer's text for its signals), not the request: six answers to a 2 MB conversation each
    leave well under one conversation's worth of memory behind them."""
    engine = remote_engine(TWO)
    warm = req(model="acme/alpha")  # imports and connections first, then memory is measured
    assert (await engine.generate(warm)).text and [e async for e in engine.stream(warm)]
    keeper = engine.bookkeeper = Bookkeeper()
    stuck = threading.Event()
    keeper.start_writer()
    keeper.submit(stuck.wait, 30)  # the store stalls: every record from here on waits
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(6):
            history = [
                Message(role="user", content=f"{i}" + "x" * 2_000_000),
                Message(role="assistant", content="Noted."),
                Message(role="user", content="Say hello."),
            ]
            params = GenerateParams(max_tokens=8)
            request = GenerateRequest(model="acme/alpha", messages=history, params=params)
            if i % 2:
                assert [e async for e in engine.stream(request) if isinstance(e, Done)]
            else:
                assert (await engine.generate(request)).text
            del history, request
        fake.reset()  # the fake server keeps what it received; the engine must not
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        stuck.set()
    assert keeper.pending >= 6, "the records were still waiting while memory was measured"
    assert held < 1_000_000, f"{held:,} bytes held by 6 waiting records"
    keeper.close()
    assert keeper.pending == 0
