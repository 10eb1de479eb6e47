"""``requests_base``: every request's strings are checked for text no encoder can write."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from car_inference.requests import EmbedRequest, GenerateRequest, Message, SynthesizeRequest


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: GenerateRequest(prompt="hi \ud800"), "prompt"),
        (lambda: GenerateRequest(messages=[Message(role="user", content="\udfff")]), "messages"),
        (
            lambda: GenerateRequest.model_validate(
                {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}
            ),
            "messages",
        ),
        (lambda: EmbedRequest(texts=["fine", "not \ud800 fine"]), "texts"),
        (lambda: SynthesizeRequest(text="ok", output_path="/tmp/a\ud800.wav"), "output_path"),
        (
            lambda: GenerateRequest(prompt="x", tools=[{"name": "f", "parameters": {"enum": ["\ud800"]}}]),
            "tools",
        ),
    ],
)
def test_unpaired_surrogates_are_refused_naming_the_field(build: Any, field: str) -> None:
    """No encoder writes a lone surrogate: llama.cpp's tokenizer, a file name and Hugging Face
    tokenizers each failed with their own error type deep in a backend."""
    with pytest.raises(ValidationError, match=f"{field} contains an unpaired surrogate"):
        build()
    assert GenerateRequest(prompt="héllo 😀 \u05e9\u05dc\u05d5\u05dd").prompt  # real non-ASCII text is fine


def test_an_assignment_is_checked_as_construction_is() -> None:
    """Requests were mutable without a check: ``params.temperature = 5`` was taken, and the
    request failed later, far from the mistake."""
    request = GenerateRequest(prompt="hi")
    with pytest.raises(ValidationError, match="temperature"):
        request.params.temperature = 5
    with pytest.raises(ValidationError, match="prompt"):
        request.prompt = "bad \ud800"  # the whole-request checks run again too
    with pytest.raises(ValidationError, match="texts"):
        EmbedRequest(texts=["a"]).texts = []
    request.params.temperature = 0.2  # a valid value is taken
    assert request.params.temperature == 0.2
