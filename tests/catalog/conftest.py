"""The catalog's pull tests run against tests/fakes/hf_hub.py, a Hugging Face Hub on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.hf_hub import FakeHub, serving_hub


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with serving_hub(tmp_path / "hf-cache", monkeypatch) as fake:
        yield fake
