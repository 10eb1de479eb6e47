"""Engine construction, models, warm-up, and the seed's start-up tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from car_inference.engine import InferenceEngine
from car_inference.errors import ConfigError, InvalidInput, ModelNotFound, ModelUnavailable
from car_inference.requests import (
    EmbedRequest,
    GenerateParams,
    GenerateRequest,
)

SMOL = "huggingface/smollm2-135m-instruct:q4_1"


def greedy(prompt: str, max_tokens: int = 40, **kw: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=GenerateParams(temperature=0, max_tokens=max_tokens), **kw)  # type: ignore[arg-type]


async def test_warm_up_reports_per_model(local_engine: InferenceEngine) -> None:
    results = await local_engine.warm_up([SMOL, "qwen3-8b", "nope-model"])
    assert results[0] is None
    assert isinstance(results[1], ModelUnavailable) and isinstance(results[2], ModelNotFound)


def test_engine_with_no_arguments_reads_car_home(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text('[preferred]\ngenerate = "smollm2"\n')
    engine = InferenceEngine()
    assert engine.config.home == isolated_home
    assert engine.default_model(__import__("car_inference").ModelCapability.GENERATE).id == SMOL  # type: ignore[union-attr]


def test_engine_loads_benchmark_priors_on_startup(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's test: a priors file named by CAR_BENCHMARK_PRIORS_PATH creates a profile."""
    priors = tmp_path / "benchmark_priors.json"
    priors.write_text('{"model_id": "qwen/qwen3-8b:q4_k_m", "overall_score": 0.88}')
    monkeypatch.setenv("CAR_BENCHMARK_PRIORS_PATH", str(priors))
    engine = InferenceEngine()
    profile = engine.tracker.profile("qwen/qwen3-8b:q4_k_m")
    assert profile is not None, "benchmark prior should create a profile"
    assert abs(profile.ema_quality - 0.88) < 0.01


def test_benchmark_priors_do_not_override_observed_profiles(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's test: an observed profile (here the seed's outcome_profiles.json, taken over on
    first start) keeps its numbers when a prior for the same model is loaded."""
    import json

    models_dir = isolated_home / "models"
    models_dir.mkdir()
    observed = [
        {
            "model_id": "qwen/qwen3-8b:q4_k_m",
            "total_calls": 12,
            "success_count": 3,
            "fail_count": 9,
            "total_latency_ms": 1200,
            "total_input_tokens": 0,
            "total_output_tokens": 0,
            "task_stats": {},
            "ema_quality": 0.21,
            "quality_per_1k_tokens": 0.0,
            "updated_at": 1,
        }
    ]
    (models_dir / "outcome_profiles.json").write_text(json.dumps(observed))
    priors = tmp_path / "benchmark_priors.json"
    priors.write_text('{"model_id": "qwen/qwen3-8b:q4_k_m", "overall_score": 0.95}')
    monkeypatch.setenv("CAR_BENCHMARK_PRIORS_PATH", str(priors))
    engine = InferenceEngine()
    profile = engine.tracker.profile("qwen/qwen3-8b:q4_k_m")
    assert profile is not None, "observed profile should remain present"
    assert abs(profile.ema_quality - 0.21) < 0.01
    assert profile.total_calls == 12
    engine.close()
    again = InferenceEngine()  # now from state.db; the JSON is not imported twice
    assert again.tracker.profile("qwen/qwen3-8b:q4_k_m").total_calls == 12  # type: ignore[union-attr]


def test_preferred_discovered_model_wins_generate_routing(isolated_home: Path) -> None:
    """The seed's test: a discovered vLLM model set as preferred wins with the override reason."""
    from car_inference.catalog import EndpointConfig
    from car_inference.routing import RoutingStrategy

    (isolated_home / "config.toml").write_text(
        '[preferred]\ngenerate = "vllm-mlx/mlx-community/gemma-3n-E2B-it-lm-4bit"\n'
    )
    engine = InferenceEngine()
    endpoint = EndpointConfig(name="vllm-mlx", kind="vllm", base_url="http://127.0.0.1:8001/v1")
    (schema,) = endpoint.to_schemas(["mlx-community/gemma-3n-E2B-it-lm-4bit"])
    engine.register_model(schema)
    import asyncio

    decision = asyncio.run(engine.route_adaptive("say hello in one sentence"))
    assert decision.model_id == "vllm-mlx/mlx-community/gemma-3n-E2B-it-lm-4bit"
    assert decision.strategy == RoutingStrategy.PREFERRED
    assert decision.reason == "preferred generation model override"


