"""Shared plumbing of the hosted-API backends: scrubbing, Retry-After, error classes, conversions,
and key rotation, driven through the real OpenAI SDK against the loopback fake."""

from __future__ import annotations

import json
import logging
import traceback
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from car_inference.backends import BACKENDS, load_backend_class
from car_inference.backends.anthropic import AnthropicBackend
from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.backends.gemini import GeminiBackend
from car_inference.backends.openai_compat import OpenAICompatBackend
from car_inference.backends.remote import (
    PLACEHOLDER_KEY,
    StreamIncomplete,
    mask_key,
    parse_retry_after,
    scrub,
    status_error,
    transport_error,
)
from car_inference.backends.wire import (
    ThinkingPlan,
    effort_for_budget,
    media_of,
    normalized,
    sampling,
    thinking_plan,
    usage_of,
)
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig, RemoteSettings
from car_inference.errors import (
    InvalidInput,
    ModelUnavailable,
    ProviderError,
    ProviderRejectedInput,
    UnsupportedMode,
)
from car_inference.keys import KeyPool
from car_inference.requests import (
    AudioBlock,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    Message,
    ThinkingMode,
    ToolCall,
    VideoBlock,
)
from car_inference.routing.breaker import failure_weight
from car_inference.schema import GenerateParam, ModelSchema
from fakes import FakeProviderServer, Fault

CATALOG = {m.id: m for m in load_builtin().models}
KEY_A = "sk-rotation-key-aaaa1111"
KEY_B = "sk-rotation-key-bbbb2222"


def openai_model(fake: FakeProviderServer, model_id: str = "openai/gpt-6-luna") -> ModelSchema:
    schema = CATALOG[model_id]
    return schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": fake.openai_base_url})}
    )


def backend(tmp_path: Path, env: dict[str, str]) -> tuple[OpenAICompatBackend, KeyPool]:
    config = CarConfig(home=tmp_path, remote=RemoteSettings(timeout_s=5, rate_limit_cooldown_s=30))
    pool = KeyPool(config, tmp_path / "key_pool_stats.json", env=env, store=None)
    return OpenAICompatBackend(BackendContext(config=config, cache=ModelCache(100), keys=pool)), pool


# --- secrets never leak --------------------------------------------------------------------------


def test_mask_and_scrub() -> None:
    assert mask_key("sk-proj-abcdefgh1a2b") == "sk-…1a2b"
    assert mask_key("short") == "…"
    text = "bad key sk-proj-abcdefgh1a2b; Authorization: Bearer tok_123456 url ?key=AIzaSECRET&x=1"
    cleaned = scrub(text, ["sk-proj-abcdefgh1a2b"])
    assert "abcdefgh" not in cleaned and "tok_123456" not in cleaned and "AIzaSECRET" not in cleaned
    assert "sk-…1a2b" in cleaned and "&x=1" in cleaned
    assert scrub('{"x-goog-api-key": "AIzaXYZ"}') == '{"x-goog-api-key": "***"}'
    assert scrub("nothing secret", [PLACEHOLDER_KEY, None, ""]) == "nothing secret"


def test_a_key_near_the_clip_is_masked_before_the_message_is_cut() -> None:
    key = "proxy-SECRET-key-555666777"  # no pattern knows it: only the exact key masks it
    message = "y" * 570 + f" key {key} is invalid"
    error = status_error(401, message, provider="p", model="m", secrets=[key])
    assert "SECRET" not in str(error) and "5556667" not in str(error)
    timeout = transport_error(ValueError(message), provider="p", model="m", secrets=[key])
    assert timeout is not None and "SECRET" not in str(timeout)


# --- errors --------------------------------------------------------------------------------------


def test_parse_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now=now.timestamp()) == pytest.approx(30)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now.timestamp()) == 0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("99999999") == 3600  # capped: it cools a key


@pytest.mark.parametrize(
    ("status", "retryable", "reported"),
    [
        (429, True, 429),
        (408, True, 408),
        (409, True, 409),
        (500, True, 500),
        (503, True, 503),
        (529, True, 529),
        (400, False, 400),
        (401, False, 401),
        (403, False, 403),
        (404, False, 404),
        (200, True, None),  # an error event inside an accepted stream
    ],
)
def test_status_error_classes(status: int, retryable: bool, reported: int | None) -> None:
    err = status_error(status, "boom", provider="p", model="m", headers={"retry-after": "3"})
    assert (err.status, err.retryable, err.retry_after) == (reported, retryable, 3.0)
    assert err.provider == "p" and err.model == "m"


