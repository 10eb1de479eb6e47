"""Runtime tests run the real llama.cpp server (llama-cpp-python's) on the embedded SmolLM2 GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.runtimes.managed import RuntimeSupervisor

from .helpers import FAST, small_config


@pytest.fixture
def supervisor(isolated_home: Path) -> Iterator[RuntimeSupervisor]:
    sup = RuntimeSupervisor(small_config(isolated_home), settings=FAST.model_copy())
    yield sup
    sup.close()