def test_register_endpoint_makes_a_model_for_base_url() -> None:
    engine = InferenceEngine()
    schema = engine.register_endpoint("http://127.0.0.1:9999/v1", "my-model")
    assert schema.id == "endpoint/my-model" and schema.available
    assert engine.resolve("endpoint/my-model").source.base_url == "http://127.0.0.1:9999/v1"  # type: ignore[union-attr]
    # "not a url" was taken, and the router then chose that endpoint for plain prompts.
    for bad in ("not a url", "ftp://host/v1", "http://"):
        with pytest.raises(InvalidInput, match="base_url is an http:// or https:// URL"):
            engine.register_endpoint(bad, "m")


async def test_a_closed_engine_takes_its_models_out_of_ps(tmp_path: Path) -> None:
    """``car models ps`` in another process reads the engine's record of its loaded models: once
    the engine is closed, it lists none of them (before, they stayed until the process ended)."""
    from car_inference.backends.cache import read_records

    engine = InferenceEngine(home=tmp_path / "home")
    await engine.warm_up([SMOL])
    folder = tmp_path / "home" / "loaded"
    assert [r.key for r in read_records(folder)] == [f"gguf:{SMOL}"]
    engine.close()
    assert read_records(folder) == [] and not any(folder.iterdir())


def test_a_configured_name_the_catalog_lacks_is_said_at_start(
    isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in [defaults]/[preferred] was passed over in silence: routing went on as if unset."""
    (isolated_home / "config.toml").write_text('[preferred]\ngenerate = "qwen3-9b"\n')
    with caplog.at_level("WARNING", logger="car_inference.engine"):
        engine = InferenceEngine()
    engine.close()
    (line,) = [r.getMessage() for r in caplog.records if "not in the catalog" in r.getMessage()]
    assert "[preferred] generate names 'qwen3-9b'" in line and "qwen/qwen3-8b:q4_k_m" in line


async def test_a_configured_model_that_cannot_do_its_task_is_said_and_named(
    isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`[defaults] embed = "smollm2"` said nothing at start, and `car embed hello` answered "mode
    embed not implemented on backend gguf", not a word of the config key behind it."""
    (isolated_home / "config.toml").write_text('[defaults]\nembed = "smollm2"\n')
    with caplog.at_level("WARNING", logger="car_inference.engine"):
        engine = InferenceEngine()
    try:
        assert any(
            "[defaults] embed names huggingface/smollm2" in r.getMessage()
            and "does not do embed" in r.getMessage()
            for r in caplog.records
        )
        with pytest.raises(
            ConfigError, match=r"config \[defaults\] embed names huggingface/smollm2.*does not"
        ):
            await engine.embed(EmbedRequest(texts=["hello"]))
    finally:
        engine.close()


def test_a_fallback_no_model_answers_to_is_said_at_start(
    isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in `fallbacks` showed only when the model it backs up failed."""
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "qwen/qwen3-8b:q4_k_m"\nfallbacks = ["qwen/qwen3-4b:q4_k_n", "box/later"]\n'
        '[[endpoints]]\nname = "box"\nbase_url = "http://127.0.0.1:9/v1"\ndiscover = true\n'
    )
    with caplog.at_level("WARNING", logger="car_inference.engine"):
        engine = InferenceEngine()
    engine.close()
    lines = [r.getMessage() for r in caplog.records if "its fallback" in r.getMessage()]
    assert len(lines) == 1 and "'qwen/qwen3-4b:q4_k_n' is not in the catalog" in lines[0], lines
    assert "did you mean qwen/qwen3-4b:q4_k_m" in lines[0]  # box/later: an endpoint may serve it


def test_a_spend_limit_no_model_is_billed_under_is_said_at_start(
    isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[spend.providers.gemini] limited nothing (Gemini's models are billed under "google") and a
    typo (opnai) as little, in silence: a money limit off over a name."""
    (isolated_home / "config.toml").write_text(
        "[spend.providers.gemini]\ndaily_usd = 1.0\n[spend.providers.opnai]\ndaily_usd = 1.0\n"
        "[spend.providers.openai]\ndaily_usd = 1.0\n"
    )
    with caplog.at_level("WARNING", logger="car_inference.engine"):
        engine = InferenceEngine()
    engine.close()
    lines = sorted(r.getMessage() for r in caplog.records if "[spend.providers." in r.getMessage())
    assert len(lines) == 2, lines  # openai is a provider
    assert (
        "[spend.providers.gemini]" in lines[0] and "models of host gemini are billed under google" in lines[0]
    )
    assert "[spend.providers.opnai]" in lines[1] and "did you mean openai" in lines[1]


def test_a_keys_name_no_model_reads_is_said_at_start(
    isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`[keys] openai_api_key = [...]` (lower case) was never read and OpenAI stayed unavailable,
    without a word."""
    (isolated_home / "config.toml").write_text(
        '[keys]\nopenai_api_key = ["sk-a"]\nANTHROPIC_API_KEY = ["sk-b"]\n'
    )
    with caplog.at_level("WARNING", logger="car_inference.engine"):
        engine = InferenceEngine()
    engine.close()
    (line,) = [r.getMessage() for r in caplog.records if "[keys]" in r.getMessage()]
    assert "[keys] openai_api_key is no model's key variable (did you mean OPENAI_API_KEY?)" in line


def test_private_image_urls_setting_reaches_every_backend(isolated_home: Path) -> None:
    """The server turns the fetching of loopback/private image URLs off on its engine; the GGUF
    backend (vision chats) reads it from the context every backend shares, so it cannot drift."""
    engine = InferenceEngine()
    try:
        backend: Any = engine._backend(engine.resolve("smollm2"))
        assert engine.private_urls_ok is True and backend.ctx.private_urls_ok is True
        engine.private_urls_ok = False
        assert backend.ctx.private_urls_ok is False
    finally:
        engine.close()


def test_hosted_models_follow_a_key_set_after_start(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Availability was computed at start only: a server that started without a key (or with keys
    all refused) said "not configured" after `car secrets put` / `car keys reset` until restarted."""
    import time

    from car_inference.engine.core import KEY_RECHECK_S

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    engine = InferenceEngine()
    try:
        hosted = "openai/gpt-4o-mini"
        assert not engine.registry.get(hosted).available  # type: ignore[union-attr]
        monkeypatch.setenv("OPENAI_API_KEY", "sk-set-later-1234567")
        time.sleep(KEY_RECHECK_S)
        engine.route(GenerateRequest(prompt="hi", model=hosted))  # a named model: no longer refused
        assert any(m.id == hosted and m.available for m in engine.list_models())
        monkeypatch.delenv("OPENAI_API_KEY")
        time.sleep(KEY_RECHECK_S)
        assert hosted not in {m.id for m in engine.list_models() if m.available}
    finally:
        engine.close()


def test_a_stream_left_open_past_the_engines_close_is_no_traceback(isolated_home: Path) -> None:
    """`async for ... in engine.stream(...): break`, then `engine.close()`: the stream finalized
    at the loop's end recorded its abandoned attempt on the closed store, and the program ended
    on a traceback about a closed database. The record is dropped with one warning."""
    import os
    import subprocess
    import sys

    script = (
        "import asyncio\n"
        "from car_inference.engine import InferenceEngine\n"
        "from car_inference.requests import GenerateParams, GenerateRequest\n"
        "async def main():\n"
        "    engine = InferenceEngine()\n"
        "    request = GenerateRequest(prompt='Count to ten.', params=GenerateParams(max_tokens=16))\n"
        "    async for event in engine.stream(request):\n"
        "        if event.type == 'text_delta':\n"
        "            break\n"
        "    engine.close()\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "CAR_HOME": str(isolated_home)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "came after the engine closed and is not written" in out.stderr
