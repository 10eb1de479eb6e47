"""The engine's ``PromptMeter``: what routing learns from the backends about windows and tokens.

``window`` asks the backend class of an in-process model's kind for ``context_window(model,
config)`` (a GGUF runs with ``local.n_ctx``, capped by its own window); other models keep the
catalog's context length.
``count`` asks the backend for ``count_prompt_tokens(model, request)`` (local backends that own a
tokenizer); a kind without one, a backend that is not installed, or a failure to count returns None
and routing keeps its estimate: counting is a refinement and must never fail a request.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from .. import backends as backend_table
from ..backends.base import PromptCounter
from ..errors import InferenceError
from ..requests import GenerateRequest, TokenUsage, ToolCall
from ..routing.complexity import estimate_tokens
from ..schema import ModelSchema

if TYPE_CHECKING:
    from .core import InferenceEngine

__all__ = ["EngineMeter", "unmetered_cost", "with_cost"]

log = logging.getLogger(__name__)


class EngineMeter:
    def __init__(self, engine: InferenceEngine) -> None:
        self._engine = engine

    def _backend_class(self, model: ModelSchema) -> type[Any] | None:
        # Only in-process backends own a context setting and a tokenizer; asking the others would
        # import their SDKs (over a second at the first routing) for nothing.
        if not model.in_process or not backend_table.backend_available(model.kind):
            return None
        try:
            return backend_table.load_backend_class(model.kind, model.id)
        except InferenceError:
            return None

    def window(self, model: ModelSchema) -> int:
        fn = getattr(self._backend_class(model), "context_window", None)
        return int(fn(model, self._engine.config)) if fn is not None else model.context_length

    def count(self, model: ModelSchema, request: GenerateRequest) -> int | None:
        if not model.available or not hasattr(self._backend_class(model), "count_prompt_tokens"):
            return None
        try:
            backend = self._engine._backend(model)
            if not isinstance(backend, PromptCounter):
                return None
            return int(backend.count_prompt_tokens(model, request))
        except InferenceError as exc:
            log.debug("could not count prompt tokens on %s: %s", model.id, exc)
            return None


def unmetered_cost(model: ModelSchema, est_input: int, text: str, tool_calls: list[ToolCall]) -> float:
    """What an answer its provider sent without usage (many OpenAI-compatible proxies drop it)
    cost at the catalog's prices: the router's prompt estimate and the answer's length in tokens.
    Spend limits counted such answers as free, so a limit never stopped them."""
    written = text + "".join(json.dumps(c.arguments) for c in tool_calls)
    cost = model.cost.estimate(est_input, estimate_tokens(written))
    if cost and model.id not in _UNMETERED_SAID:
        _UNMETERED_SAID.add(model.id)
        log.warning(
            "%s answers without usage: its spend is estimated from the text (~$%.6f a call)", model.id, cost
        )
    return cost


_UNMETERED_SAID: set[str] = set()


def with_cost(model: ModelSchema, usage: TokenUsage | None) -> TokenUsage | None:
    """Usage with ``cost_usd`` from the catalog's prices, unless the backend already set it."""
    if usage is None or usage.cost_usd is not None:
        return usage
    cost = model.cost.estimate(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_prompt_tokens or 0,
        usage.cache_write_prompt_tokens or 0,
    )
    return usage.model_copy(update={"cost_usd": cost})
