"""ElevenLabs text-to-speech and Scribe speech-to-text through the official ``elevenlabs`` SDK.

Source kind served: ``elevenlabs`` (``base_url``/``api_key_env``/``model_name`` from the source,
merged with the catalog's ``[hosts.elevenlabs]``). Keys rotate and errors translate as for the
other hosted backends (``with_keys``).

- Speech: ``text_to_speech.convert`` (``POST /v1/text-to-speech/{voice_id}``), the audio read as
  the stream it is and written to a temporary name, renamed when complete. ``voice`` is an
  ElevenLabs voice id (default: George, a premade voice every account has); the service checks
  it, and an unknown one is its 404 ``voice_not_found``. wav and pcm come at 24 kHz, mp3 at
  44.1 kHz/128 kbps; ElevenLabs makes no flac, so asking for it is ``UnsupportedMode``.
  ``speed`` goes out in the voice settings (ElevenLabs takes 0.7-1.2), ``language`` as
  ``language_code``. Voice instructions and cloning from a reference recording are not part of
  this call: an error when strict, otherwise left out with a warning (as Piper does).
- Transcription: ``speech_to_text.convert`` with the file as a multipart upload; ``language``
  becomes ``language_code``; ``timestamps`` asks for word granularity and keeps the words (not
  the spacing or audio-event entries). A prompt has no field: refused, not dropped.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    import elevenlabs
    import httpx
    from elevenlabs.core.api_error import ApiError
except ImportError as exc:  # pragma: no cover - the backend table checks this first
    raise ImportError(
        "the ElevenLabs backend needs elevenlabs: pip install 'car-inference[elevenlabs]'"
    ) from exc

from ..errors import InvalidInput, ProviderError, UnsupportedMode
from ..requests import (
    SynthesizeRequest,
    SynthesizeResult,
    TranscribedWord,
    TranscribeRequest,
    TranscribeResult,
)
from ..schema import ElevenLabsSource, ModelSchema
from .base import SegmentCallback
from .media_files import output_path, read_upload, readable_file
from .openai_speech import AUDIO_MEDIA_TYPES, stream_to
from .remote import Endpoint, ErrorSite, RemoteBackend, status_error, transport_error
from .voices import Voice, VoiceList

__all__ = ["ElevenLabsBackend"]

log = logging.getLogger(__name__)

DEFAULT_VOICE = "JBFqnCBsd6RMkjVDRZzb"  # "George", a premade voice (the SDK's own examples use it)
_OUTPUT_FORMATS = {"wav": "wav_24000", "pcm": "pcm_24000", "mp3": "mp3_44100_128"}
_SPEED_RANGE = (0.7, 1.2)


class ElevenLabsBackend(RemoteBackend):
    kind = "elevenlabs"
    source_types = (ElevenLabsSource,)

    def make_client(self, endpoint: Endpoint, key: str) -> elevenlabs.AsyncElevenLabs:
        return elevenlabs.AsyncElevenLabs(
            api_key=key,
            base_url=endpoint.base_url,
            timeout=self.settings.timeout_s,
            httpx_client=httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.timeout_s, connect=self.settings.connect_timeout_s),
                headers=dict(endpoint.headers) or None,
                follow_redirects=True,
            ),
        )

    def translate(
        self, exc: Exception, endpoint: Endpoint, model: ModelSchema, key: str
    ) -> ProviderError | None:
        where: ErrorSite = {"provider": endpoint.provider, "model": model.id, "secrets": [key]}
        if isinstance(exc, ApiError) and exc.status_code is not None:
            return status_error(exc.status_code, _message_of(exc.body), headers=exc.headers, **where)
        return transport_error(exc, **where)

    # --- speech --------------------------------------------------------------------------------

    async def synthesize(self, model: ModelSchema, request: SynthesizeRequest) -> SynthesizeResult:
        options = self._speech_options(model, request)
        target = output_path(request.output_path, request.format, "car-tts-")
        voice = request.voice or DEFAULT_VOICE

        async def call(client: elevenlabs.AsyncElevenLabs, endpoint: Endpoint) -> int:
            chunks = client.text_to_speech.convert(voice, model_id=endpoint.wire_model, **options)
            return await stream_to(target, chunks)

        try:
            written = await self.with_keys(model, call)
        except ProviderError as exc:
            if exc.status == 404 and request.voice:  # voice_not_found: say which voices there are
                raise await self._unknown_voice(model, request.voice) from exc
            raise
        if not written:
            raise ProviderError("the answer holds no audio", provider=model.provider, model=model.id)
        return SynthesizeResult(
            audio_path=str(target),
            media_type=AUDIO_MEDIA_TYPES[request.format],
            model_used=model.id,
            voice_used=voice,
        )

    def _speech_options(self, model: ModelSchema, request: SynthesizeRequest) -> dict[str, Any]:
        if not request.text.strip():
            raise InvalidInput("there is no text to speak")
        if request.format not in _OUTPUT_FORMATS:
            formats = ", ".join(_OUTPUT_FORMATS)
            raise UnsupportedMode(
                f"synthesize format {request.format}", self.kind, f"ElevenLabs makes {formats}"
            )
        options: dict[str, Any] = {"text": request.text, "output_format": _OUTPUT_FORMATS[request.format]}
        if request.language:
            options["language_code"] = request.language
        if request.speed is not None:
            low, high = _SPEED_RANGE
            if not low <= request.speed <= high:
                raise InvalidInput(f"{model.id} speaks at a speed from {low} to {high}, not {request.speed}")
            options["voice_settings"] = elevenlabs.VoiceSettings(speed=request.speed)
        unsupported = [
            n for n in ("reference_audio_path", "reference_text", "voice_instruction") if getattr(request, n)
        ]
        if unsupported and request.strict_capabilities:
            raise InvalidInput(
                f"{model.id} (ElevenLabs) does not support {', '.join(unsupported)}; "
                "use a model that does or set strict_capabilities = false"
            )
        if unsupported:
            log.warning("%s (ElevenLabs) ignores %s", model.id, ", ".join(unsupported))
        return options

    async def voices(self, model: ModelSchema) -> VoiceList:
        """The account's voices (``voices.get_all``: ``GET /v1/voices``), premade ones included."""

        async def call(client: elevenlabs.AsyncElevenLabs, endpoint: Endpoint) -> Any:
            return await client.voices.get_all()

        answer = await self.with_keys(model, call)
        found = [
            Voice(id=v.voice_id, name=getattr(v, "name", None) or None)
            for v in getattr(answer, "voices", None) or ()
        ]
        return VoiceList(model=model.id, voices=found, default=DEFAULT_VOICE)

    async def _unknown_voice(self, model: ModelSchema, voice: str) -> InvalidInput:
        known = await self.voices(model)
        listed = ", ".join(f"{v.id} ({v.name})" if v.name else v.id for v in known.voices)
        return InvalidInput(
            f"{model.id} has no voice {voice!r}; the account's voices: {listed}", param="voice"
        )

    # --- transcription -------------------------------------------------------------------------

    async def transcribe(
        self, model: ModelSchema, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        """The whole transcript at once: ``on_segment`` is never called."""
        audio = readable_file(request.audio_path, "audio file")
        if request.prompt:
            raise UnsupportedMode("prompt", self.kind, f"{model.id} (Scribe) takes no prompt")
        upload = read_upload(str(audio))
        options: dict[str, Any] = {"timestamps_granularity": "word" if request.timestamps else "none"}
        if request.language:
            options["language_code"] = request.language

        async def call(client: elevenlabs.AsyncElevenLabs, endpoint: Endpoint) -> Any:
            return await client.speech_to_text.convert(model_id=endpoint.wire_model, file=upload, **options)

        answer = await self.with_keys(model, call)
        text = getattr(answer, "text", None)
        if not isinstance(text, str):
            raise ProviderError("the answer holds no transcript", provider=model.provider, model=model.id)
        words = [
            TranscribedWord(word=w.text.strip(), start=float(w.start or 0), end=float(w.end or 0))
            for w in getattr(answer, "words", None) or ()
            if request.timestamps and getattr(w, "type", "word") == "word"
        ]
        language = getattr(answer, "language_code", None) or request.language
        return TranscribeResult(text=text.strip(), model_used=model.id, language=language, words=words)


def _message_of(body: Any) -> str:
    """ElevenLabs errors: ``{"detail": {"status", "message"}}`` or a validation list."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("status") or detail)
    if isinstance(detail, list) and detail:
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(body or "")
