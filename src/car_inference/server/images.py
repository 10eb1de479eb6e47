"""Image edits and video jobs over HTTP, and the JSON-RPC media methods.

``/v1/images/generations`` lives in ``media.py``; this module adds, in OpenAI's shapes so the
``openai`` SDK works against the server:

- ``POST /v1/images/edits``: multipart, ``image`` (or ``image[]``) files, optional ``mask``,
  ``prompt``, ``model``, ``n``, ``size``, ``output_format``; answers ``b64_json`` images.
- ``POST /v1/videos`` starts a job (multipart or JSON: ``prompt``, ``model``, ``seconds``,
  ``size``, optional ``input_reference`` image; extensions ``fps``, ``seed``, ``steps``,
  ``guidance``, ``negative_prompt``) and answers a ``video`` object at once; ``GET
  /v1/videos/{id}`` reports status and progress, ``GET /v1/videos/{id}/content`` serves the mp4
  when it is done, ``DELETE /v1/videos/{id}`` forgets it. Jobs live in this process's memory
  (the last ``MAX_JOBS``); a job holds no request slot while it runs.
- JSON-RPC ``generate_image`` / ``generate_video``: the request fields by name (no server paths:
  images to edit come as base64 ``images``/``mask``), answered with the files as base64, and
  ``generate.progress`` notifications ``{"request_id", "done", "total"}`` as steps finish.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from ..errors import InferenceError
from ..requests import GenerateImageRequest, GenerateVideoRequest, VideoMode
from ..schema import ModelCapability
from .common import ServerState, car_headers, client_of, json_response, read_json, refuse_fields
from .errors import ApiError, describe, guarded, validated
from .media import IMAGE_FIELD_NAMES, OPENAI_IMAGE_DEFAULTS, FormField, _without_path, parse_multipart

__all__ = ["IMAGES", "MAX_JOBS", "VIDEOS", "register", "rpc_generate_image", "rpc_generate_video"]

IMAGES = "image_generation"
# Our request fields as OpenAI's video requests name them, for error messages.
_VIDEO_NAMES = {"duration_s": "seconds", "width": "size", "height": "size", "image_path": "input_reference"}
VIDEOS = "video_generation"
MAX_JOBS = 64
PROGRESS_METHOD = "generate.progress"
_SERVER_PATHS = ("output_path", "image_paths", "mask_path", "image_path", "audio_path")


# --- shared field parsing ---------------------------------------------------------------------------


def _model(value: Any) -> str | None:
    if value in (None, "", "auto"):
        return None
    if not isinstance(value, str):
        raise ApiError(400, "`model` must be a string", param="model")
    return value


def _size(value: Any) -> dict[str, int]:
    if value in (None, "", "auto"):
        return {}
    try:
        width, height = (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise ApiError(400, "`size` must be WIDTHxHEIGHT, e.g. 1024x1024", param="size") from None
    return {"width": width, "height": height}


def _number(value: Any, name: str, kind: type = int, *, text: bool = False) -> Any:
    """``value`` as ``kind``: a JSON number (a whole one for int: 1.5 frames a second was read as
    1), or, where ``text`` (a multipart form field), the text of one."""
    if value is None or (text and value == ""):
        return None
    if isinstance(value, bool) or (isinstance(value, str) and not text):
        raise ApiError(400, f"`{name}` must be a number", param=name)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ApiError(400, f"`{name}` must be a whole number", param=name)
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, f"`{name}` must be a number", param=name) from None
    if not math.isfinite(number):
        raise ApiError(400, f"`{name}` must be a finite number", param=name)
    return number


def _images_payload(paths: list[str], fmt: str) -> dict[str, Any]:
    data = [{"b64_json": base64.b64encode(Path(p).read_bytes()).decode()} for p in paths]
    return {"created": int(time.time()), "data": data, "output_format": fmt}


# --- video jobs ------------------------------------------------------------------------------------


@dataclass
class _Job:
    id: str
    prompt: str
    model: str | None
    seconds: str
    size: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    error: dict[str, str] | None = None
    path: Path | None = None
    media_type: str = "video/mp4"
    task: asyncio.Task[None] | None = None
    owner: str | None = None  # the client that made it (client_of), for its share of jobs

    def video(self) -> dict[str, Any]:
        """The job as OpenAI's ``video`` object."""
        return {
            "id": self.id,
            "object": "video",
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "error": self.error,
            "expires_at": None,
            "model": self.model or "auto",
            "progress": self.progress,
            "prompt": self.prompt,
            "seconds": self.seconds,
            "size": self.size,
            "status": self.status,
        }


