"""The engine and managed runtimes: a model marked ``managed`` starts its llama.cpp server on first
use and the engine's requests go to it; other models are untouched."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.engine import InferenceEngine
from car_inference.errors import (
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    ProviderError,
    ProviderRejectedInput,
    UnsupportedMode,
)
from car_inference.requests import GenerateParams, GenerateRequest
from car_inference.runtimes.llamacpp_wire import upstream_error
from car_inference.runtimes.managed import ManagedBackend, RuntimeSupervisor
from car_inference.runtimes.specs import VllmSpec
from car_inference.runtimes.supervisor import RuntimeState
from car_inference.schema import ModelSchema
from car_inference.stream import Done, TextDelta, UsageEvent

from .helpers import FAST, MANAGED_ID, SMOLLM2, managed_smollm2, small_config, wait_for


@pytest.fixture
def engine(isolated_home: Path) -> Iterator[InferenceEngine]:
    eng = InferenceEngine(config=small_config(isolated_home))
    eng.runtimes.settings = FAST.model_copy()
    eng.register_model(managed_smollm2())
    yield eng
    eng.close()


def _request(**params: object) -> GenerateRequest:
    # The system prompt and sampling are the request's, so the in-process backend (which would add
    # the catalog's default system prompt and repeat penalty) and the server see the same input.
    return GenerateRequest(
        model=MANAGED_ID,
        prompt="What is the capital of France?",
        context="Answer briefly.",
        params=GenerateParams.model_validate(
            {"max_tokens": 4, "temperature": 0, "repeat_penalty": 1.0, **params}
        ),
    )


async def test_generate_starts_the_server_and_goes_through_it(engine: InferenceEngine) -> None:
    runtime = engine.runtimes.runtime_for(engine.resolve(MANAGED_ID))
    assert runtime.state is RuntimeState.STOPPED
    result = await engine.generate(_request())
    assert result.model_used == MANAGED_ID and result.text.strip()
    assert result.finish_reason == "length", "the server stopped at max_tokens"
    assert runtime.state is RuntimeState.RUNNING and runtime.served == [MANAGED_ID]
    # Same greedy answer as the in-process backend gives the same GGUF: the server really ran it.
    local = await engine.generate(_request().model_copy(update={"model": SMOLLM2}))
    assert local.text == result.text

    events = [e async for e in engine.stream(_request())]
    assert isinstance(events[-1], Done) and events[-1].text == result.text
    assert any(isinstance(e, TextDelta) for e in events)

    health = engine.model_health()
    [status] = [s for s in health.runtimes if s.model_id == MANAGED_ID]
    assert status.state is RuntimeState.RUNNING and status.base_url and status.pid == runtime.pid


async def test_answers_carry_usage_counted_on_the_models_vocabulary(engine: InferenceEngine) -> None:
    """llama-cpp-python's server sends no usage in a stream (and our backend always streams), so
    served answers had ``usage: null``: the counts come from the GGUF's own vocabulary and agree
    with what the same request costs in-process."""
    request = _request(max_tokens=12)
    served = await engine.generate(request)
    local = await engine.generate(request.model_copy(update={"model": SMOLLM2}))
    assert served.finish_reason == local.finish_reason == "length"
    assert served.usage is not None and local.usage is not None
    assert served.usage.prompt_tokens == local.usage.prompt_tokens > 10
    assert served.usage.completion_tokens == local.usage.completion_tokens == 12
    assert served.usage.total_tokens == served.usage.prompt_tokens + 12
    assert served.usage.context_window == local.usage.context_window > 0
    events = [e async for e in engine.stream(request)]
    [usage] = [e.usage for e in events if isinstance(e, UsageEvent)]
    assert isinstance(events[-1], Done) and events[-1].usage is not None
    assert events[-1].usage.total_tokens == usage.total_tokens
    assert usage.completion_tokens == 12 and usage.prompt_tokens == local.usage.prompt_tokens


async def test_the_server_gets_the_models_system_prompt_and_repeat_penalty(engine: InferenceEngine) -> None:
    """A request that brings neither: the catalog's system prompt and repeat penalty (SmolLM2's
    defaults) reach the server as they reach llama.cpp in-process, so the answers agree (without
    them the server's SmolLM2 answered "L'Étoile, la Cité, ...")."""
    request = GenerateRequest(
        model=MANAGED_ID, prompt="What is the capital of France?", params=GenerateParams(max_tokens=16)
    )
    served = await engine.generate(request)
    local = await engine.generate(request.model_copy(update={"model": SMOLLM2}))
    assert "Paris" in local.text and served.text == local.text


async def test_requests_at_once_take_turns_instead_of_cutting_each_other(engine: InferenceEngine) -> None:
    """llama-cpp-python's server cuts the answer in progress (a bare [DONE]) when another request
    arrives unless told not to: the first answer failed "stream ended early"."""
    await engine.generate(_request())  # started
    longer = asyncio.create_task(engine.generate(_request(max_tokens=24)))
    await asyncio.sleep(0.3)  # the longer one is streaming
    shorter = await engine.generate(_request())
    result = await longer
    assert result.finish_reason == "length" and shorter.finish_reason == "length"
    assert len(result.text) > len(shorter.text)  # 24 tokens, not cut short


async def test_a_crash_between_requests_is_survived(engine: InferenceEngine) -> None:
    first = await engine.generate(_request())
    runtime = engine.runtimes.runtime_for(engine.resolve(MANAGED_ID))
    assert runtime.pid is not None
    os.kill(runtime.pid, signal.SIGKILL)
    wait_for(lambda: runtime.restarts == 1 and runtime.state is RuntimeState.RUNNING, what="the restart")
    again = await engine.generate(_request())
    assert again.text == first.text


async def test_a_crash_under_a_request_waits_for_the_restart(engine: InferenceEngine) -> None:
    """The first request after a crash went to the dead port at once ("connection failed"), and
    the failures it counted kept the model's circuit open long after the restart."""
    first = await engine.generate(_request())
    runtime = engine.runtimes.runtime_for(engine.resolve(MANAGED_ID))
    assert runtime.pid is not None
    os.kill(runtime.pid, signal.SIGKILL)
    again = await engine.generate(_request())  # no wait here: it meets the crash itself
    assert again.text == first.text and runtime.restarts == 1
    assert engine.breakers.allow(MANAGED_ID)


async def test_a_crash_under_an_attached_process_request_waits_for_the_owners_restart(
    engine: InferenceEngine, isolated_home: Path
) -> None:
    """Only the owner's requests waited: one from a process attached to the server failed at once
    ("connection failed") while the owner restarted it. Two engines on one home stand for two
    processes (each takes the owner's lock through a file of its own)."""
    first = await engine.generate(_request())
    owner = engine.runtimes.runtime_for(engine.resolve(MANAGED_ID))
    other = InferenceEngine(config=small_config(isolated_home))
    other.runtimes.settings = FAST.model_copy()
    other.register_model(managed_smollm2())
    try:
        assert (await other.generate(_request())).text == first.text
        attached = other.runtimes.runtime_for(other.resolve(MANAGED_ID))
        assert attached.state is RuntimeState.ATTACHED and attached.server_pid() == owner.pid
        assert owner.pid is not None
        os.kill(owner.pid, signal.SIGKILL)
        again = await other.generate(_request())  # meets the crash, waits for the owner's restart
        assert again.text == first.text and owner.restarts == 1
        assert attached.server_pid() == owner.pid and other.breakers.allow(MANAGED_ID)
        stream = [e async for e in other.stream(_request())]
        assert isinstance(stream[-1], Done) and stream[-1].text == first.text
    finally:
        other.close()


async def test_an_attached_process_takes_over_when_the_owner_stops_its_server(isolated_home: Path) -> None:
    """The owner stopping (`car runtimes stop`, Ctrl-C, its process ending) left an attached one
    failing at the dead address ("All connection attempts failed") until three failures opened
    the model's circuit; only after the cooldown did a request start a server. It starts one
    under the request that met the stop, as after a crash, and the circuit stays closed."""
    owner = InferenceEngine(config=small_config(isolated_home))
    owner.runtimes.settings = FAST.model_copy()
    owner.register_model(managed_smollm2())
    other = InferenceEngine(config=small_config(isolated_home))
    other.runtimes.settings = FAST.model_copy()
    other.register_model(managed_smollm2())
    try:
        first = await owner.generate(_request())
        assert (await other.generate(_request())).text == first.text
        attached = other.runtimes.runtime_for(other.resolve(MANAGED_ID))
        assert attached.state is RuntimeState.ATTACHED
        owner.close()  # stops the server it owns
        again = await other.generate(_request())
        assert again.text == first.text and other.breakers.allow(MANAGED_ID)
        assert attached.state is RuntimeState.RUNNING and attached.pid is not None
    finally:
        owner.close()
        other.close()


async def test_warm_up_starts_it_ahead_of_the_first_request(engine: InferenceEngine) -> None:
    assert await engine.warm_up([MANAGED_ID]) == [None]
    assert engine.runtimes.runtime_for(engine.resolve(MANAGED_ID)).state is RuntimeState.RUNNING


def test_only_managed_models_get_the_managed_backend(isolated_home: Path) -> None:
    sup = RuntimeSupervisor(small_config(isolated_home))
    plain = managed_smollm2().model_copy(
        update={"source": managed_smollm2().source.model_copy(update={"managed": False})}
    )
    # Stand-in lookups, deliberately no backends: the first's marker shows the call was passed
    # through; the others are only kept by the managed backend, not called in this test.
    assert sup.backend_for(plain, lambda m: ("lookup", m.id)) == ("lookup", plain.id)  # type: ignore[arg-type, return-value]
    backend = sup.backend_for(managed_smollm2(), lambda m: None)  # type: ignore[arg-type, return-value]
    assert isinstance(backend, ManagedBackend)
    assert sup.backend_for(managed_smollm2(), lambda m: None) is backend, "one per instance"  # type: ignore[arg-type, return-value]


def test_missing_vllm_is_unavailable_with_what_to_do(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(isolated_home))  # no vllm anywhere
    model = ModelSchema.model_validate({
        "id": "local/qwen-vllm", "name": "qwen", "provider": "local", "capabilities": ["generate"],
        "source": {"kind": "vllm", "model_name": "Qwen/Qwen3-0.6B", "managed": True},
    })  # fmt: skip
    with pytest.raises(ModelUnavailable) as info:
        VllmSpec(isolated_home).launch(model, small_config(isolated_home))
    assert "CAR_VLLM_BIN" in str(info.value) and "car runtimes install vllm" in str(info.value)


def test_find_by_model_or_instance_name_and_suggestions(engine: InferenceEngine) -> None:
    runtime = engine.runtimes.find(MANAGED_ID)
    assert engine.runtimes.find(runtime.name) is runtime
    with pytest.raises(ModelNotFound) as info:
        engine.runtimes.find("test/smollm2-serve")
    assert MANAGED_ID in info.value.suggestions
    names = [s.name for s in engine.runtimes.statuses()]
    assert runtime.name in names, "the catalog's managed models are listed before they run"


def test_runtime_settings_come_from_config_toml_and_the_environment(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated_home / "config.toml").write_text("[runtimes]\nidle_timeout_s = 60\nmax_restarts = 2\n")
    monkeypatch.setenv("CAR_RUNTIMES__BACKOFF_S", "0.5")
    eng = InferenceEngine()
    try:
        settings = eng.runtimes.settings
        assert (settings.idle_timeout_s, settings.max_restarts, settings.backoff_s) == (60, 2, 0.5)
        assert eng.runtimes.runtime_for(managed_smollm2()).settings is settings
    finally:
        eng.close()


# --- what a served GGUF cannot take is the client's error, as in-process -------------------------


async def test_a_prompt_past_the_window_is_the_clients_error_not_the_models(engine: InferenceEngine) -> None:
    """A prompt longer than the server's n_ctx cut its stream ("stream ended early"), counted as
    the model failing: three of them opened its circuit for every client. In-process the prompt is
    cut to its tail; a server takes messages, so it is refused before anything is sent."""
    runtime = engine.runtimes.runtime_for(engine.resolve(MANAGED_ID))
    long = _request(max_tokens=8).model_copy(update={"prompt": "word " * 600})  # n_ctx is 512
    for _ in range(4):
        with pytest.raises(InvalidInput, match=r"the prompt is \d+ tokens; .* 512-token window") as info:
            await engine.generate(long)
        assert info.value.param == "messages"
    assert runtime.state is RuntimeState.STOPPED, "refused before the server was started for it"
    assert engine.breakers.allow(MANAGED_ID)
    result = await engine.generate(_request())
    assert result.text.strip() and engine.breakers.allow(MANAGED_ID)
    with pytest.raises(InvalidInput):  # the running server is not asked either
        [e async for e in engine.stream(long)]
    assert engine.breakers.allow(MANAGED_ID)


_COLOR = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
    "type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}}}  # fmt: skip


async def test_a_json_schema_holds_the_served_answer_as_in_process(engine: InferenceEngine) -> None:
    """llama-cpp-python's server refuses the json_schema type with a 500 (its traceback and install
    paths in the client's error, counted against the model); its own json_object with a schema
    holds the answer to the same grammar the in-process backend uses."""
    request = GenerateRequest.model_validate({
        **_request(max_tokens=24).model_dump(), "prompt": "What color is the sky? Answer in JSON.",
        "response_format": _COLOR,
    })  # fmt: skip
    served = await engine.generate(request)
    answer = json.loads(served.text)  # the schema held it: an object whose color is a string
    assert isinstance(answer, dict) and set(answer) == {"color"} and isinstance(answer["color"], str)
    assert served.finish_reason == "stop" and engine.breakers.allow(MANAGED_ID)
    bad = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "number", "minimum": 0.5}}}
    unbound = GenerateRequest.model_validate({**request.model_dump(), "response_format": bad})
    for model in (MANAGED_ID, SMOLLM2):
        with pytest.raises(InvalidInput, match=r"minimum cannot be kept by a local model's grammar"):
            await engine.generate(unbound.model_copy(update={"model": model}))
    assert engine.breakers.allow(MANAGED_ID)


