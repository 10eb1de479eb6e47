"""JSON output on llama.cpp: the grammar a request's ``response_format`` asks for."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, TypeGuard

from ..errors import InvalidInput
from ..requests import GenerateRequest

# llama-cpp-python's converter writes a bound out as that many copies of its item: minLength 3e7
# took 68 s and a billion grew the server past 19 GB, uncancellably. A minimum above MAX_REPEAT is
# refused. A maximum is written as nested optional copies, which llama.cpp refuses past about
# 1,000 ("too many rules"): one above MAX_UPPER is taken as MAX_UPPER (or the minimum, if larger),
# so the answer still fits the schema a client sent ("maxLength": 65535 means "no real limit").
MAX_REPEAT = 10_000
MAX_UPPER = 1_000
_MINIMA = {"minLength": "maxLength", "minItems": "maxItems", "minProperties": "maxProperties"}


def json_grammar(request: GenerateRequest, llm: Any) -> Any:
    """A ``LlamaGrammar`` for ``response_format`` (a schema's, else any JSON), or None for text.
    ``llm`` only lends its vocabulary to check the grammar; a schema llama.cpp cannot express is
    ``InvalidInput``. Compiled before the generation's turn (``LlamaCppBackend._prepare``)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if fmt.type == "json_schema" and fmt.json_schema:
        given = fmt.json_schema["schema"]
        if given is False:
            raise _refused("the schema is `false`: no answer can match it")
        if given is True or given == {}:  # any JSON value ("'bool' object has no attribute 'get'")
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        schema = bounded(given)
        try:
            grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as exc:  # the converter asserts, or raises on what it cannot express
            raise _inexpressible(str(exc).strip() or type(exc).__name__) from None
        _check_grammar(llm, grammar)
        return grammar
    return LlamaGrammar.from_string(JSON_GBNF, verbose=False)


def bounded(schema: Any, where: str = "schema") -> Any:
    """``schema`` with every length, item and property count checked (whole numbers >= 0, the
    minimum not above the maximum, minima at most ``MAX_REPEAT``) and maxima above ``MAX_UPPER``
    lowered to it, in it and in every schema it holds; ``InvalidInput`` naming the place."""
    if not isinstance(schema, dict):
        return schema
    _keepable(schema, where)
    out = dict(schema)
    for key, value in schema.items():
        if key in _SUBSCHEMA and isinstance(value, dict):
            out[key] = bounded(value, f"{where}.{key}")
        elif key in _SUBSCHEMA and isinstance(value, list):
            out[key] = [bounded(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: bounded(v, f"{where}.{key}.{name}") for name, v in value.items()}
    for low_key, high_key in _MINIMA.items():
        low, high = (_count(out, k, where) for k in (low_key, high_key))
        if low is not None and low > MAX_REPEAT:
            raise _refused(f"{where}.{low_key} is {low}; a local model's grammar takes at most {MAX_REPEAT}")
        if low is not None and high is not None and low > high:
            raise _refused(f"{where}.{low_key} is above its {high_key}")
        if high is not None and high > MAX_UPPER:
            out[high_key] = max(MAX_UPPER, low or 0)
    return _numeric_bounds(out, where)


def _numeric_bounds(schema: dict[str, Any], where: str) -> dict[str, Any]:
    """The converter writes no numeric bound into the grammar: {"minimum": 10, "maximum": 20}
    answered 123, 200 with a schema it broke. An integer range of at most ``MAX_UPPER`` values
    becomes the enum of its values (which the grammar holds); any other bound is ``InvalidInput``
    rather than a schema silently not kept."""
    given = [k for k in _NUMERIC_BOUNDS if k in schema]
    if not given:
        return schema
    low, high = schema.get("minimum"), schema.get("maximum")
    low = schema["exclusiveMinimum"] + 1 if _whole(schema.get("exclusiveMinimum")) else low
    high = schema["exclusiveMaximum"] - 1 if _whole(schema.get("exclusiveMaximum")) else high
    ranged = schema.get("type") == "integer" and "multipleOf" not in schema
    if ranged and _whole(low) and _whole(high) and 0 <= high - low < MAX_UPPER:
        kept = {k: v for k, v in schema.items() if k not in _NUMERIC_BOUNDS and k != "type"}
        return kept | {"enum": list(range(low, high + 1))}
    raise _refused(
        f"{where}.{given[0]} cannot be kept by a local model's grammar"
        f" (it holds an integer range of at most {MAX_UPPER} values, as both minimum and maximum;"
        " no other numeric bound)"
    )


# Keywords the converter writes nothing for: uniqueItems answered ["c","b","b"] and
# maxProperties 2 three properties, with strict true. Refused, as OpenAI's strict mode refuses them
# (their harmless values aside).
_UNKEPT = frozenset(
    {"uniqueItems", "contains", "minContains", "maxContains", "minProperties", "maxProperties",
     "dependentRequired", "dependentSchemas", "not", "if", "then", "else", "patternProperties",
     "propertyNames", "unevaluatedItems", "unevaluatedProperties"}
)  # fmt: skip
_HARMLESS: dict[str, Any] = {"uniqueItems": False, "minProperties": 0}


def _keepable(schema: dict[str, Any], where: str) -> None:
    """``InvalidInput`` for a keyword the grammar cannot keep, or a malformed one the converter
    failed on with Python's words ("'str' object has no attribute 'items'")."""
    for key in _UNKEPT.intersection(schema):
        if key not in _HARMLESS or schema[key] != _HARMLESS[key]:
            raise _refused(
                f"{where}.{key} cannot be kept by a local model's grammar (it keeps type, properties,"
                " required, additionalProperties, items, prefixItems, minItems/maxItems,"
                " minLength/maxLength, pattern, format, enum, const, anyOf/oneOf/allOf and $ref)"
            )
    for key, kind, what in (("properties", dict, "an object"), ("required", list, "a list of names")):
        if key in schema and not isinstance(schema[key], kind):
            raise _refused(f"{where}.{key} must be {what}")
    enum = schema.get("enum")
    if "enum" in schema and (not isinstance(enum, list) or not enum):
        raise _refused(f"{where}.enum must be a non-empty list: an empty one matches nothing")


def _refused(what: str) -> InvalidInput:
    return InvalidInput(f"response_format.json_schema: {what}", param="response_format")


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# Keywords whose value is a schema (or a list of them), and those whose value maps names to schemas.
_SUBSCHEMA = frozenset(
    {"items", "prefixItems", "additionalProperties", "additionalItems", "contains", "not",
     "anyOf", "oneOf", "allOf", "if", "then", "else", "propertyNames", "unevaluatedItems",
     "unevaluatedProperties"}
)  # fmt: skip
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _count(schema: dict[str, Any], key: str, where: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _refused(f"{where}.{key} must be a whole number >= 0")
    return value


def _inexpressible(reason: str) -> InvalidInput:
    return _refused(f"llama.cpp's grammar cannot express this schema ({reason})")


def _check_grammar(llm: Any, grammar: Any) -> None:
    """Build the grammar's sampler once, as generation will, and free it: llama.cpp returns no
    sampler for a grammar it refuses (over 'sane' rule counts: a regex bound such as {1,2000} in a
    schema's pattern), and llama-cpp-python adds that NULL to its sampler chain, which segfaulted
    the whole server on the first token."""
    import llama_cpp

    with _stderr_capped():
        sampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
    if not sampler:
        raise _inexpressible("llama.cpp refused the grammar it converts to: too many rules")
    llama_cpp.llama_sampler_free(sampler)


MAX_LINE_CHARS = 1_000  # of a line llama.cpp writes while it parses a grammar
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _stderr_capped() -> Iterator[None]:
    """llama.cpp writes a grammar it refuses to the process's stderr whole (``fprintf``, not its
    log callback): a client's schema written out, 24 KB a line, in the server's log. For the few
    milliseconds of the parse, file descriptor 2 goes to a temporary file, whose lines are then
    written on, each cut at ``MAX_LINE_CHARS``. Anything another thread writes meanwhile is
    written on the same way."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for raw in caught:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if len(line) > MAX_LINE_CHARS:
                    line = f"{line[:MAX_LINE_CHARS]}... ({len(line) - MAX_LINE_CHARS} characters left out)"
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