class _Jobs:
    """The server's video jobs, newest last; finished ones beyond MAX_JOBS are forgotten."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.jobs: dict[str, _Job] = {}
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        """Where finished videos wait to be fetched: made on the first job (a server that never
        makes a video leaves no folder behind), removed with the server."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="car-videos-"))
            remove = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
            # On the app's shutdown too: a SIGTERM (systemd, docker) ends the process without
            # running exit hooks, and every finished video stayed in /tmp.
            self.state.on_shutdown.append(remove)
        return self._folder

    def running(self, owner: str | None = None) -> int:
        """Jobs not finished: all of them, or ``owner``'s."""
        return sum(
            j.status in ("queued", "in_progress") and (owner is None or j.owner == owner)
            for j in self.jobs.values()
        )

    def start(
        self, request: GenerateVideoRequest, workdir: Path, shown: str, owner: str | None = None
    ) -> _Job:
        """Run ``request`` as a job; ``shown`` is the model its object names until it is done (the
        router's first choice for a request naming none, which still goes on to the next model
        when that one cannot take it)."""
        size = f"{request.width}x{request.height}" if "width" in request.model_fields_set else "auto"
        job = _Job(
            f"video_{uuid.uuid4().hex}", request.prompt, shown, f"{request.duration_s:g}", size, owner=owner
        )
        target = self.folder / f"{job.id}.{request.format}"
        job.task = asyncio.create_task(
            self._run(job, request.model_copy(update={"output_path": str(target)}), workdir)
        )
        # A server that stops cuts running jobs short, like the requests it is answering.
        self.state.active.add(job.task)
        job.task.add_done_callback(self.state.active.discard)
        self.jobs[job.id] = job
        self._trim()
        return job

    async def _run(self, job: _Job, request: GenerateVideoRequest, workdir: Path) -> None:
        loop = asyncio.get_running_loop()

        def report(done: int, total: int) -> None:
            percent = int(100 * done / total) if total else 0
            loop.call_soon_threadsafe(setattr, job, "progress", percent)

        job.status = "in_progress"
        try:
            result = await self.state.engine.generate_video(request, progress=report)
        except Exception as exc:
            if isinstance(exc, InferenceError):
                exc = _without_path(
                    _without_path(exc, workdir, "`input_reference`"), self.folder, "the video"
                )
            info = describe(exc, capability=VIDEOS)
            job.status, job.error = "failed", {"code": info.code or "error", "message": info.message}
        else:
            job.status, job.progress, job.completed_at = "completed", 100, int(time.time())
            job.path, job.media_type, job.model = (
                Path(result.video_path),
                result.media_type,
                result.model_used,
            )
            # What was made, not what was asked (a model that picks its length made 10 s of "4").
            if result.duration_s:
                job.seconds = f"{result.duration_s:g}"
            if result.width and result.height:
                job.size = f"{result.width}x{result.height}"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def get(self, video_id: str, request: Request) -> _Job:
        """The job, for the client that made it: on a server with API keys another key's job is
        unknown (any key holder could read, download and delete any job whose id it had)."""
        job = self.jobs.get(video_id)
        keyed = bool(self.state.settings.api_keys)
        if job is None or (keyed and job.owner != client_of(request.scope, keyed)):
            raise ApiError(404, f"no video job {video_id}", type="invalid_request_error", code="not_found")
        return job

    def forget(self, job: _Job) -> None:
        self.jobs.pop(job.id, None)
        if job.task is not None:
            job.task.cancel()
        if job.path is not None:
            job.path.unlink(missing_ok=True)

    def _trim(self) -> None:
        finished = [j for j in self.jobs.values() if j.status in ("completed", "failed")]
        for job in finished[: max(0, len(self.jobs) - MAX_JOBS)]:
            self.forget(job)