@pytest.mark.parametrize(
    ("status", "request_caused"),
    [
        (400, True),
        (413, True),
        (422, True),
        (401, False),
        (403, False),
        (404, False),
        (429, False),
        (500, False),
    ],
)
def test_an_input_refusal_is_the_requests_fault(status: int, request_caused: bool) -> None:
    err = status_error(status, "boom", provider="p", model="m")
    assert isinstance(err, ProviderRejectedInput) is request_caused
    assert isinstance(err, InvalidInput) is request_caused, "the caller must change the request"
    assert err.caused_by_request is request_caused
    # Counted toward the breaker unless the request caused it, or a rate limit (the key rests).
    assert (failure_weight(err) == 0) is (request_caused or status == 429)


def test_transport_error_classes() -> None:
    for exc, word in [
        (TimeoutError(), "timed out"),
        (json.JSONDecodeError("x", "doc", 0), "malformed"),
        (ConnectionResetError("reset"), "connection failed"),
        (StreamIncomplete("no finish_reason"), "stream ended early"),
        (ValueError("bad chunk"), "malformed"),
    ]:
        err = transport_error(exc, provider="p", model="m")
        assert err is not None and err.status is None and err.retryable and word in str(err)
    assert transport_error(KeyError("a bug"), provider="p", model="m") is None


# --- conversions ---------------------------------------------------------------------------------


def test_media_of_data_urls_and_http() -> None:
    image = media_of(ImageBlock(url="data:image/png;base64,aGVsbG8="), "t")
    assert (image.kind, image.media_type, image.data, image.url) == ("image", "image/png", "aGVsbG8=", None)
    text = media_of(ImageBlock(url="data:image/svg+xml,%3Csvg%3E"), "t")
    assert text.raw() == b"<svg>" and text.media_type == "image/svg+xml"
    http = media_of(AudioBlock(url="https://example.com/a/clip.mp3?sig=1"), "t")
    assert (http.url, http.media_type, http.data) == (
        "https://example.com/a/clip.mp3?sig=1",
        "audio/mpeg",
        None,
    )
    inline = media_of(VideoBlock(data="AAAA", media_type="video/mp4"), "t")
    assert inline.raw() == b"\x00\x00\x00" and inline.media_type == "video/mp4"
    with pytest.raises(UnsupportedMode):
        media_of(ImageBlock(url="ftp://example.com/x.png"), "t")


def test_normalized_fills_tool_ids_in_order() -> None:
    messages = [
        Message(role="user", content="weather?"),
        Message(
            role="assistant",
            tool_calls=[ToolCall(name="a", arguments={}), ToolCall(id="given", name="b")],
        ),
        Message(role="tool", content="first"),
        Message(role="tool", content="second"),
    ]
    out = normalized(messages)
    assert [c.id for c in out[1].tool_calls] == ["call_0", "given"]
    assert [m.tool_call_id for m in out[2:]] == ["call_0", "given"]
    assert messages[1].tool_calls[0].id is None  # the caller's messages are left alone


def test_thinking_plan_and_effort() -> None:
    luna, llama = CATALOG["openai/gpt-6-luna"], CATALOG["openrouter/llama-3.3-70b-instruct"]
    # llama declares neither
    assert thinking_plan(llama, GenerateParams(thinking=ThinkingMode.ON)).mode == "default"
    assert thinking_plan(luna, GenerateParams()).mode == "default"
    assert thinking_plan(luna, GenerateParams(thinking=ThinkingMode.OFF)).mode == "off"
    on = thinking_plan(luna, GenerateParams(budget_tokens=8000))
    assert (on.mode, on.effort, on.budget) == ("on", "high", 8000)
    assert thinking_plan(luna, GenerateParams(reasoning_effort="low")).effort == "low"
    assert thinking_plan(luna, GenerateParams(thinking=ThinkingMode.ON)) == ThinkingPlan("on", None, 0)
    assert [effort_for_budget(b) for b in (1024, 2048, 7999, 8000)] == ["low", "medium", "medium", "high"]


def test_sampling_sends_only_supported_params() -> None:
    params = GenerateParams(temperature=0.2, top_p=0.9, top_k=5, max_tokens=500_000, stop=["x"], seed=3)
    llama = sampling(CATALOG["openrouter/llama-3.3-70b-instruct"], params)
    assert llama[GenerateParam.MAX_TOKENS] == 16384  # capped by max_output_tokens
    assert set(llama) == {
        GenerateParam.TEMPERATURE,
        GenerateParam.TOP_P,
        GenerateParam.TOP_K,
        GenerateParam.MAX_TOKENS,
        GenerateParam.STOP,
        GenerateParam.SEED,
    }
    assert set(sampling(CATALOG["openai/gpt-6-luna"], params)) == {GenerateParam.MAX_TOKENS}
    thinking = sampling(CATALOG["openrouter/llama-3.3-70b-instruct"], params, thinking=True)
    assert GenerateParam.TEMPERATURE not in thinking and GenerateParam.TOP_K not in thinking
    assert GenerateParam.TOP_P not in sampling(CATALOG["openrouter/llama-3.3-70b-instruct"], GenerateParams())


