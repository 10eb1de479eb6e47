"""A GGUF model's control tokens written as text by a client stay text.

A chat template's output is tokenized with ``special=True``, so that the template's own
``<|im_start|>`` and ``<|im_end|>`` become control tokens. Before this module the client's text was
tokenized the same way: a user who wrote ``<|im_end|>`` in a message closed their own turn and could
forge a system or assistant turn, and a message of 50,000 of them held the tokenizer (whose special
token search is superlinear) for 10 s.

Client strings (message contents, tool call arguments, tool definitions: every string but a role)
that hold the text of a control token get each such text replaced by a sentinel before rendering;
the rendered prompt is tokenized between the sentinels as before (``special=True``) and each
sentinel's text with ``special=False``, as plain characters. A request without such text (almost
all) is tokenized exactly as before. A template that does not carry a sentinel through unchanged
(one that re-encodes the text) gets the request refused rather than the text let through.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import InvalidInput

# Private-use code points: no template writes them, no tokenizer gives them a meaning.
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
# The same characters written by a client: a sentinel of their own, or "U+F0000 99 U+F0001" in a
# message that also held a control token's text was read as sentinel 99 (a wrong refusal).
_OWN = re.compile(f"[{_OPEN}{_CLOSE}]")


def control_pattern(llm: Any, vocab: Any) -> re.Pattern[str] | None:
    """A pattern matching the text of any control token of the model (longest first), or None."""
    import llama_cpp

    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    texts = set()
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & control:
            text = llm.detokenize([token], special=True).decode("utf-8", "replace")
            if text.strip():
                texts.add(text)
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def neutralize(value: Any, pattern: re.Pattern[str], found: list[str]) -> Any:
    """``value`` (messages, tools: JSON-like) with each control token's text in its strings (but
    roles) replaced by a sentinel; the texts replaced are appended to ``found``, in order."""

    def sentinel(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return f"{_OPEN}{len(found) - 1}{_CLOSE}"

    if isinstance(value, str):
        if _OWN.search(value):
            value = _OWN.sub(sentinel, value)
        return pattern.sub(sentinel, value) if pattern.search(value) else value
    if isinstance(value, list):
        return [neutralize(v, pattern, found) for v in value]
    if isinstance(value, dict):
        return {k: v if k == "role" else neutralize(v, pattern, found) for k, v in value.items()}
    return value


def tokenize_around(
    text: str, found: list[str], tokenize: Callable[[str, bool, bool], list[int]], add_bos: bool
) -> list[int]:
    """The tokens of a rendered ``text`` holding ``found``'s sentinels: the template's text with
    ``tokenize(part, special=True, add_bos)``, each sentinel's text with special off."""
    parts = _SENTINEL.split(text)
    if sorted(int(i) for i in parts[1::2]) != list(range(len(found))):
        shown = ", ".join(sorted(set(found)))
        raise InvalidInput(
            f"the request writes this model's control tokens as text ({shown}), and its chat "
            "template does not pass them through as text; remove them"
        )
    tokens: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:
            tokens += tokenize(found[int(part)], False, False)
        elif part or (i == 0 and add_bos):
            tokens += tokenize(part, True, add_bos and i == 0)
    return tokens
