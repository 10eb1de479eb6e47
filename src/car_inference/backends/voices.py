"""What a text-to-speech model can speak with: its voices, for ``car speak --list-voices``,
``GET /v1/audio/voices`` and ``engine.list_voices``.

A backend that can say implements ``VoiceLister.voices``. The list is the names ``voice`` takes;
``aliases`` are the ``[speech] voices`` entries of config.toml that name one of them (how an
OpenAI client's "alloy" reaches a local voice: only when configured, never by guessing).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from ..schema import ModelSchema

__all__ = ["Voice", "VoiceList", "VoiceLister", "aliases_for"]


class Voice(BaseModel):
    id: str = Field(description="what `voice` takes")
    name: str | None = Field(default=None, description="a display name, where it differs from the id")


class VoiceList(BaseModel):
    model: str
    voices: list[Voice]
    default: str | None = Field(default=None, description="the voice used when a request names none")
    aliases: dict[str, str] = Field(
        default_factory=dict, description="other names ([speech] voices) mapped to one of these voices"
    )
    note: str | None = Field(default=None, description="other voices the model accepts beyond the list")

    def ids(self) -> list[str]:
        return [v.id for v in self.voices]


@runtime_checkable
class VoiceLister(Protocol):
    async def voices(self, model: ModelSchema) -> VoiceList: ...


def aliases_for(mapping: dict[str, str], ids: list[str]) -> dict[str, str]:
    """The ``[speech] voices`` entries whose target is one of ``ids``."""
    known = set(ids)
    return {alias: target for alias, target in sorted(mapping.items()) if target in known}
