"""The official SDKs pointed at the fake provider server, retries off: what the fake's own tests
drive it with."""

from __future__ import annotations

import anthropic
import openai
import pydantic
from anthropic.types import MessageParam
from google import genai
from google.genai import types as genai_types
from openai.types.chat import ChatCompletionMessageParam

from .provider_server import FakeProviderServer

__all__ = ["ANT_USER", "USER", "Answer", "ant", "gem", "oai"]


class Answer(pydantic.BaseModel):
    """A JSON-mode schema: the fake fills it from the prompt."""

    answer: str
    confidence: float
    tags: list[str]


# The same user turn, typed for each SDK's ``messages`` parameter.
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
ANT_USER: list[MessageParam] = [{"role": "user", "content": "hello there"}]


def oai(fake: FakeProviderServer, key: str = "sk-test", timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_base_url, api_key=key, max_retries=0, timeout=timeout)


def ant(fake: FakeProviderServer, key: str = "sk-ant-test", timeout: float = 10.0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.anthropic_base_url, api_key=key, max_retries=0, timeout=timeout)


def gem(fake: FakeProviderServer, key: str = "g-test", timeout_ms: int = 10_000) -> genai.Client:
    # Keep a reference to the returned Client: when it is garbage-collected it closes its HTTP client, and a
    # call made through a temporary (`genai.Client(...).models.generate_content(...)`) fails with
    # "Cannot send a request, as the client has been closed".
    options = genai_types.HttpOptions(
        base_url=fake.gemini_base_url,
        timeout=timeout_ms,  # milliseconds
        retry_options=genai_types.HttpRetryOptions(attempts=1),  # explicit: no retries
    )
    return genai.Client(api_key=key, http_options=options)