def test_backend_table_entries() -> None:
    for kind, extra in [
        ("openai", "openai"),
        ("ollama", "openai"),
        ("vllm", "openai"),
        ("anthropic", "anthropic"),
        ("gemini", "gemini"),
    ]:
        assert BACKENDS[kind].extra == extra and BACKENDS[kind].installed()
        assert callable(load_backend_class(kind, "x/y").stream)


# --- key rotation --------------------------------------------------------------------------------


async def test_rotation_on_429_uses_the_next_key(fake: FakeProviderServer, tmp_path: Path) -> None:
    be, pool = backend(tmp_path, {"OPENAI_API_KEYS": f"{KEY_A},{KEY_B}"})
    fake.set_key_behavior(KEY_A, Fault.rate_limit(retry_after=20))
    out = await be.generate(openai_model(fake), GenerateRequest(prompt="hi"))
    assert out.text == "echo: hi"
    assert [r.api_key for r in fake.requests] == [KEY_A, KEY_B]
    rows = {r.masked: r for r in pool.stats()["OPENAI_API_KEY"]}
    assert rows[mask_key(KEY_A)].rate_limits == 1 and rows[mask_key(KEY_A)].state == "cooling"
    assert rows[mask_key(KEY_B)].requests == 1 and rows[mask_key(KEY_B)].last_status == 200
    # while A cools down, requests go straight to B
    await be.generate(openai_model(fake), GenerateRequest(prompt="again"))
    assert fake.requests[-1].api_key == KEY_B and len(fake.requests) == 3


async def test_rotation_is_bounded_by_the_keys(fake: FakeProviderServer, tmp_path: Path) -> None:
    be, pool = backend(tmp_path, {"OPENAI_API_KEYS": f"{KEY_A},{KEY_B}"})
    fake.set_key_behavior(KEY_A, Fault.rate_limit(retry_after=20))
    fake.set_key_behavior(KEY_B, Fault.rate_limit(retry_after=10))
    with pytest.raises(ProviderError) as info:
        await be.generate(openai_model(fake), GenerateRequest(prompt="hi"))
    assert info.value.status == 429 and info.value.retry_after == 10
    assert len(fake.requests) == 2
    # every key cooling: the pool still hands out the one free soonest (B)
    assert pool.acquire("OPENAI_API_KEY") == KEY_B


async def test_every_key_rate_limited_waits_for_the_soonest(fake: FakeProviderServer, tmp_path: Path) -> None:
    """The last key's Retry-After was passed on (12 s) while the first was free after 7."""
    be, _ = backend(tmp_path, {"OPENAI_API_KEYS": f"{KEY_A},{KEY_B}"})
    fake.set_key_behavior(KEY_A, Fault.rate_limit(retry_after=7))
    fake.set_key_behavior(KEY_B, Fault.rate_limit(retry_after=12))
    with pytest.raises(ProviderError) as info:
        await be.generate(openai_model(fake), GenerateRequest(prompt="hi"))
    assert [r.api_key for r in fake.requests] == [KEY_A, KEY_B]
    assert info.value.status == 429 and info.value.retry_after == 7
    with pytest.raises(ProviderError) as info:  # streamed, the same
        [e async for e in be.stream(openai_model(fake), GenerateRequest(prompt="hi"))]
    assert info.value.status == 429 and info.value.retry_after is not None and info.value.retry_after <= 7


async def test_no_rotation_on_server_errors_or_single_key(fake: FakeProviderServer, tmp_path: Path) -> None:
    be, _ = backend(tmp_path, {"OPENAI_API_KEYS": f"{KEY_A},{KEY_B}"})
    fake.queue(Fault.server_error(502))
    with pytest.raises(ProviderError) as info:
        await be.generate(openai_model(fake), GenerateRequest(prompt="hi"))
    assert info.value.status == 502 and len(fake.requests) == 1
    single, _ = backend(tmp_path / "single", {"OPENAI_API_KEY": KEY_A})
    fake.set_key_behavior(KEY_A, Fault.unauthorized())
    with pytest.raises(ProviderError) as info:
        await single.generate(openai_model(fake), GenerateRequest(prompt="hi"))
    assert info.value.status == 401 and not info.value.retryable and len(fake.requests) == 2
    # the refused key is now disabled: the model has no usable key and says so without a request
    with pytest.raises(ModelUnavailable, match="OPENAI_API_KEY"):
        await single.generate(openai_model(fake), GenerateRequest(prompt="hi"))
    assert len(fake.requests) == 2


