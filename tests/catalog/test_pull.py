from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.catalog import load_builtin
from car_inference.catalog.pull import pull_model
from car_inference.errors import DownloadFailed, UnsupportedMode


def _model(model_id: str):  # type: ignore[no-untyped-def]
    return next(m for m in load_builtin().models if m.id == model_id)


def test_packaged_model_needs_no_download() -> None:
    assert pull_model(_model("huggingface/smollm2-135m-instruct:q4_1")).is_file()


def test_remote_model_has_nothing_to_pull() -> None:
    with pytest.raises(UnsupportedMode):
        pull_model(_model("openai/gpt-6-luna"))


def test_failed_download_is_a_download_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Offline (as every test run is): huggingface_hub refuses, and the error says which repo.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DownloadFailed, match=r"Qwen/Qwen3-0\.6B-GGUF"):
        pull_model(_model("qwen/qwen3-0.6b:q8_0"))
