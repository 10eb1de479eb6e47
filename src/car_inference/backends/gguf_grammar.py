"""JSON output on llama.cpp: the grammar a request's ``response_format`` asks for."""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidInput
from ..requests import GenerateRequest


def json_grammar(request: GenerateRequest, llm: Any) -> Any:
    """A ``LlamaGrammar`` for ``response_format`` (a schema's, else any JSON), or None for text.
    ``llm`` only lends its vocabulary to check the grammar; a schema llama.cpp cannot express is
    ``InvalidInput``. Compiled before the generation's turn (``LlamaCppBackend._prepare``)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if fmt.type == "json_schema" and fmt.json_schema:
        try:
            grammar = LlamaGrammar.from_json_schema(json.dumps(fmt.json_schema["schema"]), verbose=False)
        except Exception as exc:  # the converter asserts, or raises on what it cannot express
            raise _inexpressible(str(exc).strip() or type(exc).__name__) from None
        _check_grammar(llm, grammar)
        return grammar
    return LlamaGrammar.from_string(JSON_GBNF, verbose=False)


def _inexpressible(reason: str) -> InvalidInput:
    return InvalidInput(
        f"response_format.json_schema: llama.cpp's grammar cannot express this schema ({reason})"
    )


def _check_grammar(llm: Any, grammar: Any) -> None:
    """Build the grammar's sampler once, as generation will, and free it: llama.cpp returns no
    sampler for a grammar it refuses (over 'sane' rule counts: a regex bound such as {1,2000} in a
    schema's pattern), and llama-cpp-python adds that NULL to its sampler chain, which segfaulted
    the whole server on the first token."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(
        llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
    )
    if not sampler:
        raise _inexpressible("llama.cpp refused the grammar it converts to: too many rules")
    llama_cpp.llama_sampler_free(sampler)