async def test_without_a_key_pool_keys_come_from_the_environment(
    fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY_A)
    be = OpenAICompatBackend(BackendContext(config=CarConfig(home=tmp_path), cache=ModelCache(100)))
    assert (await be.generate(openai_model(fake), GenerateRequest(prompt="x"))).text == "echo: x"
    assert fake.requests[-1].api_key == KEY_A
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ModelUnavailable):
        await be.generate(openai_model(fake), GenerateRequest(prompt="x"))


async def test_a_key_never_leaks(
    fake: FakeProviderServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider echoes the Authorization header in its error: our error, its repr, its
    traceback, every log record (SDKs included, at DEBUG) and the stats file stay clean."""
    caplog.set_level(logging.DEBUG)
    be, pool = backend(tmp_path, {"OPENAI_API_KEYS": f"{KEY_A},{KEY_B}"})
    fake.set_key_behavior(KEY_A, Fault("status", status=401, message=f"Incorrect API key: Bearer {KEY_A}"))
    fake.set_key_behavior(KEY_B, Fault("status", status=403, message=f"key {KEY_B} may not use this"))
    with pytest.raises(ProviderError) as info:
        await be.generate(openai_model(fake), GenerateRequest(prompt="hi"))
    err = info.value
    assert err.status == 403
    rendered = [str(err), repr(err), "".join(traceback.format_exception(err))]
    rendered += [r.getMessage() for r in caplog.records]
    pool.flush()
    rendered += [p.read_bytes().decode("latin-1") for p in tmp_path.glob("state.db*")]
    for text in rendered:
        assert KEY_A not in text and KEY_B not in text
    assert err.__cause__ is None and err.__context__ is None
    assert "sk-…2222" in str(err)


@pytest.mark.parametrize(
    ("backend_cls", "model_id", "var", "base"),
    [
        (OpenAICompatBackend, "openai/gpt-6-luna", "OPENAI_API_KEY", "openai_base_url"),
        (AnthropicBackend, "anthropic/claude-haiku-5-5", "ANTHROPIC_API_KEY", "anthropic_base_url"),
        (GeminiBackend, "google/gemini-3.5-flash-lite", "GEMINI_API_KEY", "gemini_base_url"),
    ],
)
@pytest.mark.parametrize("fault", [401, 429, 500])
async def test_no_protocol_leaks_a_key(
    fake: FakeProviderServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    backend_cls: type,
    model_id: str,
    var: str,
    base: str,
    fault: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = "AIza-secret-test-key-0042"
    config = CarConfig(home=tmp_path)
    pool = KeyPool(config, tmp_path / "key_pool_stats.json", env={var: key}, store=None)
    be = backend_cls(BackendContext(config=config, cache=ModelCache(100), keys=pool))
    schema = CATALOG[model_id]
    schema = schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": getattr(fake, base)})}
    )
    fake.set_key_behavior(
        key, Fault("status", status=fault, message=f"key={key} Authorization: Bearer {key}")
    )
    with pytest.raises(ProviderError) as info:
        async for _ in be.stream(schema, GenerateRequest(prompt="hi")):
            pass
    assert info.value.status == fault
    pool.flush()
    texts = [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    texts += [r.getMessage() for r in caplog.records]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.glob("state.db*")]
    assert all(key not in text for text in texts)


async def test_paced_bounds_only_the_wait_for_each_event() -> None:
    """``remote._paced``: the consumer's own time between events is not counted, a wait past the
    gap ends in TimeoutError, and a cancellation from outside stays a cancellation."""
    import asyncio
    from collections.abc import AsyncIterator

    from car_inference.backends.remote import _paced

    async def upstream(pauses: list[float]) -> AsyncIterator[int]:
        for i, pause in enumerate(pauses):
            await asyncio.sleep(pause)
            yield i

    got = []
    async for event in _paced(upstream([0.0, 0.2, 0.2]), 0.5):
        got.append(event)
        await asyncio.sleep(0.7)  # longer than the gap, on the consumer's side
    assert got == [0, 1, 2]
    got.clear()
    with pytest.raises(TimeoutError, match=r"no stream event within 0\.3 s"):
        async for event in _paced(upstream([0.0, 1.0]), 0.3):
            got.append(event)
    assert got == [0]

    async def consume() -> None:
        async for _ in _paced(upstream([0.0, 5.0]), 10):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_providers_negative_counts_are_zero_not_an_error() -> None:
    """Usage is never negative (a runner's -5 reached the metrics and was a 500); what a broken
    OpenAI-compatible server, Anthropic or Gemini reports that way counts as 0, the answer kept."""
    usage = usage_of(-3, 2, -1, -4)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (0, 2, 2)
    assert usage.cached_prompt_tokens == 0
    assert usage_of(None, None, None, None).total_tokens == 0
