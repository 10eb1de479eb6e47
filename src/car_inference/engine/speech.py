"""Which model listens or speaks when a request names none: the speech policy (``[speech]``).

The order, as in the seed: a model the request names; else the ``[preferred]`` model for the
capability (the user pinned it); else the available model that ranks first on

1. its side: local first under ``prefer_local`` (the default), hosted first otherwise;
2. the side's preferred model (``preferred_local_stt`` / ``preferred_remote_stt`` and the ``_tts``
   pair): each applies only to models of its own side;
3. the ``[defaults]`` model for the capability;
4. the quality prior, then the id (a stable choice).

``allow_remote_fallback = false`` with ``prefer_local`` keeps hosted models out entirely: with no
local model available the choice is the configured default, whose run then says what is missing
(``car pull``). With no available model at all, the same. A preferred name that is not in the
catalog is an error naming it, not a silent skip: a typo in config.toml must not go unnoticed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from ..schema import ModelCapability, ModelSchema

if TYPE_CHECKING:
    from ..config import CarConfig
    from ..registry import UnifiedRegistry

__all__ = ["SPEECH_CAPABILITIES", "speech_model"]

log = logging.getLogger(__name__)

# The [speech] settings naming each direction's preferred (local, hosted) model.
SPEECH_CAPABILITIES: dict[ModelCapability, tuple[str, str]] = {
    ModelCapability.SPEECH_TO_TEXT: ("preferred_local_stt", "preferred_remote_stt"),
    ModelCapability.TEXT_TO_SPEECH: ("preferred_local_tts", "preferred_remote_tts"),
}


class _Engine(Protocol):
    registry: UnifiedRegistry
    config: CarConfig

    def resolve(self, name: str) -> ModelSchema: ...
    def _model_for(self, name: str | None, capability: ModelCapability) -> ModelSchema: ...


def speech_model(engine: _Engine, name: str | None, capability: ModelCapability) -> ModelSchema:
    """The model a transcribe/synthesize request runs on (see the module docstring)."""
    if name:
        return engine.resolve(name)
    pinned = engine.config.preferred.for_capability(capability)
    if pinned:
        return engine.resolve(pinned)
    policy = engine.config.speech
    local_name, remote_name = (getattr(policy, field) for field in SPEECH_CAPABILITIES[capability])
    wanted_local = engine.resolve(local_name).id if local_name else None
    wanted_remote = engine.resolve(remote_name).id if remote_name else None
    default = engine.config.defaults.for_capability(capability)
    default_model = engine.registry.find(default) if default else None
    default_id = default_model.id if default_model is not None else None
    candidates = engine.registry.query(capabilities=[capability], available_only=True)
    if policy.prefer_local and not policy.allow_remote_fallback:
        candidates = [m for m in candidates if m.is_local]
    if not candidates:
        return engine._model_for(None, capability)  # the default (its run says what is missing), or raises

    def rank(m: ModelSchema) -> tuple[bool, bool, bool, float, str]:
        wanted = wanted_local if m.is_local else wanted_remote
        return (
            m.is_local != policy.prefer_local,
            m.id != wanted,
            m.id != default_id,
            -(m.quality or 0),
            m.id,
        )

    chosen = min(candidates, key=rank)
    if chosen.is_remote and policy.prefer_local:
        log.info("no local %s model is available: %s (hosted) runs instead", capability, chosen.id)
    return chosen
