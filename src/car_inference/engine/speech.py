"""Which model listens or speaks when a request names none: the speech policy (``[speech]``).

The order, as in the seed: a model the request names; else the ``[preferred]`` model for the
capability (the user pinned it); else the available model that ranks first on

1. its side: local first under ``prefer_local`` (the default), hosted first otherwise;
2. the side's preferred model (``preferred_local_stt`` / ``preferred_remote_stt`` and the ``_tts``
   pair): each names a model of its own side (a hosted one under ``preferred_local_tts`` is an error);
3. the ``[defaults]`` model for the capability;
4. the quality prior, then the id (a stable choice).

``allow_remote_fallback = false`` with ``prefer_local`` keeps hosted models out entirely: with no
local model available the choice is the configured default, whose run then says what is missing
(``car pull``). With no available model at all, the same. A preferred name that is not in the
catalog is an error naming it, not a silent skip: a typo in config.toml must not go unnoticed.

A hosted model the policy chose whose spend limit would refuse the request gives way to the local
side's first model (``within_spend``); one the request names or ``[preferred]`` pins never does.

``speech_health`` (the ``speech`` part of ``car health`` / ``/v1/health``) says, per direction, the
preferred models, each side's first model and what a request naming no model runs now.

``speech_smoke`` (``car speech smoke``) speaks a sentence and hears it back on each side's first
models, reporting the word error rate and how long each half took.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, Field

from ..backends.piper import unmatched_voice_aliases
from ..backends.voices import VoiceList
from ..errors import ConfigError, InferenceError, InvalidInput, ModelUnavailable
from ..requests import SynthesizeRequest, SynthesizeResult, TranscribeRequest, TranscribeResult
from ..schema import ModelCapability, ModelSchema

if TYPE_CHECKING:
    from ..config import CarConfig
    from ..registry import UnifiedRegistry
    from ..routing import SpendControl

__all__ = [
    "SMOKE_TEXT",
    "SPEECH_CAPABILITIES",
    "SpeechHealthReport",
    "SpeechModelHealth",
    "SpeechSmokePath",
    "SpeechSmokeReport",
    "audio_seconds",
    "charged",
    "list_voices",
    "side_model",
    "speech_health",
    "speech_model",
    "speech_smoke",
    "synthesis_cost",
    "transcription_cost",
    "within_spend",
    "word_error_rate",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

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


class _SpendEngine(_Engine, Protocol):
    spend: SpendControl


class _VoiceEngine(_Engine, Protocol):
    def _task_method(
        self, model: ModelSchema, capability: ModelCapability, method: str
    ) -> Callable[..., Any]: ...


class _SmokeEngine(_Engine, Protocol):
    async def synthesize(self, request: SynthesizeRequest) -> SynthesizeResult: ...
    async def transcribe(self, request: TranscribeRequest) -> TranscribeResult: ...


def speech_model(engine: _Engine, name: str | None, capability: ModelCapability) -> ModelSchema:
    """The model a transcribe/synthesize request runs on (see the module docstring)."""
    if name:
        return engine.resolve(name)
    pinned = engine.config.preferred.for_capability(capability)
    if pinned:
        return engine.resolve(pinned)
    policy = engine.config.speech
    first = side_model(engine, capability, local=policy.prefer_local)
    if first is not None:
        return first
    if policy.prefer_local and not policy.allow_remote_fallback:
        return engine._model_for(None, capability)  # the default: its run says what is missing
    other = side_model(engine, capability, local=not policy.prefer_local)
    if other is None:
        return engine._model_for(None, capability)  # the default, or raises: none is configured
    if other.is_remote:
        log.info("no local %s model is available: %s (hosted) runs instead", capability, other.id)
    return other


def within_spend(
    engine: _SpendEngine,
    name: str | None,
    capability: ModelCapability,
    model: ModelSchema,
    cost: float | None,
) -> ModelSchema:
    """``model``, unless the policy chose it (no model named or pinned), it is hosted, its spend
    limit refuses this request's estimate and a local model can run it instead: a request naming
    no model was refused while a free model could answer it (routing leaves such models out)."""
    if name or engine.config.preferred.for_capability(capability) or model.is_local:
        return model
    if engine.spend.breach(model.provider, cost or 0.0) is None:
        return model
    local = side_model(engine, capability, local=True)
    if local is None:
        return model  # its run says which limit
    log.info("%s would pass a spend limit: %s (local) runs instead", model.id, local.id)
    return local


async def list_voices(engine: _VoiceEngine, name: str | None = None) -> VoiceList:
    """The voices ``voice`` takes on model ``name``, else on the model the speech policy picks for
    text to speech; ``aliases`` are the ``[speech] voices`` names that reach one of them."""
    model = speech_model(engine, name, ModelCapability.TEXT_TO_SPEECH)
    voices = engine._task_method(model, ModelCapability.TEXT_TO_SPEECH, "voices")
    result: VoiceList = await voices(model)
    return result


def side_model(engine: _Engine, capability: ModelCapability, local: bool) -> ModelSchema | None:
    """The available model of one side (local or hosted) ranked first: the side's preferred
    model, the ``[defaults]`` model, then the quality prior and the id. None when there is none."""
    setting = SPEECH_CAPABILITIES[capability][0 if local else 1]
    preferred = getattr(engine.config.speech, setting)
    named = engine.resolve(preferred) if preferred else None
    wanted = named.id if named is not None else None
    if named is not None and named.is_local != local:  # it was silently passed over
        other = SPEECH_CAPABILITIES[capability][1 if local else 0]
        raise ConfigError(
            f"[speech] {setting} = {preferred!r} is a {'hosted' if local else 'local'} model; "
            f"{setting} names a {'local' if local else 'hosted'} one ({other} takes this one)"
        )
    if named is not None and not named.has_capability(capability):  # passed over just as silently
        does = ", ".join(c for c in SPEECH_CAPABILITIES if named.has_capability(c)) or "no speech"
        raise ConfigError(f"[speech] {setting} = {preferred!r} cannot do {capability} (it does {does})")
    default = engine.config.defaults.for_capability(capability)
    default_model = engine.registry.find(default) if default else None
    default_id = default_model.id if default_model is not None else None
    candidates = engine.registry.query(capabilities=[capability], available_only=True)
    on_side = [m for m in candidates if m.is_local == local]
    if not on_side:
        return None
    return min(on_side, key=lambda m: (m.id != wanted, m.id != default_id, -(m.quality or 0), m.id))


# --- health: what the policy picks now ---------------------------------------------------------


class SpeechModelHealth(BaseModel):
    id: str
    name: str
    provider: str
    capability: ModelCapability
    is_local: bool
    available: bool
    selected_by_default: bool = Field(
        default=False, description="its side's first model for this direction (see speech_health)"
    )


class SpeechHealthReport(BaseModel):
    """The seed's speech health: models per side, the policy, each direction's preferred and
    first models, plus what a request naming no model runs now (``stt_model`` / ``tts_model``)."""

    local_models: list[SpeechModelHealth]
    remote_models: list[SpeechModelHealth]
    elevenlabs_configured: bool
    prefer_local: bool
    allow_remote_fallback: bool
    preferred_local_stt: str | None = None
    preferred_local_tts: str | None = None
    preferred_remote_stt: str | None = None
    preferred_remote_tts: str | None = None
    local_stt_default: str | None = Field(default=None, description="the first available local model")
    local_tts_default: str | None = None
    remote_stt_default: str | None = Field(default=None, description="the first available hosted model")
    remote_tts_default: str | None = None
    stt_model: str | None = Field(default=None, description="what `car transcribe` without -m runs now")
    tts_model: str | None = Field(default=None, description="what `car speak` without -m runs now")
    stt_available: bool = False
    tts_available: bool = False
    voices: dict[str, str] = Field(default_factory=dict, description="[speech] voices: other names mapped")
    problems: list[str] = Field(default_factory=list, description="why a direction has no runnable model")


def speech_health(engine: _Engine) -> SpeechHealthReport:
    """The speech part of the health report: never raises; a misconfiguration (a preferred model
    not in the catalog) or a direction nothing can run is listed in ``problems``."""
    policy = engine.config.speech
    fields: dict[str, object] = {}
    problems: list[str] = []
    for capability, short in (
        (ModelCapability.SPEECH_TO_TEXT, "stt"),
        (ModelCapability.TEXT_TO_SPEECH, "tts"),
    ):
        for side, local in (("local", True), ("remote", False)):
            try:
                first = side_model(engine, capability, local)
            except InferenceError as exc:
                problems.append(f"{capability} ({side}): {exc}")
                first = None
            fields[f"{side}_{short}_default"] = first.id if first else None
        try:
            model: ModelSchema | None = speech_model(engine, None, capability)
        except InferenceError as exc:
            model = None
            problems.append(f"{capability}: {exc}")
        fields[f"{short}_model"] = model.id if model else None
        fields[f"{short}_available"] = bool(model and model.available)
        if model is not None and not model.available:
            why = engine.registry.unavailable_reason(model)
            problems.append(
                f"{capability}: {model.id} is the model it would use, but it cannot run here ({why})"
            )
    problems.extend(unmatched_voice_aliases(policy.voices, engine.registry.list()))
    defaults = {v for k, v in fields.items() if k.endswith("_default") and v}
    rows = [
        SpeechModelHealth(
            id=m.id,
            name=m.name,
            provider=m.provider,
            capability=cap,
            is_local=m.is_local,
            available=m.available,
            selected_by_default=m.id in defaults,
        )
        for m in engine.registry.list()
        for cap in SPEECH_CAPABILITIES
        if m.has_capability(cap)
    ]
    return SpeechHealthReport(
        local_models=[r for r in rows if r.is_local],
        remote_models=[r for r in rows if not r.is_local],
        elevenlabs_configured=any(r.available for r in rows if r.provider == "elevenlabs"),
        prefer_local=policy.prefer_local,
        allow_remote_fallback=policy.allow_remote_fallback,
        preferred_local_stt=policy.preferred_local_stt,
        preferred_local_tts=policy.preferred_local_tts,
        preferred_remote_stt=policy.preferred_remote_stt,
        preferred_remote_tts=policy.preferred_remote_tts,
        voices=dict(policy.voices),
        problems=problems,
        **fields,  # type: ignore[arg-type]
    )


# --- what hosted speech costs -------------------------------------------------------------------


AUDIO_SUFFIXES = {"wav": "wav", "mp3": "mp3", "flac": "flac", "pcm": "pcm", "raw": "pcm"}


def with_output_format(request: SynthesizeRequest) -> SynthesizeRequest:
    """The format an ``output_path`` names by its suffix, when the request left ``format`` out
    (``hello.mp3`` is an mp3, not WAV data under that name); a suffix that names another audio
    format than a ``format`` given is ``InvalidInput``. Other suffixes keep the format."""
    if not request.output_path:
        return request
    named = AUDIO_SUFFIXES.get(Path(request.output_path).suffix.lower().lstrip("."))
    if named is None or named == request.format:
        return request
    if "format" in request.model_fields_set:
        raise InvalidInput(
            f"output_path {request.output_path!r} names a .{named} file but format is {request.format!r}"
        )
    return request.model_copy(update={"format": named})


def synthesis_cost(model: ModelSchema, text: str) -> float:
    """The catalog's price for speaking ``text`` (0 for a model without one, e.g. a local one)."""
    return (model.cost.per_1k_characters or 0.0) * len(text) / 1000


