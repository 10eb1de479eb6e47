"""Hosted speech on the OpenAI wire format, through the official SDK.

Mixed into the OpenAI-compatible backend, so every model of an ``openai`` source with the
``speech_to_text`` or ``text_to_speech`` capability runs here, on OpenAI or any host that speaks
the same endpoints. Keys rotate and errors translate as for chat (``with_keys``).

- Transcription: ``audio.transcriptions.create`` with the file as a multipart upload; ``language``
  and ``prompt`` go out as given. ``timestamps`` asks for ``verbose_json`` with word granularity
  (a model that cannot give it answers 400, reported as the provider's error); otherwise ``json``.
- Speech: ``audio.speech.create`` read as a stream (``with_streaming_response``), written chunk by
  chunk to a temporary name and renamed when complete, so a cut stream leaves no half file.
  ``voice`` defaults to ``alloy``; a name that is neither a built-in voice nor a custom voice id
  (``voice_...``) is ``InvalidInput`` listing the voices. ``speed`` must be in OpenAI's 0.25-4;
  ``voice_instruction`` goes out as ``instructions``. Voice cloning from a reference recording
  is not part of this API: an error when strict, otherwise left out with a warning (as Piper does).
  The voices speak the language of the text, so ``language`` needs no field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidInput, ProviderError
from ..requests import (
    SynthesizeRequest,
    SynthesizeResult,
    TranscribedSegment,
    TranscribedWord,
    TranscribeRequest,
    TranscribeResult,
)
from ..schema import ModelSchema
from .base import SegmentCallback
from .media_files import atomic_file, output_path, read_upload, readable_file
from .voices import Voice, VoiceList

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .remote import Endpoint

__all__ = ["AUDIO_MEDIA_TYPES", "OPENAI_VOICES", "OpenAISpeechMixin", "stream_to"]

log = logging.getLogger(__name__)

# The Speech API's built-in voices (openai SDK 3.57, ``speech_create_params.Voice``).
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
    "marin", "cedar",
)  # fmt: skip
DEFAULT_VOICE = "alloy"
AUDIO_MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "flac": "audio/flac"}
_SPEED_RANGE = (0.25, 4.0)


class OpenAISpeechMixin:
    """``transcribe`` and ``synthesize`` for ``RemoteBackend`` subclasses built on the ``openai``
    SDK (their ``make_client`` returns an ``openai.AsyncOpenAI``)."""

    if TYPE_CHECKING:  # provided by RemoteBackend
        kind: ClassVar[str]

        def with_keys(self, model: ModelSchema, call: Callable[[Any, Endpoint], Awaitable[Any]]) -> Any: ...

    async def voices(self, model: ModelSchema) -> VoiceList:
        """The Speech API's built-in voices (no call: the API has no list of them)."""
        return VoiceList(
            model=model.id,
            voices=[Voice(id=v) for v in OPENAI_VOICES],
            default=DEFAULT_VOICE,
            note="also a custom voice id of the account (voice_...)",
        )

    async def transcribe(
        self, model: ModelSchema, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        """The whole transcript at once: ``on_segment`` is never called."""
        audio = readable_file(request.audio_path, "audio file")
        upload = read_upload(str(audio))
        options: dict[str, Any] = {"response_format": "verbose_json" if request.timestamps else "json"}
        if request.timestamps:  # segments cost nothing more; words add latency
            options["timestamp_granularities"] = ["word", "segment"]
        if request.language:
            options["language"] = request.language
        if request.prompt:
            options["prompt"] = request.prompt

        async def call(client: Any, endpoint: Endpoint) -> Any:
            return await client.audio.transcriptions.create(model=endpoint.wire_model, file=upload, **options)

        answer = await self.with_keys(model, call)
        text = getattr(answer, "text", None)
        if not isinstance(text, str):
            raise ProviderError("the answer holds no transcript", provider=model.provider, model=model.id)
        words = [
            TranscribedWord(word=w.word.strip(), start=float(w.start), end=float(w.end))
            for w in getattr(answer, "words", None) or ()
        ]
        language = getattr(answer, "language", None) or request.language
        duration = getattr(answer, "duration", None)
        return TranscribeResult(
            text=text.strip(),
            model_used=model.id,
            language=language,
            duration=float(duration) if isinstance(duration, int | float) else None,
            words=words,
            segments=[TranscribedSegment.of(s) for s in getattr(answer, "segments", None) or ()],
        )

    async def synthesize(self, model: ModelSchema, request: SynthesizeRequest) -> SynthesizeResult:
        options = _speech_options(model, request)
        target = output_path(request.output_path, request.format, "car-tts-")

        async def call(client: Any, endpoint: Endpoint) -> int:
            speech = client.audio.speech.with_streaming_response
            async with speech.create(model=endpoint.wire_model, **options) as response:
                return await stream_to(target, response.iter_bytes())

        if not await self.with_keys(model, call):
            raise ProviderError("the answer holds no audio", provider=model.provider, model=model.id)
        return SynthesizeResult(
            audio_path=str(target),
            media_type=AUDIO_MEDIA_TYPES[request.format],
            model_used=model.id,
            voice_used=request.voice or DEFAULT_VOICE,
        )


def _speech_options(model: ModelSchema, request: SynthesizeRequest) -> dict[str, Any]:
    """The Speech API's arguments for ``request``; raises before any network on bad values."""
    if not request.text.strip():
        raise InvalidInput("there is no text to speak")
    voice = request.voice or DEFAULT_VOICE
    if voice not in OPENAI_VOICES and not voice.startswith("voice_"):
        raise InvalidInput(
            f"{model.id} has no voice {voice!r}; its voices: {', '.join(OPENAI_VOICES)}", param="voice"
        )
    # A custom voice goes out as an object, the SDK's shape for it; a built-in one by name.
    wire_voice: Any = voice if voice in OPENAI_VOICES else {"id": voice}
    options: dict[str, Any] = {"input": request.text, "voice": wire_voice, "response_format": request.format}
    if request.speed is not None:
        low, high = _SPEED_RANGE
        if not low <= request.speed <= high:
            raise InvalidInput(f"{model.id} speaks at a speed from {low} to {high}, not {request.speed}")
        options["speed"] = request.speed
    if request.voice_instruction:
        options["instructions"] = request.voice_instruction
    cloning = [n for n in ("reference_audio_path", "reference_text") if getattr(request, n)]
    if cloning and request.strict_capabilities:
        raise InvalidInput(
            f"{model.id} (OpenAI Speech) does not support {', '.join(cloning)}; "
            "use a model that does or set strict_capabilities = false"
        )
    if cloning:
        log.warning("%s (OpenAI Speech) ignores %s", model.id, ", ".join(cloning))
    return options


async def stream_to(target: Path, chunks: Any) -> int:
    """Write an async byte stream to ``target`` atomically; the bytes written (0: nothing is)."""
    size = 0
    with atomic_file(target, keep_empty=False) as file:
        async for chunk in chunks:
            file.write(chunk)
            size += len(chunk)
    return size
