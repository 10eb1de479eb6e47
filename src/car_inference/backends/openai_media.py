"""Hosted image and video generation on the OpenAI wire format, through the official SDK.

Mixed into the OpenAI-compatible backend, so every model of an ``openai`` source with the
``image_generation`` or ``video_generation`` capability runs here, on OpenAI or any host that
speaks the same endpoints. Keys rotate and errors translate as for chat (``with_keys``).

- Images: ``images.generate``, or ``images.edit`` when the request carries ``image_paths`` (and
  optionally ``mask_path``). ``variant_count`` is ``n``; width and height become ``size`` only
  when the caller set them; the format goes out as ``output_format`` when it is not png. GPT Image
  models answer with base64; a model that answers with a URL has it fetched. Steps, guidance,
  seed and a negative prompt are not part of this API: asking for one is ``UnsupportedMode``.
- Video: the asynchronous job flow, ``videos.create`` -> ``videos.retrieve`` until the job is
  completed or failed (waiting what the ``openai-poll-after-ms`` header says, as the SDK's own
  poller does) -> ``videos.download_content``. All three use the key that created the job: a
  job belongs to its account. Progress is the job's percentage. OpenAI shut its own Videos API
  (Sora 2) down on 2026-09-24; hosts serving the same ``/v1/videos`` endpoints still use it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InferenceError, InvalidInput, ProviderError, UnsupportedMode
from ..grounding import image_size
from ..requests import (
    GenerateImageRequest,
    GenerateImageResult,
    GenerateVideoRequest,
    GenerateVideoResult,
    VideoMode,
)
from ..schema import ModelSchema
from .media_files import (
    IMAGE_MEDIA_TYPES,
    VIDEO_MEDIA_TYPES,
    output_path,
    read_upload,
    refuse_unset,
    variant_path,
    write_atomic,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .remote import Endpoint

__all__ = ["OpenAIMediaMixin"]

Progress = Callable[[int, int], None]

VIDEO_DEADLINE_S = 1800.0  # a video job that has not finished in half an hour is given up
_DEFAULT_POLL_S = 1.0  # the SDK's poller waits a second when the server suggests nothing
_IMAGE_EXTRAS = ("negative_prompt", "steps", "guidance", "seed")
_VIDEO_EXTRAS = ("negative_prompt", "steps", "guidance", "seed")


class OpenAIMediaMixin:
    """``generate_image`` and ``generate_video`` for ``RemoteBackend`` subclasses built on the
    ``openai`` SDK (their ``make_client`` returns an ``openai.AsyncOpenAI``)."""

    if TYPE_CHECKING:  # provided by RemoteBackend
        kind: ClassVar[str]
        settings: Any

        def with_keys(self, model: ModelSchema, call: Callable[[Any, Endpoint], Awaitable[Any]]) -> Any: ...
        def endpoint(self, model: ModelSchema) -> Endpoint: ...
        def translate(
            self, exc: Exception, endpoint: Endpoint, model: ModelSchema, key: str
        ) -> ProviderError | None: ...

    # --- images --------------------------------------------------------------------------------

    async def generate_image(
        self, model: ModelSchema, request: GenerateImageRequest, progress: Progress | None = None
    ) -> GenerateImageResult:
        refuse_unset(self.kind, model, request, _IMAGE_EXTRAS, "OpenAI Images")
        if request.mask_path and not request.image_paths:
            raise InvalidInput("a mask needs an image to edit (image_paths)")
        target = output_path(request.output_path, request.format, "car-image-")
        options: dict[str, Any] = {"prompt": request.prompt}
        if request.variant_count is not None:
            options["n"] = request.variant_count
        if {"width", "height"} & request.model_fields_set:
            options["size"] = f"{request.width}x{request.height}"
        if request.format != "png":
            options["output_format"] = request.format
        files = [read_upload(p) for p in request.image_paths]
        mask = read_upload(request.mask_path) if request.mask_path else None

        async def call(client: Any, endpoint: Endpoint) -> Any:
            if not files:
                return await client.images.generate(model=endpoint.wire_model, **options)
            extra = {"mask": mask} if mask is not None else {}
            image = files if len(files) > 1 else files[0]
            return await client.images.edit(model=endpoint.wire_model, image=image, **options, **extra)

        response = await self.with_keys(model, call)
        images = [await self._image_data(model, item) for item in response.data or []]
        if not images:
            raise ProviderError("the answer holds no image", provider=model.provider, model=model.id)
        paths = [variant_path(target, i) for i in range(len(images))]
        for data, path in zip(images, paths, strict=True):
            write_atomic(path, data)
        if progress is not None:
            progress(1, 1)
        width, height = _size_of(getattr(response, "size", None))
        if width is None:  # the answer left `size` out (DALL-E style hosts): the image's own header
            with contextlib.suppress(InferenceError):
                width, height = image_size(images[0])
        return GenerateImageResult(
            image_path=str(target),
            media_type=IMAGE_MEDIA_TYPES[request.format],
            model_used=model.id,
            width=width,
            height=height,
            image_paths=[str(p) for p in paths],
        )

    async def _image_data(self, model: ModelSchema, item: Any) -> bytes:
        if getattr(item, "b64_json", None):
            try:
                return base64.b64decode(item.b64_json, validate=True)
            except ValueError as exc:
                raise ProviderError(
                    f"malformed image data: {exc}", provider=model.provider, model=model.id
                ) from None
        if getattr(item, "url", None):  # DALL-E style answers: the image is behind a URL for an hour
            return await self._download(model, item.url)
        raise ProviderError(
            "an image came back with neither data nor a URL", provider=model.provider, model=model.id
        )

    async def _download(self, model: ModelSchema, url: str) -> bytes:
        """An image URL fetched without our credentials: it points at the provider's storage."""
        import httpx2

        try:
            async with httpx2.AsyncClient(timeout=self.settings.timeout_s, follow_redirects=True) as http:
                response = await http.get(url)
        except httpx2.HTTPError as exc:
            raise ProviderError(
                f"could not fetch the image: {exc}", provider=model.provider, model=model.id, retryable=True
            ) from None
        if response.status_code >= 400:
            raise ProviderError(
                f"could not fetch the image from {url}",
                provider=model.provider,
                model=model.id,
                status=response.status_code,
            )
        return bytes(response.content)

    # --- video ---------------------------------------------------------------------------------

    def check_video(self, model: ModelSchema, request: GenerateVideoRequest) -> None:
        """What the Videos API has no place for, refused before anything is sent."""
        refuse_unset(self.kind, model, request, _VIDEO_EXTRAS, "the Videos API")
        if "fps" in request.model_fields_set:
            raise UnsupportedMode("fps", self.kind, f"{model.id} (the Videos API) picks its own frame rate")
        if request.mode is VideoMode.AUDIO_TO_VIDEO:
            raise UnsupportedMode(
                str(request.mode), self.kind, f"{model.id} makes video from text or an image"
            )
        if request.format != "mp4":
            raise UnsupportedMode(f"video/{request.format}", self.kind, f"{model.id} makes mp4 only")
        asked = request.duration_s
        if asked < 1 or asked != int(asked):  # 0.4 s went out as "0"; never adjusted
            raise UnsupportedMode(
                "duration_s", self.kind, f"{model.id} (the Videos API) makes whole seconds, not {asked:g}"
            )

    async def generate_video(
        self, model: ModelSchema, request: GenerateVideoRequest, progress: Progress | None = None
    ) -> GenerateVideoResult:
        self.check_video(model, request)
        asked = request.duration_s
        target = output_path(request.output_path, request.format, "car-video-")
        options: dict[str, Any] = {"prompt": request.prompt, "seconds": str(int(asked))}
        if {"width", "height"} & request.model_fields_set:
            options["size"] = f"{request.width}x{request.height}"
        if request.image_path:
            options["input_reference"] = read_upload(request.image_path)
        owner: list[tuple[Any, Endpoint]] = []

        async def create(client: Any, endpoint: Endpoint) -> Any:
            job = await client.videos.create(model=endpoint.wire_model, **options)
            owner.append((client, endpoint))
            return job

        job = await self.with_keys(model, create)
        client, endpoint = owner[-1]
        job = await self._finish(model, client, endpoint, job, progress)
        content = await self._on(
            model, client, endpoint, client.videos.download_content(job.id, variant="video")
        )
        write_atomic(target, content.content)
        seconds = getattr(job, "seconds", None)
        width, height = _size_of(getattr(job, "size", None))
        return GenerateVideoResult(
            video_path=str(target),
            media_type=VIDEO_MEDIA_TYPES["mp4"],
            model_used=model.id,
            duration_s=float(seconds) if seconds else None,
            width=width,
            height=height,
        )

    async def _finish(
        self, model: ModelSchema, client: Any, endpoint: Endpoint, job: Any, progress: Progress | None
    ) -> Any:
        """Poll the job until it completes; a failed or expired one is a ProviderError."""
        deadline = time.monotonic() + VIDEO_DEADLINE_S
        wait_s = _DEFAULT_POLL_S
        while job.status in ("queued", "in_progress"):
            if progress is not None:
                progress(int(job.progress or 0), 100)
            if time.monotonic() + wait_s > deadline:
                raise ProviderError(
                    f"video job {job.id} did not finish in {VIDEO_DEADLINE_S:.0f} s",
                    provider=endpoint.provider,
                    model=model.id,
                    retryable=True,
                    timeout=True,
                )
            await asyncio.sleep(wait_s)
            raw = await self._on(model, client, endpoint, client.videos.with_raw_response.retrieve(job.id))
            wait_s = _poll_after(raw.headers.get("openai-poll-after-ms"))
            job = raw.parse()
        if job.status != "completed":
            error = getattr(job, "error", None)
            reason = getattr(error, "message", None) or f"status {job.status}"
            raise ProviderError(
                f"video job {job.id} failed: {reason}", provider=endpoint.provider, model=model.id
            )
        if progress is not None:
            progress(100, 100)
        return job

    async def _on(self, model: ModelSchema, client: Any, endpoint: Endpoint, call: Awaitable[Any]) -> Any:
        """One SDK call on a given client, its errors translated like ``with_keys`` does."""
        try:
            return await call
        except Exception as exc:
            error = self.translate(exc, endpoint, model, str(getattr(client, "api_key", "")))
            if error is None:
                raise
            raise error from None


def _size_of(size: Any) -> tuple[int | None, int | None]:
    try:
        width, height = (int(v) for v in str(size).split("x"))
    except ValueError:
        return None, None
    return width, height


def _poll_after(header: str | None) -> float:
    try:
        return max(0.0, int(header or "") / 1000)
    except ValueError:
        return _DEFAULT_POLL_S