def transcription_cost(model: ModelSchema, audio_path: str) -> float | None:
    """The catalog's price for hearing the file: per minute of its audio; None when the length
    cannot be read (neither a WAV nor, without PyAV, anything else)."""
    rate = model.cost.per_minute
    if not rate:
        return 0.0
    seconds = audio_seconds(Path(audio_path).expanduser())
    return None if seconds is None else rate * seconds / 60


async def charged(
    spend: SpendControl, model: ModelSchema, cost: float | None, run: Callable[[], Awaitable[T]]
) -> T:
    """Run priced speech under the spend limits: checked first with the estimate, then recorded."""
    if cost == 0.0:
        return await run()
    if cost is None:
        log.warning("%s: the audio's length is unknown, so its cost is not counted", model.id)
    reservation = spend.reserve(model.provider, cost or 0.0)  # held until recorded, as generation
    try:
        result = await run()
    except BaseException:
        spend.release(reservation)
        raise
    if cost:
        spend.record(model.provider, model.id, cost, reservation=reservation)
    else:
        spend.release(reservation)
    return result


def audio_seconds(path: Path) -> float | None:
    """The length of an audio file: WAV by its header, anything else through PyAV when installed."""
    seconds = _wav_seconds(path)
    if seconds is not None:
        return seconds
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(path)) as container:
            return container.duration / 1_000_000 if container.duration else None
    except (av.error.FFmpegError, OSError, ValueError, EOFError):  # a cut .ogg is an av EOFError
        return None


