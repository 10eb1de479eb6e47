from __future__ import annotations

import re
from pathlib import Path

import pytest

from car_inference.catalog import load_builtin
from car_inference.config import load_config
from car_inference.errors import ModelNotFound
from car_inference.kinds import Locality
from car_inference.registry import ModelFilter, UnifiedRegistry
from car_inference.schema import ModelCapability, ModelSchema
from fakes.optional import some


@pytest.fixture
def registry() -> UnifiedRegistry:
    return UnifiedRegistry(load_builtin().models, key_check=lambda env: env == "OPENAI_API_KEY")


def test_get_and_find_by_id_name_alias_case_insensitively(registry: UnifiedRegistry) -> None:
    smol = "huggingface/smollm2-135m-instruct:q4_1"
    assert registry.get(smol) is not None
    assert registry.get("smollm2") is None, "get is by exact id"
    for name in (smol, "SmolLM2-135M-Instruct", "smollm2", "SMOLLM2", "huggingface/smollm2-135m-instruct",
                 "smollm2-135m-instruct"):  # fmt: skip
        found = registry.find(name)
        assert found is not None and found.id == smol, name
    assert some(registry.find("Qwen3-8B")).id == "qwen/qwen3-8b:q4_k_m"


def test_unknown_model_suggests_close_matches(registry: UnifiedRegistry) -> None:
    with pytest.raises(ModelNotFound) as info:
        registry.resolve("qwen3-9b")
    assert info.value.name == "qwen3-9b"
    assert "qwen/qwen3-8b:q4_k_m" in info.value.suggestions
    assert all("/" in s for s in info.value.suggestions), "suggestions are ids"
    # for a task, models that do it: a completion was offered a text-to-speech voice
    with pytest.raises(ModelNotFound) as voice:
        registry.resolve("en_us-joe-mediun")
    assert "piper/en_us-joe-medium" in voice.value.suggestions
    with pytest.raises(ModelNotFound) as text:
        registry.resolve("en_us-joe-mediun", ModelCapability.GENERATE)
    assert text.value.suggestions == []
    with pytest.raises(ModelNotFound) as qwen:
        registry.resolve("qwen3-9b", ModelCapability.GENERATE)
    assert "qwen/qwen3-8b:q4_k_m" in qwen.value.suggestions


