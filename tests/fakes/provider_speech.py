"""The fake provider's speech endpoints: OpenAI's Audio API and ElevenLabs' text-to-speech.

Kept apart from ``provider_server.py``, which routes here first (``route``). Wire shapes follow the
``openai`` SDK's types (``Transcription``, ``TranscriptionVerbose``) and ElevenLabs' API reference:

* ``POST /v1/audio/speech`` (JSON: model, input, voice, response_format, speed, instructions)
  streams audio bytes with ``Transfer-Encoding: chunked`` in ``SpeechState.chunk_bytes`` pieces:
  a real 24 kHz 16-bit mono WAV (or raw PCM) of a tone, 0.3 s per word, whose RIFF ``LIST/INFO``
  chunk carries the spoken text (``ICMT``). mp3/flac/opus/aac answers start with their format's
  magic bytes and carry the same samples: tests compare bytes, nobody decodes them. An unknown
  voice, empty input or a speed outside 0.25-4 is a 400 like OpenAI's. Takes a queued
  ``Reply``/``Fault`` (``Fault.cut_stream`` cuts the audio).
* ``POST /v1/audio/transcriptions`` (multipart: file, model, response_format, language, prompt,
  ``timestamp_granularities[]``) answers the text a file from the speech endpoint carries, else
  ``SpeechState.transcript``; ``verbose_json`` adds language, duration and word timings. A file
  that is not audio (no known magic) is OpenAI's 400 "Invalid file format".
* ``POST /v1/speech-to-text`` (ElevenLabs Scribe, multipart: model_id, file, language_code,
  timestamps_granularity) answers text, language and words with word and spacing entries.
* ``POST /v1/text-to-speech/{voice_id}`` (ElevenLabs: ``xi-api-key``, JSON text/model_id,
  ``output_format`` query) streams the same audio; a voice not in ``SpeechState.eleven_voices`` is
  ElevenLabs' 404 ``voice_not_found``.
* ``GET /v1/voices`` (ElevenLabs) lists ``SpeechState.eleven_voices`` (George named, others cloned).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from .provider_media import _form

__all__ = ["OPENAI_VOICES", "SpeechState", "route", "spoken_text", "wav"]

OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
    "marin", "cedar",
)  # fmt: skip
RATE = 24_000  # OpenAI's Speech API answers 24 kHz mono
_MAGIC = {"mp3": b"ID3\x04\x00\x00", "flac": b"fLaC", "opus": b"OggS", "aac": b"\xff\xf1"}
_AUDIO_MAGIC = (b"RIFF", b"ID3", b"fLaC", b"OggS", b"\xff\xf1", b"\xff\xfb", b"\x1aE\xdf\xa3")
_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}
_ELEVEN = re.compile(r"^/v1/text-to-speech/([^/]+)(/stream)?$")


@dataclass
class SpeechState:
    transcript: str = "hello from the fake transcriber"  # for audio the speech endpoint did not make
    heard: str | None = None  # when set, every transcription answers this (a mishearing)
    chunk_bytes: int = 4096
    eleven_voices: set[str] = field(default_factory=lambda: {"JBFqnCBsd6RMkjVDRZzb"})
    transcribed: list[dict[str, Any]] = field(default_factory=list)  # every transcription form

    def reset(self) -> None:
        self.transcript, self.chunk_bytes, self.heard = "hello from the fake transcriber", 4096, None
        self.eleven_voices = {"JBFqnCBsd6RMkjVDRZzb"}
        self.transcribed.clear()


def route(handler: Any, method: str, path: str) -> tuple[Any, bool, bool] | None:
    """(handler(reply, stream), consumes_queue, is_stream) for a speech endpoint, else None."""
    if method == "GET" and path == "/v1/voices":
        return (lambda reply, stream: _eleven_voices(handler)), False, False
    if method != "POST":
        return None
    if path == "/v1/audio/speech":
        return (lambda reply, stream: _speech(handler)), True, True
    if path == "/v1/audio/transcriptions":
        return (lambda reply, stream: _transcription(handler)), True, False
    if match := _ELEVEN.match(path):
        return (lambda reply, stream: _eleven_speech(handler, match.group(1))), True, True
    if path == "/v1/speech-to-text":
        return (lambda reply, stream: _eleven_transcription(handler)), True, False
    return None


def wav(text: str, rate: int = RATE) -> bytes:
    """A WAV of a 440 Hz tone, 0.3 s per word of ``text``, carrying ``text`` in LIST/INFO/ICMT."""
    samples = _samples(text, rate)
    comment = text.encode() + b"\x00"
    comment += b"\x00" * (len(comment) % 2)
    info = b"INFO" + b"ICMT" + struct.pack("<I", len(comment)) + comment
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"LIST"
        + struct.pack("<I", len(info))
        + info
        + b"data"
        + struct.pack("<I", len(samples))
        + samples
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def spoken_text(audio: bytes) -> str | None:
    """The text a ``wav`` file carries, or None."""
    at = audio.find(b"ICMT")
    if not audio.startswith(b"RIFF") or at < 0:
        return None
    (size,) = struct.unpack("<I", audio[at + 4 : at + 8])
    return audio[at + 8 : at + 8 + size].rstrip(b"\x00").decode()


def _samples(text: str, rate: int) -> bytes:
    count = int(rate * 0.3 * max(1, len(text.split())))
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(count)
    )


def _audio(text: str, fmt: str) -> bytes:
    if fmt == "wav":
        return wav(text)
    if fmt == "pcm":
        return _samples(text, RATE)
    return _MAGIC[fmt] + wav(text)


def _stream_audio(handler: Any, data: bytes, content_type: str) -> None:
    """Chunked audio like the real APIs: no Content-Length, one flush per piece."""
    handler.close_connection = True
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.send_header("Connection", "close")
    for name, value in handler._common_headers(handler._protocol).items():
        handler.send_header(name, value)
    handler.end_headers()
    step = handler.fake.speech.chunk_bytes
    for start in range(0, len(data), step):
        handler._content_event(data[start : start + step])
    handler._end_stream()


def _speech(handler: Any) -> None:
    body = handler._body
    text, voice = body.get("input"), body.get("voice")
    fmt = body.get("response_format") or "mp3"
    speed = body.get("speed", 1.0)
    custom = isinstance(voice, dict) and str(voice.get("id", "")).startswith("voice_")
    if not isinstance(text, str) or not text.strip():
        handler._send_error(400, "Missing required parameter: 'input' (fake provider).")
    elif not custom and voice not in OPENAI_VOICES:
        voices = ", ".join(repr(v) for v in OPENAI_VOICES)
        handler._send_error(400, f"Invalid value for 'voice': {voice!r}. Supported values are: {voices}.")
    elif fmt not in _TYPES:
        handler._send_error(400, f"Invalid value for 'response_format': {fmt!r} (fake provider).")
    elif not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        handler._send_error(400, f"Invalid value for 'speed': {speed!r} (fake provider).")
    else:
        _stream_audio(handler, _audio(text, fmt), _TYPES[fmt])


def _transcription(handler: Any) -> None:
    form = _form(handler)
    handler.fake.speech.transcribed.append(form)
    upload = form.get("file")
    if not isinstance(upload, tuple) or not form.get("model"):
        handler._send_error(400, "Missing required parameter: 'file' or 'model' (fake provider).")
        return
    _, data, _ = upload
    if not data.startswith(_AUDIO_MAGIC):
        formats = "['flac', 'm4a', 'mp3', 'mp4', 'mpeg', 'mpga', 'oga', 'ogg', 'wav', 'webm']"
        handler._send_error(400, f"Invalid file format. Supported formats: {formats}")
        return
    text = handler.fake.speech.heard or spoken_text(data) or handler.fake.speech.transcript
    fmt = form.get("response_format", "json")
    usage = {"type": "duration", "seconds": max(1, round(0.3 * len(text.split())))}
    if fmt == "text":
        handler._send_bytes(200, text.encode(), "text/plain; charset=utf-8", None)
        return
    if fmt != "verbose_json":
        handler._send_json(200, {"text": text, "usage": usage})
        return
    words = [
        {"word": word, "start": round(0.3 * i, 2), "end": round(0.3 * (i + 1), 2)}
        for i, word in enumerate(text.split())
    ]
    answer: dict[str, Any] = {
        "task": "transcribe",
        "language": form.get("language") or "english",
        "duration": 0.3 * len(words),
        "text": text,
        "segments": [],
        "usage": usage,
    }
    granularities = form.get("timestamp_granularities") or ["segment"]  # the API's default
    if "segment" in granularities:
        answer["segments"] = [
            {"id": 0, "seek": 0, "start": 0.0, "end": answer["duration"], "text": f" {text}",
             "tokens": [50364, 400], "temperature": 0.0, "avg_logprob": -0.25,
             "compression_ratio": 0.9, "no_speech_prob": 0.01}
        ]  # fmt: skip
    if "word" in granularities:
        answer["words"] = words
    handler._send_json(200, answer)


def _eleven_speech(handler: Any, voice_id: str) -> None:
    body = handler._body
    text = body.get("text")
    if not handler.headers.get("xi-api-key"):
        handler._send_bytes(401, b'{"detail": {"status": "invalid_api_key"}}', "application/json", None)
    elif voice_id not in handler.fake.speech.eleven_voices:
        detail = {"status": "voice_not_found", "message": f"A voice with voice_id {voice_id} was not found."}
        handler._send_json(404, {"detail": detail})
    elif not isinstance(text, str) or not text.strip():
        handler._send_json(422, {"detail": [{"loc": ["body", "text"], "msg": "field required"}]})
    else:
        fmt = str(handler._query.get("output_format", "mp3_44100_128"))
        kind = fmt.split("_", maxsplit=1)[0]
        data = wav(text) if kind == "wav" else _samples(text, RATE) if kind == "pcm" else _audio(text, "mp3")
        _stream_audio(handler, data, _TYPES.get(kind, "audio/mpeg"))


def _eleven_voices(handler: Any) -> None:
    """ElevenLabs' voice list: every voice ``SpeechState.eleven_voices`` knows, premade ones named."""
    if not handler.headers.get("xi-api-key"):
        handler._send_bytes(401, b'{"detail": {"status": "invalid_api_key"}}', "application/json", None)
        return
    names = {"JBFqnCBsd6RMkjVDRZzb": "George"}
    voices = [
        {
            "voice_id": v,
            "name": names.get(v, f"voice {v[:6]}"),
            "category": "premade" if v in names else "cloned",
        }
        for v in sorted(handler.fake.speech.eleven_voices)
    ]
    handler._send_json(200, {"voices": voices})


def _eleven_transcription(handler: Any) -> None:
    form = _form(handler)
    handler.fake.speech.transcribed.append(form)
    upload = form.get("file")
    if not isinstance(upload, tuple) or not form.get("model_id"):
        handler._send_json(422, {"detail": [{"loc": ["body", "model_id"], "msg": "field required"}]})
        return
    text = handler.fake.speech.heard or spoken_text(upload[1]) or handler.fake.speech.transcript
    words: list[dict[str, Any]] = []
    if form.get("timestamps_granularity", "word") != "none":
        for i, word in enumerate(text.split()):
            if i:
                words.append(
                    {"text": " ", "start": 0.3 * i, "end": 0.3 * i, "type": "spacing", "logprob": 0.0}
                )
            words.append(
                {"text": word, "start": 0.3 * i, "end": 0.3 * i + 0.25, "type": "word", "logprob": -0.1}
            )
    language = form.get("language_code") or "eng"
    answer = {"language_code": language, "language_probability": 0.98, "text": text, "words": words}
    handler._send_json(200, answer)
