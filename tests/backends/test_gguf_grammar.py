"""gguf_grammar: the grammar of a response_format, compiled on the vocabulary alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from car_inference.backends.gguf_grammar import MAX_UPPER, bounded, json_grammar
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


def test_a_refused_grammar_is_not_written_whole_to_the_log(capfd: pytest.CaptureFixture[str]) -> None:
    """llama.cpp logs the grammar it refuses, a client's schema written out: 24 KB a line."""
    from llama_cpp import Llama

    from car_inference.backends.gguf_grammar import MAX_LINE_CHARS
    from car_inference.backends.gguf_loaded import quiet_llama_cpp
    from car_inference.catalog import load_builtin
    from car_inference.catalog.locate import local_path

    quiet_llama_cpp()
    smol = next(m for m in load_builtin().models if m.id == "huggingface/smollm2-135m-instruct:q4_1")
    vocab = Llama(str(local_path(smol)), vocab_only=True, verbose=False)
    capfd.readouterr()
    with pytest.raises(InvalidInput, match="too many rules"):
        json_grammar(_schema({"type": "string", "pattern": "^(a|b|c|d){1,2000}$"}), vocab)
    logged = capfd.readouterr().err
    assert "error parsing grammar" in logged and "characters left out" in logged
    assert max(len(line) for line in logged.splitlines()) < MAX_LINE_CHARS + 100


def _schema(schema: object) -> GenerateRequest:
    return request(ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": schema}))


def test_huge_repetition_bounds_are_refused_before_the_converter_writes_them_out() -> None:
    """minLength 1e9 grew the server past 19 GB (the converter writes the item out that many
    times, uncancellably); minLength 3e7 took 68 s while other clients waited."""
    deep = {"type": "object", "properties": {"tags": {"type": "array", "items": {"minLength": 10**9}}}}
    with pytest.raises(InvalidInput, match=r"schema\.properties\.tags\.items\.minLength is 1000000000"):
        json_grammar(_schema(deep), llm=None)
    with pytest.raises(InvalidInput, match="minItems is above its maxItems"):
        json_grammar(_schema({"type": "array", "minItems": 3, "maxItems": 2}), llm=None)
    with pytest.raises(InvalidInput, match="maxLength must be a whole number >= 0"):
        json_grammar(_schema({"type": "string", "maxLength": -1}), llm=None)


def test_a_huge_maximum_is_lowered_and_names_and_data_are_not_keywords() -> None:
    from llama_cpp import Llama

    from car_inference.catalog import load_builtin
    from car_inference.catalog.locate import local_path

    smol = next(m for m in load_builtin().models if m.id == "huggingface/smollm2-135m-instruct:q4_1")
    vocab = Llama(str(local_path(smol)), vocab_only=True, verbose=False)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"minLength": {"type": "string", "maxLength": 10**12}},  # a property so named
        "default": {"minItems": "not a keyword here"},
    }
    out = bounded(schema)
    assert out["properties"]["minLength"]["maxLength"] == MAX_UPPER
    assert out["default"] == schema["default"] and schema["properties"]["minLength"]["maxLength"] == 10**12
    grammar = json_grammar(_schema(schema), vocab)
    assert grammar is not None and len(grammar._grammar) < 100 * MAX_UPPER, "it compiles (1,500 did not)"
    assert bounded({"minItems": 2_000, "maxItems": 10**9}) == {"minItems": 2_000, "maxItems": 2_000}


def test_an_integer_range_is_kept_by_the_grammar_and_other_numeric_bounds_are_refused() -> None:
    """The converter writes no numeric bound: {"minimum": 10, "maximum": 20} answered 123 with a
    200, a schema "enforced with a grammar" broken. An integer range of at most MAX_UPPER values
    becomes its enum, which the grammar holds; other bounds are refused, not silently dropped."""
    ranged = {"type": "integer", "minimum": 10, "maximum": 20, "description": "n"}
    assert bounded(ranged) == {"description": "n", "enum": list(range(10, 21))}
    exclusive = {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}
    assert bounded({"properties": {"n": exclusive}}) == {"properties": {"n": {"enum": [1, 2, 3]}}}
    schema = {"type": "object", "properties": {"n": ranged}, "required": ["n"]}
    from llama_cpp.llama_grammar import LlamaGrammar

    rules = LlamaGrammar.from_json_schema(json.dumps(bounded(schema)), verbose=False)._grammar
    assert '"10"' in rules and '"20"' in rules and '"21"' not in rules
    for refused, place in (
        ({"type": "number", "minimum": 0, "maximum": 1}, "schema.minimum"),
        ({"type": "integer", "minimum": 0}, "schema.minimum"),
        (
            {"properties": {"x": {"type": "integer", "maximum": 10**9, "minimum": 0}}},
            "schema.properties.x.minimum",
        ),
        ({"type": "integer", "minimum": 0, "maximum": 9, "multipleOf": 3}, "schema.minimum"),
    ):
        with pytest.raises(InvalidInput, match=rf"{place} cannot be kept by a local model's grammar"):
            bounded(refused)


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        # written as if absent by the converter: the answers broke them, with strict true
        (
            {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "schema.uniqueItems cannot be kept",
        ),
        ({"type": "object", "maxProperties": 1}, "schema.maxProperties cannot be kept"),
        ({"type": "array", "contains": {"const": 1}}, "schema.contains cannot be kept"),
        ({"properties": {"a": {"not": {"type": "null"}}}}, "schema.properties.a.not cannot be kept"),
        # shapes the converter failed on in Python's words ("'str' object has no attribute 'items'")
        ({"type": "object", "properties": "bad"}, "schema.properties must be an object"),
        ({"enum": []}, "schema.enum must be a non-empty list"),
        (False, "the schema is `false`"),
    ],
)
def test_a_schema_the_grammar_cannot_keep_is_refused_naming_the_field(schema: Any, says: str) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "c", "schema": schema})
    with pytest.raises(InvalidInput, match=says) as info:
        json_grammar(request(fmt), llm=None)
    assert info.value.param == "response_format"


def test_an_anything_schema_is_any_json() -> None:
    """`true` and `{}` are valid schemas of any value: true was refused, "'bool' object has no attribute"."""
    anything: tuple[Any, ...] = (True, {})
    for schema in anything:
        fmt = ResponseFormat(type="json_schema", json_schema={"name": "c", "schema": schema})
        assert "object" in json_grammar(request(fmt), llm=None)._grammar
    harmless = {"type": "array", "items": {"type": "string"}, "uniqueItems": False, "minProperties": 0}
    assert bounded(harmless) == harmless
