"""A closed engine refuses work (``engine/lifecycle.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from car_inference.engine import InferenceEngine


async def test_a_closed_engine_refuses_work_with_an_inference_error(isolated_home: Path) -> None:
    """After close a generation ran (loading its model again) and lost its record, and feedback,
    a report or the health report raised sqlite3's own error about a closed database."""
    from car_inference.errors import InferenceError
    from car_inference.requests import EmbedRequest, GenerateRequest

    engine = InferenceEngine(home=isolated_home)
    request = GenerateRequest(prompt="hi")
    engine.close()
    calls: list[Any] = [
        lambda: engine.generate(request),
        lambda: engine.embed(EmbedRequest(texts=["x"])),
        lambda: engine.tokenize("smollm2", "x"),
    ]
    for call in calls:
        with pytest.raises(InferenceError, match="closed"):
            await call()
    for blocking in (
        lambda: engine.route(request),
        lambda: engine.stream(request),
        lambda: engine.feedback("trace", 1.0),
        lambda: engine.report(engine_decision(), success=True),
        engine.model_health,
        engine.spend_status,
        # The maintenance calls raised sqlite3.ProgrammingError; an export still answered.
        lambda: engine.forget_model("smollm2"),
        engine.export_profiles,
        lambda: engine.import_profiles([]),
        engine.prune_traces,
        engine.forget_templates,
        engine.compact_spend,
    ):
        with pytest.raises(InferenceError, match="closed"):
            blocking()


def engine_decision() -> Any:
    """A stand-in decision: a closed engine refuses before looking at it."""
    return object()