# --- the smoke test: speak a sentence, hear it back ---------------------------------------------

SMOKE_TEXT = "The quick brown fox jumps over the lazy dog."  # every letter: a fair first check


class SpeechSmokePath(BaseModel):
    """One round trip: what was said, what was heard, how far apart, how long each half took."""

    side: str = Field(description="local or remote")
    tts_model: str
    stt_model: str
    audio_path: str | None = Field(default=None, description="the spoken audio, when kept")
    text: str
    transcript: str
    word_error_rate: float = Field(description="word edits to get the text from the transcript / words")
    audio_s: float | None = Field(default=None, description="length of the speech (wav only)")
    synthesize_ms: float
    transcribe_ms: float


class SpeechSmokeReport(BaseModel):
    paths: list[SpeechSmokePath] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)


def word_error_rate(reference: str, heard: str) -> float:
    """Word-level edit distance over the reference's word count, case and punctuation ignored."""
    ref, hyp = _words(reference), _words(heard)
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / len(ref)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


async def speech_smoke(
    engine: _SmokeEngine,
    *,
    local: bool = True,
    remote: bool = False,
    text: str | None = None,
    keep_audio: bool = False,
) -> SpeechSmokeReport:
    """Synthesize ``text`` and transcribe it back on each side asked for. A side with no available
    model for either direction is ``ModelUnavailable`` naming what is missing. The audio is
    deleted afterwards unless ``keep_audio`` (then ``audio_path`` says where it is)."""
    report = SpeechSmokeReport()
    for side, wanted in (("local", local), ("remote", remote)):
        if not wanted:
            report.skipped.append(side)
            continue
        tts = side_model(engine, ModelCapability.TEXT_TO_SPEECH, side == "local")
        stt = side_model(engine, ModelCapability.SPEECH_TO_TEXT, side == "local")
        for model, capability in (
            (tts, ModelCapability.TEXT_TO_SPEECH),
            (stt, ModelCapability.SPEECH_TO_TEXT),
        ):
            if model is None:
                why = engine.registry.why_none(capability, local=side == "local")
                raise ModelUnavailable.none_for(f"{side} {capability}", why)
        assert tts is not None and stt is not None
        folder = Path(tempfile.mkdtemp(prefix="car-smoke-"))
        try:
            path = await _round_trip(engine, side, tts, stt, text or SMOKE_TEXT, folder / f"{side}.wav")
        finally:
            if not keep_audio:
                shutil.rmtree(folder, ignore_errors=True)
        report.paths.append(path if keep_audio else path.model_copy(update={"audio_path": None}))
    return report


