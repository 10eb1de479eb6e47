"""Resuming a stream that broke mid-way on another model, with the text so far as a prefix.

When a stream breaks after some text reached the client, the next candidate is asked to go on from
that text, so the client sees one answer that completes. How the prefix is given depends on what the
wire protocol takes:

- assistant prefill (Anthropic Messages; a backend says so with ``assistant_prefill = True``): the
  conversation ends with an assistant turn holding the text so far, and the model continues it;
- otherwise (OpenAI-compatible hosts, the local models): that assistant turn, then a user turn
  asking to continue it exactly where it stopped;
- a raw prompt (text completion, no chat template): the prompt followed by the text so far.

A stream that broke inside a tool call, or in a JSON answer (JSON mode makes a model begin a new
object), is never resumed: what went out cannot be finished by another model, so it ends with an
error instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ..requests import GenerateRequest, Message, TextBlock
from ..stream import StreamEvent, TextDelta, ToolCallDelta, ToolCallStart

__all__ = ["CONTINUE_INSTRUCTION", "Sent", "continuation", "join_text", "joined"]

CONTINUE_INSTRUCTION = (
    "Your previous reply was cut off. Continue it from exactly where it stopped, without repeating "
    "anything and without any preamble."
)


@dataclass
class Sent:
    """What the client has been sent so far, across the models that took part, and when."""

    text: list[str] = field(default_factory=list)
    tool_call: bool = False  # a tool call began: the stream cannot be resumed elsewhere
    any: bool = False  # any content event at all (text, thinking, tool call)
    start: float = field(default_factory=time.perf_counter)  # when the stream was asked for
    ttft_ms: float | None = None  # when the first content event went out, after ``start``

    def push(self, event: StreamEvent) -> None:
        if not self.any:
            self.any = True
            self.ttft_ms = round((time.perf_counter() - self.start) * 1000, 3)
        if isinstance(event, TextDelta):
            self.text.append(event.text)
        elif isinstance(event, ToolCallStart | ToolCallDelta):
            self.tool_call = True

    @property
    def prefix(self) -> str:
        return "".join(self.text)

    def unfinishable(self, request: GenerateRequest) -> str | None:
        """What went out that no other model can finish, if anything: half a tool call's
        arguments, or part of a JSON answer (JSON mode makes the next model start a new object)."""
        if self.tool_call:
            return "a tool call"
        fmt = request.response_format
        if self.text and fmt is not None and fmt.type != "text":
            return "a JSON answer"
        return None


def continuation(request: GenerateRequest, prefix: str, *, prefill: bool) -> GenerateRequest:
    """``request`` asking the next model to continue ``prefix`` (see the module docstring)."""
    if not prefix:
        return request
    if request.params.raw_prompt:
        return request.model_copy(update={"prompt": request.prompt + prefix})
    turns = list(request.messages or [])
    if request.prompt or request.images:
        blocks: list[Any] = [*(request.images or [])]
        if request.prompt:
            blocks.insert(0, TextBlock(text=request.prompt))
        turns.append(Message(role="user", content=blocks if request.images else request.prompt))
    if prefill:
        # Anthropic refuses a final assistant turn that ends in white space; the model writes it.
        turns.append(Message(role="assistant", content=prefix.rstrip()))
    else:
        turns.append(Message(role="assistant", content=prefix))
        turns.append(Message(role="user", content=CONTINUE_INSTRUCTION))
    return request.model_copy(update={"messages": turns, "prompt": "", "images": None})


def join_text(prefix: str, text: str) -> str:
    """The whole answer: ``prefix`` then the continuation, without the white space twice."""
    return prefix + (text.lstrip() if prefix != prefix.rstrip() else text)


async def joined(events: AsyncGenerator[StreamEvent, None], prefix: str) -> AsyncGenerator[StreamEvent, None]:
    """The continuation's events, its first text trimmed of the white space that ``prefix``
    already ended with (prefill sends the prefix stripped, and the model writes that space again)."""
    trim = prefix != prefix.rstrip()
    async with contextlib.aclosing(events):  # closing this closes the model's stream at once
        async for event in events:
            if trim and isinstance(event, TextDelta):
                text = event.text.lstrip()
                if not text:
                    continue
                trim = False
                event = TextDelta(text=text)  # noqa: PLW2901 - the trimmed delta replaces it
            yield event
