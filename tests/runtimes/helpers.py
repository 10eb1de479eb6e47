"""Shared by the runtime tests: the managed SmolLM2 model, a small config, fast settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from car_inference.catalog import load_builtin
from car_inference.config import CarConfig
from car_inference.runtimes.supervisor import RuntimeSettings
from car_inference.schema import ModelSchema

SMOLLM2 = "huggingface/smollm2-135m-instruct:q4_1"
MANAGED_ID = "test/smollm2-served"


def managed_smollm2(model_id: str = MANAGED_ID) -> ModelSchema:
    """The embedded SmolLM2 GGUF, served by a llama.cpp server we start."""
    base = next(m for m in load_builtin().models if m.id == SMOLLM2)
    source = base.source.model_copy(update={"managed": True})
    return base.model_copy(update={"id": model_id, "aliases": [], "source": source})


def small_config(home: Path) -> CarConfig:
    config = CarConfig(home=home)
    config.local.n_ctx = 512  # tiny context: quick to load, little memory
    config.local.n_threads = 1
    return config


FAST = RuntimeSettings(backoff_s=0.2, backoff_max_s=1.0, tick_s=0.1, stop_grace_s=5.0, recheck_s=0.5)


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
