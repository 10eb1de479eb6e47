"""The fake provider's OpenAI media endpoints: Images (generations, edits) and the Videos job flow.

Kept apart from ``provider_server.py``, which routes here first (``route``). Wire shapes follow
the ``openai`` SDK's types (``ImagesResponse``, ``Video``):

* ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart, ``image`` or
  ``image[]`` files, optional ``mask``) answer ``n`` solid-colour PNGs of the requested ``size``
  (1024x1024 for ``auto``) as ``b64_json``; a ``dall-e*`` model answers with URLs this server
  serves under ``/files/`` unless ``response_format`` is ``b64_json``, as OpenAI's did. Both take
  a queued ``Reply``/``Fault`` like a chat completion.
* ``POST /v1/videos`` (multipart) queues a job; each ``GET /v1/videos/{id}`` advances it, and
  after ``MediaState.video_polls`` retrieves it is ``completed`` (or ``failed`` with
  ``video_failure``); ``GET /v1/videos/{id}/content`` serves ``video_content`` once completed.
  Retrieves carry ``openai-poll-after-ms`` like OpenAI's. Creation takes a queued item.
* Gemini ``POST /v1beta/models/{model}:generateContent`` for a model whose name has ``-image``
  answers a PNG as an ``inlineData`` part, sized from ``imageConfig`` (the tier's pixels on the
  longer side of ``aspectRatio``; 1024x1024 without one), or a ``promptFeedback`` block when
  ``MediaState.gemini_block`` names a reason. It takes a queued item like any generation.
* Gemini's Interactions API for video: ``provider_interactions.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from . import provider_interactions

__all__ = ["FAKE_MP4", "MediaState", "png", "route"]

# An ISO BMFF ``ftyp`` box: what an mp4 file starts with. Tests compare bytes, nobody decodes it.
FAKE_MP4 = struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 512) + b"isomiso2"
_VIDEO = re.compile(r"^/v1/videos/([A-Za-z0-9_\-]+)(/content)?$")
_SECONDS = ("4", "8", "12")
_GEMINI_IMAGE = re.compile(r"^/(?:v1beta|v1alpha|v1)/models/([^/:]+-image[^/:]*):generateContent$")
_TIER_PIXELS = {"1K": 1024, "2K": 2048, "4K": 4096}


def png(width: int, height: int, seed: str = "") -> bytes:
    """A valid solid-colour RGB PNG; the colour comes from ``seed`` (the prompt)."""
    rgb = hashlib.sha256(seed.encode()).digest()[:3]
    rows = b"".join(b"\x00" + rgb * width for _ in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@dataclass
class MediaState:
    video_polls: int = 2  # retrieves before a job is done
    video_failure: str | None = None  # jobs fail with this message instead of completing
    video_content: bytes = FAKE_MP4
    poll_after_ms: int = 10
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # image URLs this server serves
    forms: list[dict[str, Any]] = field(default_factory=list)  # every multipart request, parsed
    gemini_block: str | None = None  # Gemini image prompts are blocked with this reason
    interactions: dict[str, dict[str, Any]] = field(default_factory=dict)  # provider_interactions.py
    video_as_uri: bool = False  # finished interactions link to the video instead of inlining it

    def reset(self) -> None:
        self.video_polls, self.video_failure, self.video_content = 2, None, FAKE_MP4
        self.gemini_block, self.video_as_uri = None, False
        self.jobs.clear()
        self.interactions.clear()
        self.files.clear()
        self.forms.clear()


def route(handler: Any, method: str, path: str) -> tuple[Any, bool, bool] | None:
    """(handler(reply, stream), consumes_queue, is_stream) for a media endpoint, else None."""
    if method == "POST" and path == "/v1/images/generations":
        return (lambda reply, stream: _images(handler, handler._body)), True, False
    if method == "POST" and path == "/v1/images/edits":
        return (lambda reply, stream: _edits(handler)), True, False
    if method == "POST" and path == "/v1/videos":
        return (lambda reply, stream: _create_video(handler)), True, False
    if method == "POST" and (gemini := _GEMINI_IMAGE.match(path)):
        return (lambda reply, stream: _gemini_image(handler, gemini.group(1))), True, False
    if (interaction := provider_interactions.route(handler, method, path)) is not None:
        return interaction
    if method == "GET" and path.startswith("/files/"):
        return (lambda reply, stream: _file(handler, path.removeprefix("/files/"))), False, False
    match = _VIDEO.match(path)
    if method == "GET" and match:
        video_id, content = match.groups()
        serve = _video_content if content else _retrieve_video
        return (lambda reply, stream: serve(handler, video_id)), False, False
    return None


def _form(handler: Any) -> dict[str, Any]:
    """A multipart body as {name: text} for fields and {name: (filename, bytes, type)} for files."""
    content_type = handler.headers.get("Content-Type", "")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=HTTP).parsebytes(head + handler._raw)
    form: dict[str, Any] = {}
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        assert isinstance(payload, bytes)  # decode=True: a leaf part's bytes, None (-> b"") for a multipart
        filename = part.get_filename()
        value: Any = (filename, payload, part.get_content_type()) if filename else payload.decode()
        if isinstance(name, str) and name.endswith("[]"):
            form.setdefault(name[:-2], []).append(value)
        elif isinstance(name, str):
            form[name] = value
    handler.fake.media.forms.append(form)
    return form


def _size(handler: Any, value: Any) -> tuple[int, int] | None:
    if value in (None, "auto"):
        return 1024, 1024
    try:
        width, height = (int(v) for v in str(value).split("x"))
    except ValueError:
        handler._send_error(400, f"Invalid value for size: {value!r} (fake provider).")
        return None
    return width, height


def _images(handler: Any, body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        handler._send_error(400, "Missing required parameter: 'prompt' (fake provider).")
        return
    size = _size(handler, body.get("size"))
    if size is None:
        return
    model = str(body.get("model") or "gpt-image-2")
    count = int(body.get("n") or 1)
    as_url = model.startswith("dall-e") and body.get("response_format") != "b64_json"
    data = []
    for i in range(count):
        image = png(*size, seed=f"{prompt}#{i}")
        if as_url:
            name = f"{uuid.uuid4().hex}.png"
            handler.fake.media.files[name] = image
            data.append({"url": f"{handler.fake.base_url}/files/{name}", "revised_prompt": prompt})
        else:
            data.append({"b64_json": base64.b64encode(image).decode()})
    answer: dict[str, Any] = {"created": int(time.time()), "data": data}
    if not model.startswith("dall-e"):
        answer |= {"output_format": body.get("output_format") or "png", "size": f"{size[0]}x{size[1]}"}
        answer["usage"] = {
            "input_tokens": len(prompt.split()),
            "output_tokens": 1056 * count,
            "total_tokens": 0,
        }
    handler._send_json(200, answer)


def _edits(handler: Any) -> None:
    form = _form(handler)
    images = form.get("image")
    if not images:
        handler._send_error(400, "Missing required parameter: 'image' (fake provider).")
        return
    _images(handler, {k: v for k, v in form.items() if isinstance(v, str)})


def _video_object(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def _create_video(handler: Any) -> None:
    form = _form(handler)
    if not form.get("prompt"):
        handler._send_error(400, "Missing required parameter: 'prompt' (fake provider).")
        return
    seconds = form.get("seconds", "4")
    if seconds not in _SECONDS:
        handler._send_error(
            400, f"Invalid value for seconds: {seconds!r}; supported: 4, 8, 12 (fake provider)."
        )
        return
    job = {
        "id": f"video_{uuid.uuid4().hex[:24]}",
        "object": "video",
        "created_at": int(time.time()),
        "model": form.get("model", "sora-2"),
        "prompt": form["prompt"],
        "progress": 0,
        "seconds": seconds,
        "size": form.get("size", "720x1280"),
        "status": "queued",
        "_polls": 0,
    }
    handler.fake.media.jobs[job["id"]] = job
    handler._send_json(200, _video_object(job))


def _retrieve_video(handler: Any, video_id: str) -> None:
    state = handler.fake.media
    job = state.jobs.get(video_id)
    if job is None:
        handler._send_error(404, f"Video {video_id} not found (fake provider).")
        return
    if job["status"] in ("queued", "in_progress"):
        job["_polls"] += 1
        done = job["_polls"] >= state.video_polls
        job["progress"] = 100 if done else int(100 * job["_polls"] / state.video_polls)
        job["status"] = ("failed" if state.video_failure else "completed") if done else "in_progress"
        if done and state.video_failure:
            job["error"] = {"code": "moderation_blocked", "message": state.video_failure}
        if done and not state.video_failure:
            job["completed_at"] = int(time.time())
    headers = {"openai-poll-after-ms": str(state.poll_after_ms)}
    handler._send_bytes(200, json.dumps(_video_object(job)).encode(), "application/json", headers)


def _video_content(handler: Any, video_id: str) -> None:
    job = handler.fake.media.jobs.get(video_id)
    if job is None:
        handler._send_error(404, f"Video {video_id} not found (fake provider).")
    elif job["status"] != "completed":
        handler._send_error(409, f"Video {video_id} is not ready: {job['status']} (fake provider).")
    else:
        handler._send_bytes(200, handler.fake.media.video_content, "video/mp4", None)


def _file(handler: Any, name: str) -> None:
    data = handler.fake.media.files.get(name)
    if data is None:
        handler._send_error(404, f"No file {name} (fake provider).")
    else:
        handler._send_bytes(200, data, "video/mp4" if name.endswith(".mp4") else "image/png", None)


def _gemini_image(handler: Any, model: str) -> None:
    body = handler._body
    parts = [p for c in body.get("contents") or [] for p in c.get("parts") or []]
    prompt = " ".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    if not prompt:
        handler._send_error(400, "* GenerateContentRequest.contents: contents is not specified")
        return
    usage = {"promptTokenCount": len(prompt.split()), "candidatesTokenCount": 1290, "totalTokenCount": 1290}
    block = handler.fake.media.gemini_block
    if block:
        handler._send_json(200, {"promptFeedback": {"blockReason": block}, "usageMetadata": usage})
        return
    config = (body.get("generationConfig") or {}).get("imageConfig") or {}
    longest = _TIER_PIXELS.get(config.get("imageSize", "1K"), 1024)
    across, down = (int(v) for v in config.get("aspectRatio", "1:1").split(":"))
    width, height = (
        (longest, round(longest * down / across))
        if across >= down
        else (round(longest * across / down), longest)
    )
    seed = (body.get("generationConfig") or {}).get("seed")
    image = png(width, height, seed=f"{prompt}#{seed}#{len(parts)}")
    inline = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image).decode()}}
    candidate = {"content": {"role": "model", "parts": [inline]}, "finishReason": "STOP", "index": 0}
    handler._send_json(200, {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model})
