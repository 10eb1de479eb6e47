"""A GGUF served by llama-cpp-python's server gets what it gets in-process, or the client's error.

llama-cpp-python's server answers a request it cannot take with a 500 (a ``json_schema`` response
format: a validation error, its traceback and install paths in the message) or, once the answer
streams, a cut stream (a prompt longer than ``n_ctx``: "Requested tokens exceed context window").
Both read as the model failing, and three of them opened its circuit breaker for every client.
So, before a request is sent, it is checked here as the in-process backend checks it, on the
GGUF's own vocabulary (``preflight``):

- tools on a chat template without tool support: ``UnsupportedMode``, the in-process message;
- a prompt the in-process backend would cut to fit (it keeps the tail and sets
  ``needs_compaction``; a server takes messages, not tokens, so it cannot be cut the same way):
  ``InvalidInput`` naming its size and the window;
- a ``json_schema`` llama.cpp's grammar cannot hold: ``InvalidInput``, as in-process.

A schema that passes goes out as the server's own ``{"type": "json_object", "schema": ...}``
(``LlamaServerWire``), bounded as in-process, so the answer is held to the same grammar. An error
the server still answers with loses its traceback (``upstream_error``): a validation error is the
request's (``ProviderRejectedInput``, no count toward the breaker).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..backends.base import PromptCounter
from ..backends.gguf_grammar import bounded, json_grammar
from ..backends.openai_compat import OpenAICompatBackend
from ..backends.remote import Endpoint
from ..errors import InvalidInput, ProviderError, ProviderRejectedInput, TokenizationError, UnsupportedMode
from ..requests import GenerateRequest
from ..schema import ModelSchema

__all__ = ["LlamaServerWire", "preflight", "upstream_error"]

log = logging.getLogger(__name__)


def preflight(counter: Any, model: ModelSchema, request: GenerateRequest, window: int) -> int | None:
    """The prompt's tokens as the server will read them (the GGUF's chat template on its own
    vocabulary), after refusing what the served model cannot take; None where they cannot be
    counted here (the request then goes as it is). Blocking: tokenizes."""
    if not isinstance(counter, PromptCounter):
        return None
    try:
        prompt = counter.count_prompt_tokens(model, request)  # tools without template support: refused
    except (UnsupportedMode, InvalidInput):
        raise
    except (TokenizationError, OSError, ValueError, RuntimeError) as exc:
        log.debug("could not count the prompt of %s before sending it: %s", model.id, exc)
        return None
    # The in-process backend keeps min(max_tokens, window / 4) tokens for the answer and cuts a
    # longer prompt to its tail; the server fails on it (or has no room to answer).
    room = min(request.params.max_tokens, window // 4)
    if prompt > window - room:
        raise InvalidInput(
            f"the prompt is {prompt} tokens; {model.id} runs with a {window}-token window "
            f"([local] n_ctx) and keeps {room} of them for the answer: shorten the messages "
            f"(at most {window - room} tokens) or lower max_tokens",
            param="messages",
        )
    vocab = getattr(counter, "vocab", None)  # LlamaCppBackend.vocab: a vocabulary-only load
    if request.response_format is not None and request.response_format.type == "json_schema" and vocab:
        json_grammar(request, vocab(model).llm)  # a schema its grammar cannot hold: InvalidInput
    return prompt


class LlamaServerWire(OpenAICompatBackend):
    """The OpenAI-compatible backend, with a ``json_schema`` response format in the body field
    llama-cpp-python's server takes it in: ``{"type": "json_object", "schema": ...}`` (its
    ``json_schema`` type is refused with a 500)."""

    def build(self, model: ModelSchema, endpoint: Endpoint, request: GenerateRequest) -> dict[str, Any]:
        body = super().build(model, endpoint, request)
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema and "response_format" in body:
            body["response_format"] = {"type": "json_object", "schema": bounded(fmt.json_schema["schema"])}
        return body


# Where llama-cpp-python's server appends the traceback's place to its error message.
_TRACE = re.compile(r'\s*File "[^"]*", line \d+.*$', re.DOTALL)


def upstream_error(exc: ProviderError) -> ProviderError:
    """A server's error answer without its traceback and install paths (they stay in its log);
    a validation error (the server's 500 for a body it does not take) is the request's."""
    prefix = f"{exc.provider} {exc.model} returned {exc.status}: "
    text = str(exc)
    if exc.status is None or not text.startswith(prefix):
        return exc
    message = _TRACE.sub("", text[len(prefix) :]).strip()
    if message == text[len(prefix) :].strip() and "validation error" not in message:
        return exc
    if "validation error" in message:
        return ProviderRejectedInput(
            f"the llama.cpp server refused the request (it answered {exc.status}): {message}",
            provider=exc.provider,
            model=exc.model,
            status=400,
        )
    return ProviderError(
        message,
        provider=exc.provider,
        model=exc.model,
        status=exc.status,
        retryable=exc.retryable,
        retry_after=exc.retry_after,
        timeout=exc.timeout,
    )
