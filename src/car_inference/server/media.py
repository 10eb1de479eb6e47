"""Speech and image routes: ``/v1/audio/transcriptions`` (multipart upload), ``/v1/audio/speech``,
``/v1/audio/voices`` (the voices ``voice`` takes) and ``/v1/images/generations``.

They go to the engine like every other task. Where no backend for the capability is installed
(the engine raises ModelUnavailable or UnsupportedMode), the answer is a 501 naming the missing
capability and the engine's reason; once a backend lands, the same routes just work.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..engine.speech import speech_model
from ..errors import InferenceError
from ..requests import (
    GenerateImageRequest,
    SynthesizeRequest,
    TranscribedSegment,
    TranscribeRequest,
    TranscribeResult,
)
from ..schema import ModelCapability
from .common import ServerState, car_headers, given, json_response, read_json, refuse_fields
from .errors import ApiError, guarded, validated
from .transcripts import TranscriptEvents, with_times
from .translate import routed

__all__ = ["STT", "TTS", "Form", "FormField", "parse_multipart", "register", "subtitles", "upload_name"]

# What /v1/images/generations takes (OpenAI's fields that mean something here, and our extensions
# for local models), and OpenAI's options honoured only at their default (the models choose).
IMAGE_FIELDS = frozenset(
    {"prompt", "model", "n", "size", "response_format", "output_format", "user",
     "negative_prompt", "seed", "steps", "guidance"}
)  # fmt: skip
OPENAI_IMAGE_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "quality": ("auto",), "background": ("auto",), "moderation": ("auto",), "stream": (False,),
}  # fmt: skip

STT = "speech_to_text"
TTS = "text_to_speech"
IMAGES = "image_generation"
# Our image request's fields as OpenAI's image requests name them, for error messages.
IMAGE_FIELD_NAMES = {"format": "output_format", "variant_count": "n", "width": "size", "height": "size"}

MAX_SPEECH_CHARS = 4096
# SynthesizeRequest's fields as OpenAI's speech request names them, for error messages.
_SPEECH_NAMES = {"text": "input", "voice_instruction": "instructions", "format": "response_format"}
_TRANSCRIPT_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
_TIMED_FORMATS = ("verbose_json", "srt", "vtt")
# What each route takes; anything else is a 400 naming it (OpenAI's `stream_format: "sse"` got raw
# WAV bytes back, `temperature: 0.8` was dropped), except at the value it means by default.
_TRANSCRIBE_FIELDS = frozenset(
    {"file", "model", "language", "prompt", "response_format", "timestamp_granularities", "stream"}
)
_TRANSCRIBE_DEFAULTS = {"temperature": ("0", "0.0")}
_SPEECH_FIELDS = frozenset({"model", "input", "voice", "response_format", "speed", "instructions"})
_SPEECH_DEFAULTS = {"stream_format": ("audio",)}
_SPEECH_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "pcm": "audio/pcm"}
_IMAGE_FORMATS = ("png", "jpeg", "webp")


_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")


def upload_name(filename: str | None) -> str:
    """The temporary file's name for an upload: ``audio`` with the client's suffix when it is a
    plain one (``.wav``), else none; the client's name never reaches the file system."""
    suffix = Path(filename or "").suffix if filename and "\x00" not in filename else ""
    return "audio" + (suffix if _SUFFIX.fullmatch(suffix) else "")


@dataclass(frozen=True)
class FormField:
    value: bytes
    filename: str | None = None
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", errors="replace")


class Form(dict[str, FormField]):
    """A form's fields by name (the last of a repeated name, as JSON's duplicate keys), and
    ``every``: all of them in order, for the fields a client repeats (``image[]``,
    ``timestamp_granularities[]``: an SDK sends one part per list item)."""

    def __init__(self) -> None:
        super().__init__()
        self.every: list[tuple[str, FormField]] = []

    def add(self, name: str, field: FormField) -> None:
        self[name] = field
        self.every.append((name, field))

    def listed(self, name: str) -> list[FormField]:
        """Every value of list field ``name``: sent as ``name``, ``name[]`` or ``name[i]``."""
        return [f for key, f in self.every if key == name or key.startswith(name + "[")]