def test_availability_is_honest(
    registry: UnifiedRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert some(registry.get("huggingface/smollm2-135m-instruct:q4_1")).available
    assert some(registry.get("sentence-transformers/all-minilm-l6-v2")).available
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    registry.refresh_availability()
    assert not some(registry.get("qwen/qwen3-8b:q4_k_m")).available, "not pulled"
    openai_models = registry.query(provider="openai", capabilities=[ModelCapability.GENERATE])
    assert openai_models and all(m.available for m in openai_models), (
        "the key check says OPENAI_API_KEY is set"
    )
    assert not any(m.available for m in registry.query(provider="anthropic"))
    reason = registry.unavailable_reason(registry.query(provider="anthropic")[0])
    assert "ANTHROPIC_API_KEY" in reason and "car secrets put" in reason


def test_no_backend_means_unavailable() -> None:
    registry = UnifiedRegistry(load_builtin().models, backend_check=lambda kind: kind != "gguf")
    smol = registry.get("huggingface/smollm2-135m-instruct:q4_1")
    assert smol is not None and not smol.available
    assert "car-inference[gguf]" in registry.unavailable_reason(smol)


def test_query_filters(registry: UnifiedRegistry) -> None:
    local = registry.query(local_only=True)
    assert local and all(m.is_local for m in local)
    remote = registry.query(ModelFilter(remote_only=True))
    assert remote and not any(m.is_local for m in remote)
    vision = registry.query(capabilities=[ModelCapability.VISION, ModelCapability.TOOL_USE])
    assert vision and all(
        {ModelCapability.VISION, ModelCapability.TOOL_USE} <= set(m.capabilities) for m in vision
    )
    available = registry.query(available_only=True, capabilities=[ModelCapability.EMBED])
    assert "sentence-transformers/all-minilm-l6-v2" in {m.id for m in available}
    assert all(m.provider == "groq" for m in registry.query(provider="GROQ"))
    assert {m.kind for m in registry.query(kind="gguf")} == {"gguf"}


def test_register_replaces_and_unregister_restores_names(registry: UnifiedRegistry) -> None:
    schema = ModelSchema.model_validate(
        {
            "id": "vllm/mlx-community_gemma",
            "name": "gemma",
            "provider": "vllm",
            "capabilities": ["generate"],
            "source": {"kind": "vllm", "endpoint": "http://127.0.0.1:8001", "model_name": "gemma"},
            "aliases": ["smollm2"],
        }
    )
    registered = registry.register(schema)
    assert registered.available, "a configured endpoint is available"
    assert some(registry.find("gemma")).id == schema.id
    assert some(registry.find("smollm2")).id.startswith("huggingface/"), (
        "first registration keeps a shared alias"
    )
    registry.unregister(schema.id)
    assert registry.find("gemma") is None
    n = len(registry)
    registry.register(some(registry.get("huggingface/smollm2-135m-instruct:q4_1")))
    assert len(registry) == n


def test_delegated_models_need_a_registered_runner() -> None:
    schema = ModelSchema.model_validate(
        {
            "id": "host/app",
            "name": "app",
            "provider": "host",
            "capabilities": ["generate"],
            "source": {"kind": "delegated", "hint": "x"},
        }
    )
    served: set[str] = set()
    registry = UnifiedRegistry([schema], runner_check=lambda m: m.id in served)
    assert not some(registry.get("host/app")).available
    assert "no inference runner is registered" in registry.unavailable_reason(schema)
    served.add("host/app")
    registry.refresh_availability(Locality.RUNNER)
    assert some(registry.get("host/app")).available
    assert some(UnifiedRegistry([schema]).get("host/app")).available is False, (
        "no runner check: none registered"
    )


def test_from_config_reads_the_user_catalog_and_config_keys(isolated_home: Path) -> None:
    (isolated_home / "models.toml").write_text(
        '[[endpoints]]\nname = "lan"\nbase_url = "http://10.0.0.5:8080/v1"\nmodels = ["llama"]\n'
    )
    (isolated_home / "config.toml").write_text('[keys]\nGROQ_API_KEY = ["gsk-one", "gsk-two"]\n')
    registry = UnifiedRegistry.from_config(load_config(isolated_home, env={}))
    lan = registry.get("lan/llama")
    assert lan is not None and lan.available, "a key-less endpoint is available once configured"
    assert all(m.available for m in registry.query(provider="groq")), "keys listed in config count"


def test_available_means_a_backend_implements_the_task() -> None:
    """The issue's case: with OPENAI_API_KEY set, speech and image models were listed available
    though no backend could run them. The task check (engine: the backend class's methods) says."""
    implemented = {"openai": frozenset({ModelCapability.GENERATE, ModelCapability.EMBED})}
    registry = UnifiedRegistry(
        load_builtin().models,
        key_check=lambda env: env == "OPENAI_API_KEY",
        task_check=lambda kind: implemented.get(kind, frozenset(ModelCapability)),
    )
    for model_id, task in (
        ("openai/gpt-4o-mini-tts", "text_to_speech"),
        ("openai/gpt-transcribe", "speech_to_text"),
        ("openai/gpt-image-2", "image_generation"),
    ):
        model = registry.get(model_id)
        assert model is not None and not model.available, model_id
        assert f"does not implement {task}" in registry.unavailable_reason(model)
    assert some(registry.get("openai/gpt-4o-mini")).available, "classify is not implemented, generate is"
    assert some(registry.get("openai/text-embedding-3-small")).available
    classifiers = registry.query(available_only=True, capabilities=[ModelCapability.CLASSIFY])
    assert classifiers and not any(m.kind == "openai" for m in classifiers), "no classify method there"
    # A backend that gains the method makes its models available, with no other change.
    implemented["openai"] |= {ModelCapability.IMAGE_GENERATION}
    registry.refresh_availability()
    assert some(registry.get("openai/gpt-image-2")).available


def test_a_models_toml_entry_gives_a_builtin_model_its_fallbacks(tmp_path: Path) -> None:
    from car_inference.catalog import load_catalog

    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "openai/gpt-4o-mini"\nfallbacks = ["claude-haiku-5-5", "smollm2"]\n')
    registry = UnifiedRegistry(load_catalog(path).models)
    model = registry.get("openai/gpt-4o-mini")
    builtin = next(m for m in load_builtin().models if m.id == "openai/gpt-4o-mini")
    assert model is not None and model.fallbacks == ["claude-haiku-5-5", "smollm2"]
    assert model.capabilities == builtin.capabilities and model.source == builtin.source, "merged over"
    assert builtin.fallbacks == [], "the catalog configures none"


def test_why_none_names_what_would_make_a_model_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A task with no runnable model: each reason with the models it stops, commonest first."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing pulled
    registry = UnifiedRegistry(load_builtin().models, key_check=lambda env: False)
    why = registry.why_none(ModelCapability.IMAGE_GENERATION)
    assert "car models pull stabilityai/sd-turbo" in why
    assert "openai/gpt-image-2: set OPENAI_API_KEY" in why and "GEMINI_API_KEY" in why
    hosted = registry.why_none(ModelCapability.TEXT_TO_SPEECH, local=False)
    assert hosted.startswith(
        "elevenlabs/eleven-multilingual-v2, elevenlabs/eleven-flash-v2-5: set ELEVENLABS"
    )
    assert "piper" not in hosted
    # An available model whose backend lacks the task is named with that reason.
    implemented = {"openai": frozenset({ModelCapability.GENERATE})}
    registry = UnifiedRegistry(
        load_builtin().models,
        key_check=lambda env: env == "OPENAI_API_KEY",
        task_check=lambda kind: implemented.get(kind, frozenset(ModelCapability)),
    )
    assert re.search(
        r"openai/\S+, openai/\S+ and \d+ more: the openai backend does not implement classify",
        registry.why_none(ModelCapability.CLASSIFY, local=False),
    )
    empty = UnifiedRegistry([])
    assert empty.why_none(ModelCapability.EMBED) == "the catalog has no embed model (models.toml can add one)"


def test_recheck_refreshes_a_stale_flag_and_says_why_not() -> None:
    """A model's flag is computed at refreshes; recheck computes it now (a key set since)."""
    keys: set[str] = set()
    registry = UnifiedRegistry(load_builtin().models, key_check=lambda env: env in keys)
    model = registry.get("openai/gpt-4o-mini")
    assert model is not None and not model.available
    assert registry.recheck(model) is not None and "OPENAI_API_KEY" in str(registry.recheck(model))
    keys.add("OPENAI_API_KEY")  # no refresh
    before = registry.version
    assert registry.recheck(model) is None
    fresh = registry.get("openai/gpt-4o-mini")
    assert fresh is not None and fresh.available and registry.version == before + 1