# --- routes ----------------------------------------------------------------------------------------


_EDIT_FIELDS = frozenset(
    {"image", "mask", "prompt", "model", "n", "size", "response_format", "output_format", "user"}
)
# A JSON `format` was ignored (an mp4 came for a gif asked for): what /v1/videos takes.
_VIDEO_FIELDS = frozenset(
    {"prompt", "model", "seconds", "size", "input_reference", "fps", "seed", "steps", "guidance",
     "negative_prompt", "user"}
)  # fmt: skip


def register(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    timeout_s = state.settings.request_timeout_s
    jobs = _Jobs(state)

    @guarded(IMAGES, timeout_s=timeout_s)
    async def edits(request: Request) -> Response:
        fields = parse_multipart(await request.body(), request.headers.get("content-type", ""))
        refuse_fields({k: f.text for k, f in fields.items()}, _EDIT_FIELDS, OPENAI_IMAGE_DEFAULTS)
        uploads = fields.listed("image")
        prompt = fields["prompt"].text if "prompt" in fields else ""
        if not uploads or not all(f.value for f in uploads):
            raise ApiError(400, "the `image` file to edit is required", param="image")
        if not prompt:
            raise ApiError(400, "`prompt` must say how to change the image", param="prompt")
        if "response_format" in fields and fields["response_format"].text != "b64_json":  # url: None came
            raise ApiError(400, "only response_format b64_json is supported", param="response_format")
        fmt = fields["output_format"].text if "output_format" in fields else "png"
        workdir = Path(tempfile.mkdtemp(prefix="car-edit-"))
        try:
            mask = fields.get("mask")
            call = validated(
                GenerateImageRequest,
                {
                    "prompt": prompt,
                    "model": _model(fields["model"].text if "model" in fields else None),
                    "variant_count": _number(fields["n"].text, "n", text=True) if "n" in fields else None,
                    "image_paths": [_save(workdir, f"image{i}", f) for i, f in enumerate(uploads)],
                    "mask_path": _save(workdir, "mask", mask) if mask is not None and mask.value else None,
                    "format": fmt,
                    "output_path": str(workdir / f"out.{fmt}"),
                }
                | _size(fields["size"].text if "size" in fields else None),
                IMAGE_FIELD_NAMES,
            )
            async with asyncio.timeout(timeout_s):
                result = await engine.generate_image(call)
            payload = _images_payload(result.image_paths or [result.image_path], fmt)
        except InferenceError as exc:  # named as the client sent it: "the image cat.png"
            named = uploads[0].filename if len(uploads) == 1 and uploads[0].filename else "`image`"
            raise _without_path(exc, workdir, named) from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return json_response(payload, headers=car_headers(result.model_used))

    @guarded(VIDEOS, timeout_s=timeout_s)
    async def create_video(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            fields = parse_multipart(await request.body(), content_type)
            body: dict[str, Any] = {k: f.text for k, f in fields.items() if f.filename is None}
            reference, form = fields.get("input_reference"), True
        else:
            body, reference, form = await read_json(request), None, False
        refuse_fields(body, _VIDEO_FIELDS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must describe the video", param="prompt")
        workdir = Path(tempfile.mkdtemp(prefix="car-video-in-"))
        try:
            inline = None if form else body.get("input_reference")  # JSON: base64 or a data: URL
            if inline is not None:  # it was taken and dropped: the job ran as text-to-video
                image: str | None = _decode(inline, "input_reference", workdir, "reference")
            else:
                image = (
                    _save(workdir, "reference", reference)
                    if reference is not None and reference.value
                    else None
                )
            options = {
                "duration_s": _number(body.get("seconds"), "seconds", float, text=True),  # OpenAI: "4"
                "fps": _number(body.get("fps"), "fps", text=form),
                "seed": _number(body.get("seed"), "seed", text=form),
                "steps": _number(body.get("steps"), "steps", text=form),
                "guidance": _number(body.get("guidance"), "guidance", float, text=form),
                "negative_prompt": body.get("negative_prompt"),
                **_size(body.get("size")),
            }
            wanted = {
                "prompt": prompt,
                "model": _model(body.get("model")),
                "mode": VideoMode.IMAGE_TO_VIDEO if image else VideoMode.TEXT_TO_VIDEO,
                "image_path": image,
                **{k: v for k, v in options.items() if v is not None},
            }
            call = validated(GenerateVideoRequest, wanted, _VIDEO_NAMES)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        owner = client_of(request.scope, bool(state.settings.api_keys))
        try:  # an unknown or unusable model, or one refusing this request, is its error, not a failed job
            model = engine.media_model(call.model, ModelCapability.VIDEO_GENERATION, call)
            _job_room(jobs, state, owner)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        # A request naming no model stays routed: its first model's refusal (``steps`` on a hosted
        # one, a spend limit) hands it on, as over JSON-RPC (a pinned first choice failed the job).
        return json_response(jobs.start(call, workdir, model.id, owner).video())

    @guarded(VIDEOS)
    async def retrieve_video(request: Request) -> Response:
        return json_response(jobs.get(request.path_params["video_id"], request).video())

    @guarded(VIDEOS)
    async def video_content(request: Request) -> Response:
        job = jobs.get(request.path_params["video_id"], request)
        if job.status != "completed" or job.path is None:
            raise ApiError(409, f"video job {job.id} is {job.status}, not completed", code="video_not_ready")
        return Response(job.path.read_bytes(), media_type=job.media_type, headers=car_headers(job.model))

    @guarded(VIDEOS)
    async def delete_video(request: Request) -> Response:
        job = jobs.get(request.path_params["video_id"], request)
        jobs.forget(job)
        return json_response({"id": job.id, "object": "video.deleted", "deleted": True})

    app.add_route("/v1/images/edits", edits, methods=["POST"])
    app.add_route("/v1/videos", create_video, methods=["POST"])
    app.add_route("/v1/videos/{video_id}", retrieve_video, methods=["GET"])
    app.add_route("/v1/videos/{video_id}", delete_video, methods=["DELETE"])
    app.add_route("/v1/videos/{video_id}/content", video_content, methods=["GET"])


def _save(folder: Path, stem: str, upload: FormField) -> str:
    # The client's file name only lends its suffix, and only letters and digits of that.
    suffix = "." + "".join(c for c in Path(upload.filename or "").suffix if c.isascii() and c.isalnum())[:7]
    suffix = suffix if len(suffix) > 1 else ".png"
    path = folder / f"{stem}{suffix}"
    path.write_bytes(upload.value)
    return str(path)


# --- JSON-RPC --------------------------------------------------------------------------------------


_RPC_FILES = ("images", "mask", "image")  # base64 files, by method: generate_image's, generate_video's


_RPC_AUTO = frozenset({"model", "size", "quality", "background"})


def _rpc_fields(params: dict[str, Any], files: tuple[str, ...]) -> dict[str, Any]:
    """The request fields a remote caller may set: never a path on the server, and only this
    method's files (``image`` on generate_image, ``images`` on generate_video were dropped
    without a word, and an unrelated picture came back)."""
    for key in _SERVER_PATHS:
        if key in params:
            raise ApiError(400, f"`{key}` names a file on the server; send images as base64", param=key)
    for key in _RPC_FILES:
        if key in params and key not in files:
            hint = f"; did you mean `{files[0]}`?" if files else ""
            raise ApiError(400, f"`{key}` is not a parameter of this method{hint}", param=key)
    # "auto" is the default only where it means one (`prompt: "auto"` is a prompt)
    return {k: v for k, v in params.items() if k not in _RPC_FILES and not (k in _RPC_AUTO and v == "auto")}


def _decode(value: Any, name: str, folder: Path, stem: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"`{name}` must be base64 image data", param=name)
    try:
        data = base64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"`{name}` is not valid base64", param=name) from None
    path = folder / (stem + _suffix(data))
    path.write_bytes(data)
    return str(path)


def _suffix(data: bytes) -> str:
    """The file suffix for image bytes by their magic number (hosted APIs go by the name)."""
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    return ".webp" if data[8:12] == b"WEBP" else ".png"


def _job_room(jobs: _Jobs, state: ServerState, owner: str | None) -> None:
    """429 when the server runs ``max_concurrency`` jobs (each holds a worker thread), or this
    client its ``max_in_flight_per_client`` (one API key started as many jobs as the server
    takes, and every other client's first video was refused)."""
    settings = state.settings
    per_client = settings.max_in_flight_per_client
    if per_client and owner is not None and jobs.running(owner) >= per_client:
        raise ApiError(
            429,
            f"this client has {per_client} video jobs running, its limit "
            "([server] max_in_flight_per_client); wait for one to finish",
            type="rate_limit_error",
            code="client_busy",
            retry_after=5,
        )
    if jobs.running() >= settings.max_concurrency:
        raise ApiError(
            429,
            f"{jobs.running()} video jobs are running, the server's limit (max_concurrency)",
            type="rate_limit_error",
            code="server_busy",
            retry_after=5,
        )


def _progress(session: Any, rid: Any) -> Callable[[int, int], None]:
    loop = asyncio.get_running_loop()

    def report(done: int, total: int) -> None:
        params = {"request_id": rid, "done": done, "total": total}
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(session.notify(PROGRESS_METHOD, params)))

    return report


async def rpc_generate_image(session: Any, params: dict[str, Any], rid: Any) -> Any:
    fields = _rpc_fields(params, ("images", "mask"))
    images = params.get("images") or []
    if not isinstance(images, list):
        raise ApiError(400, "`images` must be a list of base64 images", param="images")
    workdir = Path(tempfile.mkdtemp(prefix="car-rpc-image-"))
    try:
        fields["image_paths"] = [_decode(v, "images", workdir, f"in{i}") for i, v in enumerate(images)]
        if params.get("mask") is not None:
            fields["mask_path"] = _decode(params["mask"], "mask", workdir, "mask")
        target = workdir / f"out.{fields.get('format', 'png')}"
        request = GenerateImageRequest.model_validate({**fields, "output_path": str(target)})
        result = await session.engine.generate_image(request, progress=_progress(session, rid))
        data = [
            base64.b64encode(Path(p).read_bytes()).decode() for p in result.image_paths or [result.image_path]
        ]
    except InferenceError as exc:
        raise _without_path(exc, workdir, "`images`") from None  # "the image `images`", the parameter
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    answer = result.model_dump(mode="json", exclude={"image_path", "image_paths"})
    return {**answer, "images": data}


async def rpc_generate_video(session: Any, params: dict[str, Any], rid: Any) -> Any:
    fields = _rpc_fields(params, ("image",))
    workdir = Path(tempfile.mkdtemp(prefix="car-rpc-video-"))
    try:
        if params.get("image") is not None:
            fields["image_path"] = _decode(params["image"], "image", workdir, "first")
            fields.setdefault("mode", VideoMode.IMAGE_TO_VIDEO.value)
        target = workdir / f"out.{fields.get('format', 'mp4')}"
        request = GenerateVideoRequest.model_validate({**fields, "output_path": str(target)})
        result = await session.engine.generate_video(request, progress=_progress(session, rid))
        data = base64.b64encode(Path(result.video_path).read_bytes()).decode()
    except InferenceError as exc:
        raise _without_path(exc, workdir, "`image`") from None  # the first frame was called "the video"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {**result.model_dump(mode="json", exclude={"video_path"}), "video": data}