async def _round_trip(
    engine: _SmokeEngine, side: str, tts: ModelSchema, stt: ModelSchema, text: str, target: Path
) -> SpeechSmokePath:
    start = time.perf_counter()
    spoken = await engine.synthesize(
        SynthesizeRequest(text=text, model=tts.id, language="en", output_path=str(target))
    )
    middle = time.perf_counter()
    heard = await engine.transcribe(
        TranscribeRequest(audio_path=spoken.audio_path, model=stt.id, language="en")
    )
    end = time.perf_counter()
    return SpeechSmokePath(
        side=side,
        tts_model=spoken.model_used or tts.id,
        stt_model=heard.model_used or stt.id,
        audio_path=spoken.audio_path,
        text=text,
        transcript=heard.text,
        word_error_rate=word_error_rate(text, heard.text),
        audio_s=audio_seconds(Path(spoken.audio_path)),
        synthesize_ms=(middle - start) * 1000,
        transcribe_ms=(end - middle) * 1000,
    )


def _wav_seconds(path: Path) -> float | None:
    """A WAV's length from its header, its frame count capped by the bytes the file holds: a WAV
    written to a pipe says 0xFFFFFFFF (27 hours, priced as such); None for a rate of 0."""
    try:
        with wave.open(str(path), "rb") as audio:
            rate, frame_bytes = audio.getframerate(), audio.getsampwidth() * audio.getnchannels()
            if rate <= 0 or frame_bytes <= 0:
                return None
            return min(audio.getnframes(), path.stat().st_size // frame_bytes) / rate
    except (OSError, EOFError, wave.Error, RuntimeError):  # RuntimeError: a chunk past the file's end
        return None
