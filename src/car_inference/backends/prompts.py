"""Prompts the engine builds for its own tasks (reranking, classification), kept in one place.

``rerank_prompt`` and ``score_from_rerank_output`` follow the seed crate (the Qwen3-Reranker
template and its text-parsing fallback); the engine scores yes/no rerankers from logits instead of
parsing generated text, but the parser is kept for models served without logit access.
"""

from __future__ import annotations

import logging
import re

__all__ = [
    "DEFAULT_RERANK_INSTRUCTION",
    "classify_prompt",
    "rerank_prompt",
    "score_from_rerank_output",
]

log = logging.getLogger(__name__)

DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

_RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)


def rerank_prompt(instruction: str, query: str, document: str) -> str:
    """The Qwen3-Reranker prompt; the answer token after it is "yes" or "no"."""
    return (
        f"<|im_start|>system\n{_RERANK_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def score_from_rerank_output(text: str, model_name: str) -> float:
    """1.0 for a "yes" among the first five words, 0.0 for "no", 0.5 (logged) otherwise."""
    for token in _NON_ALNUM.sub(" ", text.lower()).split()[:5]:
        if token == "yes":
            return 1.0
        if token == "no":
            return 0.0
    log.warning("rerank: %s answered neither yes nor no (%r); scoring 0.5", model_name, text[:80])
    return 0.5


def classify_prompt(text: str, labels: list[str]) -> str:
    listed = "\n".join(f"- {label}" for label in labels)
    return (
        f"Classify the text into exactly one of these categories:\n{listed}\n\n"
        f"Text: {text}\n\nAnswer with the category name only."
    )
