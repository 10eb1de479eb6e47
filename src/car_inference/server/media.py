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

from ..errors import InferenceError
from ..requests import GenerateImageRequest, SynthesizeRequest, TranscribeRequest
from .common import ServerState, car_headers, given, json_response, read_json
from .errors import ApiError, guarded, validated
from .translate import AUTO

__all__ = ["STT", "TTS", "FormField", "parse_multipart", "register", "upload_name"]

STT = "speech_to_text"
TTS = "text_to_speech"
IMAGES = "image_generation"
# Our image request's fields as OpenAI's image requests name them, for error messages.
IMAGE_FIELD_NAMES = {"format": "output_format", "variant_count": "n", "width": "size", "height": "size"}

MAX_SPEECH_CHARS = 4096
# SynthesizeRequest's fields as OpenAI's speech request names them, for error messages.
_SPEECH_NAMES = {"text": "input", "voice_instruction": "instructions", "format": "response_format"}
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


def parse_multipart(body: bytes, content_type: str) -> dict[str, FormField]:
    """A ``multipart/form-data`` body as fields by name (the standard library's MIME parser:
    no extra dependency for one upload route)."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise ApiError(400, "expected a multipart/form-data body with a boundary", code="invalid_body")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "the multipart body could not be parsed", code="invalid_body")
    fields: dict[str, FormField] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        value = payload if isinstance(payload, bytes) else b""
        fields[name] = FormField(value, part.get_filename(), part.get_content_type())
    return fields


def _model(value: Any) -> str | None:
    if value is None or value in ("", AUTO):
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
        if fmt not in ("json", "text", "verbose_json"):
            raise ApiError(
                400, "`response_format` must be json, text or verbose_json", param="response_format"
            )
        granularities = {f.text for k, f in fields.items() if k.startswith("timestamp_granularities")}
        workdir = Path(tempfile.mkdtemp(prefix="car-upload-"))
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
            async with asyncio.timeout(timeout_s):
                result = await engine.transcribe(call)
        except InferenceError as exc:
            raise _without_path(exc, workdir, upload.filename or "the upload") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        headers = car_headers(result.model_used)
        if fmt == "text":
            return PlainTextResponse(result.text, headers=headers)
        body: dict[str, Any] = {"text": result.text}
        if fmt == "verbose_json":
            body = {"task": "transcribe", "language": result.language, "text": result.text}
            if result.words:
                body["words"] = [w.model_dump() for w in result.words]
        return json_response(body, headers=headers)

    @guarded(TTS, timeout_s=timeout_s, retry_hint=state.retry_hint)
    async def speech(request: Request) -> Response:
        body = await read_json(request)
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