async def test_tools_on_a_template_without_tool_support_are_refused_as_in_process(
    engine: InferenceEngine,
) -> None:
    """The server answered a required tool call with text (finish_reason stop, usage null) for a
    models.toml entry that declares no parameters (the README's); the catalog's SmolLM2 declares
    its own, without tools, and was refused by the OpenAI backend with another message."""
    plain = managed_smollm2("test/smollm2-plain").model_copy(update={"supported_params": []})
    engine.register_model(plain)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    request = GenerateRequest.model_validate(
        {**_request().model_dump(), "tools": tools, "params": {"max_tokens": 8, "tool_choice": "required"}}
    )
    errors = []
    for model in (plain.id, MANAGED_ID, SMOLLM2):
        with pytest.raises(UnsupportedMode) as info:
            await engine.generate(request.model_copy(update={"model": model}))
        errors.append(str(info.value))
    assert errors[0] == errors[1] == errors[2] and "chat template has no tool support" in errors[0]
    assert engine.runtimes.runtime_for(plain).state is RuntimeState.STOPPED, "refused before it started"
    context_only = request.model_copy(
        update={"params": request.params.model_copy(update={"tool_choice": "none"})}
    )
    served = await engine.generate(context_only)  # tools as context: answered, with usage
    assert served.usage is not None and served.usage.prompt_tokens > 0


def test_a_servers_error_loses_its_traceback_and_a_validation_error_is_the_requests() -> None:
    raw = ProviderError(
        "1 validation error: {'msg': \"Input should be 'text'\"} File \"/opt/venv/lib/python3.11/"
        'site-packages/llama_cpp/server/app.py", line 376, in create_chat_completion POST /v1/chat',
        provider="local", model=MANAGED_ID, status=500,
    )  # fmt: skip
    cleaned = upstream_error(raw)
    assert isinstance(cleaned, ProviderRejectedInput) and cleaned.status == 400
    assert "/opt/venv" not in str(cleaned) and "Input should be 'text'" in str(cleaned)
    crash = ProviderError('boom File "/opt/x.py", line 1, in f', provider="local", model="m", status=500)
    assert str(upstream_error(crash)) == "local m returned 500: boom"
    assert not isinstance(upstream_error(crash), InvalidInput)
