"""Test fakes: a loopback HTTP server speaking the OpenAI, Anthropic and Gemini wire formats."""

from .provider_server import (
    DEFAULT_SERVED_MODELS,
    FakeProviderServer,
    Fault,
    RecordedRequest,
    Reply,
    ToolCallSpec,
)

__all__ = [
    "DEFAULT_SERVED_MODELS",
    "FakeProviderServer",
    "Fault",
    "RecordedRequest",
    "Reply",
    "ToolCallSpec",
]
