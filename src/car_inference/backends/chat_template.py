"""Chat templates and output parsing for local models.

The prompt is built from the model's own Jinja template (the ``tokenizer.chat_template`` GGUF
metadata), rendered the way Hugging Face ``transformers`` renders it, so special tokens, system
prompts, tools and Qwen3's ``enable_thinking`` behave as the model was trained. Models without a
template get ChatML. ``TagSplitter`` separates ``<think>`` and ``<tool_call>`` blocks out of a
token stream without holding back more than a tag's length of text.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

from ..errors import UnsupportedMode
from ..requests import GenerateRequest, Message, ThinkingMode

__all__ = ["StopMatcher", "TagSplitter", "chat_messages", "render_chat"]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise ValueError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict[str, Any]] | None = None,
    thinking: ThinkingMode = ThinkingMode.AUTO,
) -> str:
    kwargs: dict[str, Any] = {
        "messages": messages,
        "add_generation_prompt": True,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    if tools:
        kwargs["tools"] = tools
    if thinking is not ThinkingMode.AUTO:
        kwargs["enable_thinking"] = thinking is ThinkingMode.ON
    return _compile(template or CHATML).render(**kwargs)


def chat_messages(
    request: GenerateRequest, backend: str, *, calls_as_text: bool = False
) -> list[dict[str, Any]]:
    """The request as template messages (plain dicts). Media blocks are refused: text models
    cannot see them, and silently dropping an image would answer a different question.
    ``calls_as_text``: the template shows no ``tool_calls``, so an assistant turn's calls are
    written into its content as ``<tool_call>`` blocks (they vanished, and the tool results that
    follow answered nothing)."""
    out: list[dict[str, Any]] = []
    for message in request.chat_messages():
        if message.media():
            kinds = sorted({b.type for b in message.media()})
            raise UnsupportedMode(
                f"{'/'.join(kinds)}-content-block",
                backend,
                "this local model reads text only; route media to a vision model",
            )
        item = _message_dict(message)
        if calls_as_text and item.pop("tool_calls", None):
            blocks = [
                "<tool_call>" + json.dumps({"name": c.name, "arguments": c.arguments}) + "</tool_call>"
                for c in message.tool_calls
            ]
            item["content"] = "\n".join([item["content"], *blocks] if item["content"] else blocks)
        out.append(item)
    return out


def _message_dict(message: Message) -> dict[str, Any]:
    item: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        item["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        item["tool_call_id"] = message.tool_call_id
    if message.name:
        item["name"] = message.name
    return item


class TagSplitter:
    """Splits streamed text into ("text" | "think" | "tool_call", piece) segments.

    ``<think>...</think>`` content streams out as it comes; a ``<tool_call>...</tool_call>`` block
    is emitted whole when it closes (its JSON is only useful complete). Text that might be the
    start of a tag is held back until the next piece decides it.
    """

    TAGS: ClassVar[dict[str, tuple[str, str]]] = {
        "<think>": ("</think>", "think"),
        "<tool_call>": ("</tool_call>", "tool_call"),
    }

    def __init__(self, enabled: set[str]) -> None:
        self._open = {tag: v for tag, v in self.TAGS.items() if v[1] in enabled}
        self._buffer = ""
        self._inside: tuple[str, str] | None = None  # (close tag, kind)
        self._block: list[str] = []

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self._buffer += piece
        out: list[tuple[str, str]] = []
        while self._buffer:
            if self._inside is None:
                hit = self._find_open()
                if hit is None:
                    keep = self._partial_suffix(list(self._open))
                    emit, self._buffer = (
                        self._buffer[: len(self._buffer) - keep],
                        self._buffer[len(self._buffer) - keep :],
                    )
                    if emit:
                        out.append(("text", emit))
                    break
                pos, tag = hit
                if pos:
                    out.append(("text", self._buffer[:pos]))
                self._buffer = self._buffer[pos + len(tag) :]
                self._inside = self._open[tag]
            else:
                close, kind = self._inside
                pos = self._buffer.find(close)
                if pos < 0:
                    keep = self._partial_suffix([close])
                    emit, self._buffer = (
                        self._buffer[: len(self._buffer) - keep],
                        self._buffer[len(self._buffer) - keep :],
                    )
                    self._emit_inside(kind, emit, out)
                    break
                self._emit_inside(kind, self._buffer[:pos], out)
                self._buffer = self._buffer[pos + len(close) :]
                if kind == "tool_call":
                    out.append(("tool_call", "".join(self._block)))
                    self._block = []
                self._inside = None
        return out

    def flush(self) -> list[tuple[str, str]]:
        """End of stream: what is left. An unclosed tool call is returned as text."""
        rest, self._buffer = self._buffer, ""
        if self._inside is None:
            return [("text", rest)] if rest else []
        kind = self._inside[1]
        self._inside = None
        if kind == "tool_call":
            block = "".join(self._block) + rest
            self._block = []
            return [("text", "<tool_call>" + block)] if block else []
        return [(kind, rest)] if rest else []

    def _emit_inside(self, kind: str, text: str, out: list[tuple[str, str]]) -> None:
        if not text:
            return
        if kind == "tool_call":
            self._block.append(text)
        else:
            out.append((kind, text))

    def _find_open(self) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for tag in self._open:
            pos = self._buffer.find(tag)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, tag)
        return best

    def _partial_suffix(self, tags: list[str]) -> int:
        """Length of the longest buffer suffix that is a proper prefix of one of ``tags``."""
        longest = 0
        for tag in tags:
            for n in range(min(len(tag) - 1, len(self._buffer)), 0, -1):
                if self._buffer.endswith(tag[:n]):
                    longest = max(longest, n)
                    break
        return longest


def parse_tool_call_block(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON) from a Hermes/Qwen ``<tool_call>`` body, or None if it has no name."""
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    return data["name"], args if isinstance(args, str) else json.dumps(args)


class StopMatcher:
    """Finds stop strings across token boundaries, holding back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            pos = min(h[0] for h in hits)
            out, self.pending = self.pending[:pos], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
