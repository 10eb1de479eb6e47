from __future__ import annotations

import pytest

from car_inference.backends.chat_template import (
    StopMatcher,
    TagSplitter,
    chat_messages,
    parse_tool_call_block,
    render_chat,
)
from car_inference.errors import UnsupportedMode
from car_inference.requests import GenerateRequest, ImageBlock, Message, ThinkingMode, ToolCall

QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def test_render_uses_the_model_template_and_thinking_switch() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    off = render_chat(QWEN_LIKE, msgs, thinking=ThinkingMode.OFF)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    auto = render_chat(QWEN_LIKE, msgs, thinking=ThinkingMode.AUTO)
    assert auto.endswith("<|im_start|>assistant\n")
    tools = render_chat(QWEN_LIKE, msgs, tools=[{"type": "function", "function": {"name": "f"}}])
    assert 'TOOLS:[{"type": "function"' in tools


def test_models_without_a_template_get_chatml() -> None:
    text = render_chat(None, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert text == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"


def test_template_errors_surface() -> None:
    with pytest.raises(ValueError, match="nope"):
        render_chat("{{ raise_exception('nope') }}", [])


def test_chat_messages_keep_tool_turns_and_refuse_media() -> None:
    req = GenerateRequest(
        context="sys",
        messages=[
            Message(role="user", content="weather?"),
            Message(
                role="assistant", tool_calls=[ToolCall(id="c1", name="weather", arguments={"city": "Oslo"})]
            ),
            Message(role="tool", tool_call_id="c1", content="rain"),
        ],
    )
    msgs = chat_messages(req, "gguf")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Oslo"}}
    assert msgs[3]["tool_call_id"] == "c1"
    # A template that shows no tool_calls (SmolLM2's): the calls are the turn's text, or they
    # vanished and the tool's result answered nothing.
    shown = chat_messages(req, "gguf", calls_as_text=True)[2]
    assert "tool_calls" not in shown
    assert shown["content"] == '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    with pytest.raises(UnsupportedMode) as info:
        chat_messages(GenerateRequest(prompt="see", images=[ImageBlock(url="http://x/y.png")]), "gguf")
    assert info.value.mode == "image-content-block" and info.value.backend == "gguf"


def _split(pieces: list[str], kinds: set[str]) -> list[tuple[str, str]]:
    splitter = TagSplitter(kinds)
    out: list[tuple[str, str]] = []
    for p in pieces:
        out += splitter.feed(p)
    out += splitter.flush()
    merged: list[tuple[str, str]] = []
    for kind, text in out:
        if merged and merged[-1][0] == kind and kind != "tool_call":
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def test_think_blocks_split_across_any_chunking() -> None:
    text = "<think>plan it</think>The answer is 4."
    expected = [("think", "plan it"), ("text", "The answer is 4.")]
    for size in (1, 2, 3, 5, 100):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert _split(pieces, {"think"}) == expected, size


def test_tool_call_blocks_come_out_whole_and_unclosed_ones_stay_text() -> None:
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    assert _split(pieces, {"think", "tool_call"}) == [
        ("text", "Sure."),
        ("tool_call", '{"name": "f", "arguments": {"a": 1}}'),
    ]
    assert _split(['<tool_call>{"na'], {"tool_call"}) == [("text", '<tool_call>{"na')]
    assert _split(["a < b and <th", "ing>"], {"think"}) == [("text", "a < b and <thing>")]


def test_parse_tool_call_block() -> None:
    assert parse_tool_call_block('{"name": "f", "arguments": {"a": 1}}') == ("f", '{"a": 1}')
    assert parse_tool_call_block('{"name": "f", "arguments": "{}"}') == ("f", "{}")
    assert parse_tool_call_block("not json") is None
    assert parse_tool_call_block('{"arguments": {}}') is None


def test_stop_strings_are_found_across_pieces_and_held_back_until_decided() -> None:
    stops = StopMatcher(["###", "", "END"])
    assert stops.feed("Hello #") == ("Hello ", False)  # "#" may begin "###"
    assert stops.feed("# x") == ("## x", False)  # it did not
    assert stops.feed(" E") == (" ", False)
    assert stops.feed("ND and more") == ("", True)
    assert StopMatcher([]).feed("E") == ("E", False)
    tail = StopMatcher(["END"])
    assert tail.feed("the EN") == ("the ", False) and tail.flush() == "EN"
