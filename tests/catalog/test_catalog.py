from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.catalog import load_builtin, load_catalog
from car_inference.errors import ConfigError
from car_inference.schema import ModelCapability


def test_builtin_catalog_has_the_embedded_defaults_and_the_qwen3_family() -> None:
    catalog = load_builtin()
    ids = {m.id for m in catalog.models}
    assert {
        "huggingface/smollm2-135m-instruct:q4_1",
        "sentence-transformers/all-minilm-l6-v2",
        "piper/en_us-joe-medium",
        "systran/faster-whisper-base",
        "qwen/qwen3-0.6b:q8_0",
        "qwen/qwen3-8b:q4_k_m",
        "qwen/qwen3-embedding-0.6b",
        "qwen/qwen3-reranker-0.6b:q8_0",
        "qwen/qwen2.5-vl-3b:q4_k_m",
    } <= ids
    assert len(ids) == len(catalog.models), "ids are unique"


def test_builtin_remote_models_resolve_their_hosts() -> None:
    catalog = load_builtin()
    remote = [m for m in catalog.models if m.is_remote and m.kind != "delegated"]
    providers = {m.provider for m in remote}
    assert {"openai", "anthropic", "google", "openrouter", "groq", "elevenlabs"} <= providers
    for m in remote:
        assert getattr(m.source, "base_url", None), m.id
        assert getattr(m.source, "api_key_env", None), m.id
    chat = [m for m in remote if ModelCapability.GENERATE in m.capabilities]
    assert all(m.context_length > 0 and m.cost.output_per_mtok > 0 for m in chat)
    assert {"ollama", "lmstudio", "llamacpp", "vllm"} <= set(catalog.hosts)


def test_user_catalog_adds_models_overrides_fields_and_hosts(isolated_home: Path) -> None:
    path = isolated_home / "models.toml"
    path.write_text(
        """
[hosts.openai]
base_url = "http://proxy.local/v1"

[[models]]
id = "huggingface/smollm2-135m-instruct:q4_1"
quality = 0.3
[models.cost]
input_per_mtok = 0.01

[[models]]
id = "me/tiny"
name = "Tiny"
provider = "me"
capabilities = ["generate"]
[models.source]
kind = "gguf"
path = "/models/tiny.gguf"

[[endpoints]]
name = "gpubox"
kind = "vllm"
base_url = "http://gpubox:8000/v1"
models = ["meta-llama/Llama-3.1-8B-Instruct"]
context_length = 32768
"""
    )
    catalog = load_catalog(path)
    by_id = {m.id: m for m in catalog.models}
    smol = by_id["huggingface/smollm2-135m-instruct:q4_1"]
    assert smol.quality == 0.3 and smol.cost.input_per_mtok == 0.01
    assert smol.cost.size_mb == 94, "fields the user did not set keep the built-in value"
    assert smol.source.kind == "gguf"
    assert by_id["me/tiny"].source.path == "/models/tiny.gguf"  # type: ignore[union-attr]
    vllm = by_id["gpubox/meta-llama/Llama-3.1-8B-Instruct"]
    assert vllm.kind == "vllm" and vllm.source.endpoint == "http://gpubox:8000"  # type: ignore[union-attr]
    openai_models = [m for m in catalog.models if getattr(m.source, "host", None) == "openai"]
    assert openai_models and all(m.source.base_url == "http://proxy.local/v1" for m in openai_models)  # type: ignore[union-attr]
    assert catalog.hosts["openai"].api_key_env == "OPENAI_API_KEY", (
        "unset host fields keep the built-in value"
    )


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        (
            '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["fly"]\n'
            '[models.source]\nkind = "gguf"\npath = "/x"\n',
            5,
            "models.0.capabilities.0",
        ),
        (
            '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["generate"]\n'
            '[models.source]\nkind = "gguf"\n',
            6,
            "models.0.source",
        ),
        (
            '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["generate"]\n'
            '[models.source]\nkind = "gguf"\npath = "/x"\n[models.cost]\nsize_mb = "big"\n',
            10,
            "models.0.cost.size_mb",
        ),
        ('[[models]]\nname = "x"\n', 1, "models.0.id"),
        ('[[endpoints]]\nname = "bad name!"\nbase_url = "http://x"\n', 2, "endpoints.0.name"),
        ("[[models]\nid = 1\n", 1, None),
    ],
)
def test_bad_user_catalog_names_file_line_and_field(
    isolated_home: Path, text: str, line: int, field: str | None
) -> None:
    path = isolated_home / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    err = info.value
    assert err.path == str(path)
    assert err.line == line
    assert err.field == field
    assert str(path) in str(err)


def test_unknown_host_reference_is_reported(isolated_home: Path) -> None:
    path = isolated_home / "models.toml"
    path.write_text(
        '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["generate"]\n'
        '[models.source]\nkind = "openai"\nhost = "nowhere"\n'
    )
    with pytest.raises(ConfigError, match="unknown host 'nowhere'"):
        load_catalog(path)
