"""gguf_grammar: the grammar of a response_format, compiled on the vocabulary alone."""

from __future__ import annotations

import pytest

from car_inference.backends.gguf_grammar import json_grammar
from car_inference.errors import InvalidInput
from car_inference.requests import GenerateRequest, ResponseFormat


def request(fmt: ResponseFormat | None) -> GenerateRequest:
    return GenerateRequest(prompt="?", response_format=fmt)


def test_text_needs_no_grammar_and_json_object_any_json() -> None:
    assert json_grammar(request(None), llm=None) is None
    assert json_grammar(request(ResponseFormat(type="text")), llm=None) is None
    assert "object" in json_grammar(request(ResponseFormat(type="json_object")), llm=None)._grammar


def test_a_schema_compiles_on_a_vocabulary_only_model() -> None:
    """What LlamaCppBackend._prepare does off the model's thread: no weights, no context."""
    from llama_cpp import Llama

    from car_inference.catalog import load_builtin
    from car_inference.catalog.locate import local_path

    smol = next(m for m in load_builtin().models if m.id == "huggingface/smollm2-135m-instruct:q4_1")
    vocab = Llama(str(local_path(smol)), vocab_only=True, verbose=False)
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "c", "schema": schema})
    assert "Paris" in json_grammar(request(fmt), vocab)._grammar
    refused = {"type": "string", "pattern": "^(a|b|c|d){1,2000}$"}
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "c", "schema": refused})
    with pytest.raises(InvalidInput, match="too many rules"):
        json_grammar(request(fmt), vocab)
