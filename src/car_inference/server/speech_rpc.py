"""JSON-RPC ``transcribe``, ``synthesize`` and ``voices``: speech over the WebSocket, audio as base64.

Like the audio routes, a remote caller never names a file on the server: ``transcribe`` takes the
audio as ``audio`` (base64, a data: URL too) and ``synthesize`` answers it as ``audio``; the
temporary folder is gone afterwards and error messages do not show its path. ``"model": "auto"``
(or none) leaves the choice to the ``[speech]`` policy. ``transcribe`` with ``"stream": true``
sends each segment as it is decoded, a ``transcribe.segment`` notification ``{"request_id",
"segment"}``, before the result.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InferenceError
from ..requests import SynthesizeRequest, TranscribedSegment, TranscribeRequest
from .errors import ApiError
from .media import MAX_SPEECH_CHARS, _without_path, upload_name

__all__ = ["SEGMENT_METHOD", "rpc_synthesize", "rpc_transcribe", "rpc_voices"]

SEGMENT_METHOD = "transcribe.segment"

_SERVER_PATHS = ("audio_path", "output_path", "reference_audio_path")


# The parameters whose "auto" means "choose for me" (`text: "auto"` is the word to speak).
_AUTO = frozenset({"model", "voice", "language"})


def _fields(params: dict[str, Any], upload: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request's fields: ``upload`` (transcribe's audio, its name, stream) taken apart, "auto"
    left out where it means the default; anything else goes to the request model, which refuses
    what it does not take (synthesize dropped `stream: true` without a word)."""
    for key in _SERVER_PATHS:
        if key in params:
            raise ApiError(400, f"`{key}` names a file on the server; send audio as base64", param=key)
    return {k: v for k, v in params.items() if k not in upload and not (k in _AUTO and v == "auto")}


def _audio(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise ApiError(400, "`audio` must be base64 audio data", param="audio")
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "`audio` is not valid base64", param="audio") from None


async def rpc_transcribe(session: Any, params: dict[str, Any], rid: Any) -> Any:
    fields = _fields(params, ("audio", "filename", "stream"))
    stream = params.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    data = _audio(params.get("audio"))
    name = str(params.get("filename") or "audio.wav")
    workdir = Path(tempfile.mkdtemp(prefix="car-rpc-audio-"))
    sent: list[asyncio.Future[None]] = []
    try:
        audio = workdir / upload_name(name)
        audio.write_bytes(data)
        request = TranscribeRequest.model_validate({**fields, "audio_path": str(audio)})
        heard = _segments(session, rid, sent) if stream and rid is not None else None
        result = await session.engine.transcribe(request, on_segment=heard)
    except InferenceError as exc:
        raise _without_path(exc, workdir, name) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    await asyncio.gather(*sent)  # every segment before the result
    return result.model_dump(mode="json")


def _segments(session: Any, rid: Any, sent: list[asyncio.Future[None]]) -> Any:
    """``on_segment`` for a streamed call: each segment a notification, in order (the engine calls
    it from the thread decoding)."""
    loop = asyncio.get_running_loop()

    def send(segment: TranscribedSegment) -> None:
        params = {"request_id": rid, "segment": segment.model_dump(mode="json")}
        sent.append(asyncio.ensure_future(session.notify(SEGMENT_METHOD, params)))

    return lambda segment: loop.call_soon_threadsafe(send, segment)


async def rpc_synthesize(session: Any, params: dict[str, Any], rid: Any) -> Any:
    fields = _fields(params)
    text = fields.get("text")
    if isinstance(text, str) and len(text) > MAX_SPEECH_CHARS:  # the HTTP route's limit
        message = f"`text` is {len(text)} characters; at most {MAX_SPEECH_CHARS} (split longer texts)"
        raise ApiError(400, message, param="text")
    workdir = Path(tempfile.mkdtemp(prefix="car-rpc-speech-"))
    try:
        target = workdir / f"speech.{fields.get('format', 'wav')}"
        request = SynthesizeRequest.model_validate({**fields, "output_path": str(target)})
        result = await session.engine.synthesize(request)
        data = base64.b64encode(Path(result.audio_path).read_bytes()).decode()
    except InferenceError as exc:
        raise _without_path(exc, workdir, "the output file") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {**result.model_dump(mode="json", exclude={"audio_path"}), "audio": data}


async def rpc_voices(session: Any, params: dict[str, Any], rid: Any) -> Any:
    """The voices ``voice`` takes on ``model`` (else on the model "auto" speech runs on)."""
    from ..engine.speech import list_voices

    model = params.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "`model` must be a string", param="model")
    result = await list_voices(session.engine, None if model in (None, "", "auto") else model)
    return result.model_dump(mode="json")
