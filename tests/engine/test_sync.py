"""The blocking facade."""

from __future__ import annotations

from car_inference.engine import InferenceEngine, SyncInferenceEngine
from car_inference.requests import (
    GenerateParams,
    GenerateRequest,
)
from car_inference.stream import Done

SMOL = "huggingface/smollm2-135m-instruct:q4_1"


def greedy(prompt: str, max_tokens: int = 40, **kw: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=GenerateParams(temperature=0, max_tokens=max_tokens), **kw)  # type: ignore[arg-type]


def test_sync_facade(local_engine: InferenceEngine) -> None:
    with SyncInferenceEngine(local_engine) as sync:
        result = sync.generate(
            "What is the capital of France?", params=GenerateParams(temperature=0, max_tokens=40)
        )
        assert "Paris" in result.text
        events = list(sync.stream(greedy("Say hi.", 8)))
        assert isinstance(events[-1], Done)
        assert sync.tokenize("smollm2", "hi").tokens
