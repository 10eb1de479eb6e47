"""control_text: a client's control-token text is replaced by sentinels and read back as text."""

from __future__ import annotations

import re
from typing import Any

import pytest

from car_inference.backends.control_text import neutralize, tokenize_around
from car_inference.errors import InvalidInput

PATTERN = re.compile(r"<\|im_end\|>|<\|im_start\|>")


def fake_tokenize(text: str, special: bool, add_bos: bool) -> list[int]:
    """One 'token' per character, control tokens as one (1000) when special: enough to see which
    parts were read with special on."""
    out = [1] if add_bos else []
    for piece in re.split(f"({PATTERN.pattern})", text):
        if piece and special and PATTERN.fullmatch(piece):
            out.append(1000)
        else:
            out += [ord(c) for c in piece]
    return out


def test_only_client_strings_change_and_roles_stay() -> None:
    found: list[str] = []
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hi <|im_end|> there"},
        {"role": "assistant", "tool_calls": [{"function": {"arguments": '{"a": "<|im_start|>"}'}}]},
    ]
    out = neutralize(messages, PATTERN, found)
    assert found == ["<|im_end|>", "<|im_start|>"]
    assert out[0]["role"] == "user" and "<|im_end|>" not in out[0]["content"]
    assert "<|im_start|>" not in out[1]["tool_calls"][0]["function"]["arguments"]
    assert messages[0]["content"] == "hi <|im_end|> there", "the request's own data is not changed"
    assert neutralize({"role": "<|im_end|>"}, PATTERN, []) == {"role": "<|im_end|>"}


def test_the_templates_control_tokens_stay_control_and_the_clients_are_text() -> None:
    found: list[str] = []
    content = neutralize("a<|im_end|>b", PATTERN, found)
    rendered = f"<|im_start|>user\n{content}<|im_end|>\n"
    tokens = tokenize_around(rendered, found, fake_tokenize, add_bos=True)
    plain = [ord(c) for c in "<|im_end|>"]
    assert tokens == [1, 1000, *map(ord, "user\na"), *plain, ord("b"), 1000, ord("\n")]


def test_a_template_that_loses_a_sentinel_refuses_the_request() -> None:
    found: list[str] = []
    neutralize("<|im_end|>", PATTERN, found)
    with pytest.raises(InvalidInput, match="control tokens as text"):
        tokenize_around("the template dropped it", found, fake_tokenize, add_bos=False)


def test_the_sentinel_characters_a_client_writes_stay_its_text() -> None:
    """U+F0000 99 U+F0001 in a message that also held "<|im_end|>" was read as sentinel 99 and the
    request refused, blaming the chat template."""
    own = "a <|im_end|> b \U000f000099\U000f0001 c"
    found: list[str] = []
    content = neutralize(own, PATTERN, found)
    tokens = tokenize_around(f"<|im_start|>user\n{content}<|im_end|>", found, fake_tokenize, add_bos=False)
    assert tokens == [1000, *map(ord, "user\n" + own), 1000]  # every character of it as text
    alone: list[str] = []
    assert neutralize("x \U000f0001", PATTERN, alone) != "x \U000f0001" and alone == ["\U000f0001"]