def parse_multipart(body: bytes, content_type: str) -> Form:
    """A ``multipart/form-data`` body as fields by name (the standard library's MIME parser:
    no extra dependency for one upload route)."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise ApiError(400, "expected a multipart/form-data body with a boundary", code="invalid_body")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "the multipart body could not be parsed", code="invalid_body")
    fields = Form()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        value = payload if isinstance(payload, bytes) else b""
        fields.add(name, FormField(value, part.get_filename(), part.get_content_type()))
    return fields


def _transcript(result: TranscribeResult, fmt: str, words: bool) -> Response:
    """A transcription in OpenAI's ``response_format``: ``verbose_json`` has the duration and the
    segments (and the words when asked for), ``srt`` and ``vtt`` are subtitles of the segments
    (one cue for the whole text where the model gave none)."""
    headers = car_headers(result.model_used)
    if fmt == "text":
        return PlainTextResponse(result.text, headers=headers)
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(subtitles(result, fmt), headers=headers)
    if fmt == "json":
        return json_response({"text": result.text}, headers=headers)
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": result.language,
        "duration": result.duration if result.duration is not None else 0.0,
        "text": result.text,
        "segments": [
            {"id": i, "seek": 0, **s.model_dump(), **_decoder_figures(s)}
            for i, s in enumerate(result.segments)
        ],
    }
    if words:
        body["words"] = [w.model_dump() for w in result.words]
    return json_response(body, headers=headers)


def _decoder_figures(segment: TranscribedSegment) -> dict[str, float]:
    """OpenAI's segments always carry these; a model that gave none gets neutral values."""
    figures = {"temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
    return {k: v if (v := getattr(segment, k)) is not None else figures[k] for k in figures}


def subtitles(result: TranscribeResult, fmt: str) -> str:
    """``result`` as SRT or WebVTT cues, one per segment."""
    cues = [(s.start, s.end, s.text) for s in result.segments] or [(0.0, result.duration or 0.0, result.text)]
    comma = fmt == "srt"

    def stamp(seconds: float) -> str:
        ms = round(max(seconds, 0.0) * 1000)
        h, rest = divmod(ms, 3_600_000)
        m, rest = divmod(rest, 60_000)
        sec, ms = divmod(rest, 1000)
        return f"{h:02d}:{m:02d}:{sec:02d}{',' if comma else '.'}{ms:03d}"

    blocks = [
        (f"{i}\n" if comma else "") + f"{stamp(start)} --> {stamp(end)}\n{text}\n"
        for i, (start, end, text) in enumerate(cues, 1)
        if text
    ]
    return ("" if comma else "WEBVTT\n\n") + "\n".join(blocks)


def _model(value: Any) -> str | None:
    if routed(value):
        return None
    if not isinstance(value, str):
        raise ApiError(400, "`model` must be a string", param="model")
    return value


def _size(value: Any) -> tuple[int, int] | None:
    if value is None or value == "auto":
        return None
    try:
        width, height = (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise ApiError(400, "`size` must be WIDTHxHEIGHT, e.g. 1024x1024", param="size") from None
    return width, height


def _without_path(exc: InferenceError, workdir: Path, name: str) -> InferenceError:
    """``exc`` with the server's temp folder out of its message: a client learns nothing of the
    server's file system. A file in the folder is called ``name`` (the upload's own name)."""
    folder = re.compile(re.escape(str(workdir)) + r"[/\\]?[^\s'\":,)]*")
    for attr in ("reason",):  # the part of some errors' message kept apart
        value = getattr(exc, attr, None)
        if isinstance(value, str):
            setattr(exc, attr, folder.sub(name, value))
    exc.args = tuple(folder.sub(name, a) if isinstance(a, str) else a for a in exc.args)
    return exc


def register(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    timeout_s = state.settings.request_timeout_s

    @guarded(STT, timeout_s=timeout_s, retry_hint=state.retry_hint)
    async def transcriptions(request: Request) -> Response:
        fields = parse_multipart(await request.body(), request.headers.get("content-type", ""))
        upload = fields.get("file")
        if upload is None or not upload.value:
            raise ApiError(400, "the `file` field with the audio is required", param="file")
        fmt = fields["response_format"].text if "response_format" in fields else "json"
        if fmt not in _TRANSCRIPT_FORMATS:
            formats = ", ".join(_TRANSCRIPT_FORMATS)
            raise ApiError(400, f"`response_format` must be one of {formats}", param="response_format")
        refuse_fields(
            {k: f.text for k, f in fields.items() if k != "file"}, _TRANSCRIBE_FIELDS, _TRANSCRIBE_DEFAULTS
        )
        granularities = {f.text for f in fields.listed("timestamp_granularities")}
        stream = "stream" in fields and fields["stream"].text.strip().lower() == "true"
        workdir = Path(tempfile.mkdtemp(prefix="car-upload-"))
        name = upload.filename or "the upload"
        handed_over = False  # a stream removes the upload when its transcription ends
        try:
            audio = workdir / upload_name(upload.filename or "audio.wav")
            audio.write_bytes(upload.value)
            call = TranscribeRequest(
                audio_path=str(audio),
                model=_model(fields["model"].text if "model" in fields else None),
                language=fields["language"].text if "language" in fields else None,
                prompt=fields["prompt"].text if "prompt" in fields else None,
                timestamps=fmt == "verbose_json" and "word" in granularities,
            )
            if fmt in _TIMED_FORMATS and not call.timestamps:  # a hosted model's times: its words
                call.timestamps = speech_model(engine, call.model, ModelCapability.SPEECH_TO_TEXT).is_remote
            if stream:
                events = TranscriptEvents(
                    state,
                    lambda heard: engine.transcribe(call, on_segment=heard),
                    speech_model(engine, call.model, ModelCapability.SPEECH_TO_TEXT).id,
                    ended=lambda: shutil.rmtree(workdir, ignore_errors=True),
                    clean=lambda exc: _without_path(exc, workdir, name),
                )
                handed_over = True
                return await events.opening()
            async with asyncio.timeout(timeout_s):
                result = await engine.transcribe(call)
            if fmt in _TIMED_FORMATS:
                result = with_times(result, audio)
        except InferenceError as exc:
            raise _without_path(exc, workdir, name) from None
        finally:
            if not handed_over:
                shutil.rmtree(workdir, ignore_errors=True)
        return _transcript(result, fmt, "word" in granularities)

    @guarded(TTS, timeout_s=timeout_s, retry_hint=state.retry_hint)
    async def speech(request: Request) -> Response:
        body = await read_json(request)
        refuse_fields(body, _SPEECH_FIELDS, _SPEECH_DEFAULTS)
        text = body.get("input")
        if not isinstance(text, str) or not text:
            raise ApiError(400, "`input` must be the text to speak", param="input")
        if len(text) > MAX_SPEECH_CHARS:  # OpenAI's limit; Piper runs on, holding the voice
            message = f"`input` is {len(text)} characters; at most {MAX_SPEECH_CHARS} (split longer texts)"
            raise ApiError(400, message, param="input")
        fmt = given(body, "response_format", "wav")
        if not isinstance(fmt, str) or fmt not in _SPEECH_FORMATS:
            raise ApiError(
                400, f"`response_format` must be one of {', '.join(_SPEECH_FORMATS)}", param="response_format"
            )
        workdir = Path(tempfile.mkdtemp(prefix="car-speech-"))
        try:
            call = validated(
                SynthesizeRequest,
                {
                    "text": text,
                    "model": _model(body.get("model")),
                    "voice": body.get("voice"),
                    "format": fmt,
                    "speed": body.get("speed"),
                    "voice_instruction": body.get("instructions"),
                    "output_path": str(workdir / f"speech.{fmt}"),
                },
                _SPEECH_NAMES,
            )
            async with asyncio.timeout(timeout_s):
                result = await engine.synthesize(call)
            audio = Path(result.audio_path).read_bytes()
        except InferenceError as exc:
            raise _without_path(exc, workdir, "the output file") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        media_type = result.media_type or _SPEECH_FORMATS[fmt]
        return Response(audio, media_type=media_type, headers=car_headers(result.model_used))

    @guarded(TTS, timeout_s=timeout_s, retry_hint=state.retry_hint)
    async def voices(request: Request) -> Response:
        """The voices ``voice`` takes on ``?model=`` (else the model "auto" speech runs on)."""
        from ..engine.speech import list_voices

        name = _model(request.query_params.get("model"))
        async with asyncio.timeout(timeout_s):
            result = await list_voices(engine, name)
        return json_response(result.model_dump(mode="json"), headers=car_headers(result.model))

    @guarded(IMAGES, timeout_s=timeout_s, retry_hint=state.retry_hint)
    async def images(request: Request) -> Response:
        body = await read_json(request)
        refuse_fields(body, IMAGE_FIELDS, OPENAI_IMAGE_DEFAULTS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must describe the image", param="prompt")
        if given(body, "response_format", "b64_json") != "b64_json":
            raise ApiError(400, "only response_format b64_json is supported", param="response_format")
        fmt = given(body, "output_format", "png")
        if not isinstance(fmt, str) or fmt not in _IMAGE_FORMATS:
            raise ApiError(400, "`output_format` must be png, jpeg or webp", param="output_format")
        size = _size(body.get("size"))
        workdir = Path(tempfile.mkdtemp(prefix="car-image-"))
        try:
            call = validated(
                GenerateImageRequest,
                {
                    "prompt": prompt,
                    "model": _model(body.get("model")),
                    "negative_prompt": body.get("negative_prompt"),
                    "seed": body.get("seed"),
                    "steps": body.get("steps"),  # extensions for local models, beside OpenAI's fields
                    "guidance": body.get("guidance"),
                    "variant_count": body.get("n"),
                    "format": fmt,
                    "output_path": str(workdir / f"image.{fmt}"),
                    **({"width": size[0], "height": size[1]} if size else {}),
                },
                IMAGE_FIELD_NAMES,  # errors name the client's fields
            )
            async with asyncio.timeout(timeout_s):
                result = await engine.generate_image(call)
            images = [Path(p).read_bytes() for p in result.image_paths or [result.image_path]]
        except InferenceError as exc:
            raise _without_path(exc, workdir, "the output file") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        data = [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": None} for image in images]
        payload = {"created": int(time.time()), "data": data, "output_format": fmt}
        return json_response(payload, headers=car_headers(result.model_used))

    app.add_route("/v1/audio/transcriptions", transcriptions, methods=["POST"])
    app.add_route("/v1/audio/speech", speech, methods=["POST"])
    app.add_route("/v1/audio/voices", voices, methods=["GET"])
    app.add_route("/v1/images/generations", images, methods=["POST"])
