"""Hosted video on Gemini (Gemini Omni Flash) through google-genai's Interactions API.

Video generation on the Gemini API is an interaction (``client.aio.interactions.create``, ``POST
/v1beta/interactions``), not ``generateContent``: Veo's ``predictLongRunning`` is no longer served
to API keys, and google-genai 3.x refuses ``generate_videos`` outside Vertex. The interaction runs
in the background (``background=True``) and is polled with ``interactions.get`` until it is
``completed`` (the video is the ``model_output`` step's ``video`` content, as base64 data or a
URI fetched with the same key) or ends otherwise (a ``ProviderError`` naming the status and the
interaction's errors). Every poll uses the key that created the interaction: it belongs to its
account.

The API takes the prompt, a start image (``image_to_video``) and a seed; the model picks the
length (3-10 s), the frame rate and the size (720p, 16:9 or 9:16). A duration, size or frame rate
the caller set, a negative prompt, steps, guidance or audio are refused (``UnsupportedMode``),
never dropped. The result reports the length of what came back (read with PyAV when installed).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from ..errors import ProviderError, UnsupportedMode
from ..requests import GenerateVideoRequest, GenerateVideoResult, VideoMode
from ..schema import ModelSchema
from .media_files import VIDEO_MEDIA_TYPES, output_path, read_upload, refuse_unset, write_atomic

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .remote import Endpoint

__all__ = ["GeminiVideoMixin", "interaction_connection_failed", "interaction_status_error"]

Progress = Callable[[int, int], None]

VIDEO_DEADLINE_S = 1800.0  # an interaction that has not finished in half an hour is given up
_FIRST_POLL_S, _MAX_POLL_S = 0.05, 5.0  # polls back off from 50 ms to 5 s
_MAX_REDIRECTS = 5
_PENDING = ("queued", "in_progress")
_REFUSED = ("negative_prompt", "steps", "guidance", "audio_path")
_CHOSEN_BY_MODEL = ("duration_s", "width", "height", "fps")


class GeminiVideoMixin:
    """``generate_video`` for the Gemini backend (its ``make_client`` returns a ``genai.Client``)."""

    if TYPE_CHECKING:  # provided by RemoteBackend
        kind: ClassVar[str]

        def with_keys(self, model: ModelSchema, call: Callable[[Any, Endpoint], Awaitable[Any]]) -> Any: ...
        def translate(
            self, exc: Exception, endpoint: Endpoint, model: ModelSchema, key: str
        ) -> ProviderError | None: ...

    async def generate_video(
        self, model: ModelSchema, request: GenerateVideoRequest, progress: Progress | None = None
    ) -> GenerateVideoResult:
        request_input, task = self._video_input(model, request)
        target = output_path(request.output_path, request.format, "car-video-")
        config: dict[str, Any] = {"video_config": {"task": task}}
        if request.seed is not None:
            config["seed"] = request.seed
        owner: list[tuple[Any, Endpoint]] = []

        async def create(client: Any, endpoint: Endpoint) -> Any:
            started = await client.aio.interactions.create(
                model=endpoint.wire_model,
                input=request_input,
                response_modalities=["video"],
                generation_config=config,
                background=True,
            )
            owner.append((client, endpoint))
            return started

        interaction = await self.with_keys(model, create)
        client, endpoint = owner[-1]
        if progress is not None:
            progress(0, 1)
        interaction = await self._finish(model, client, endpoint, interaction)
        data = await self._video_bytes(model, client, endpoint, interaction)
        write_atomic(target, data)
        if progress is not None:
            progress(1, 1)
        return GenerateVideoResult(
            video_path=str(target),
            media_type=VIDEO_MEDIA_TYPES["mp4"],
            model_used=model.id,
            duration_s=_seconds(data),
            seed=request.seed,
        )

    def check_video(self, model: ModelSchema, request: GenerateVideoRequest) -> None:
        """What the interaction has no place for, refused before anything is sent."""
        refuse_unset(self.kind, model, request, _REFUSED, "Gemini")
        for field in _CHOSEN_BY_MODEL:
            if field in request.model_fields_set:
                raise UnsupportedMode(
                    field, self.kind, f"{model.id} picks the length (3-10 s), size and frame rate itself"
                )
        if request.mode is VideoMode.AUDIO_TO_VIDEO:
            raise UnsupportedMode(
                str(request.mode), self.kind, f"{model.id} makes video from text or an image"
            )
        if request.format != "mp4":
            raise UnsupportedMode(f"video/{request.format}", self.kind, f"{model.id} makes mp4 only")

    def _video_input(self, model: ModelSchema, request: GenerateVideoRequest) -> tuple[list[Any], str]:
        self.check_video(model, request)
        content: list[dict[str, Any]] = [{"type": "text", "text": request.prompt}]
        if request.image_path:
            _, data, media_type = read_upload(request.image_path)
            content.append(
                {"type": "image", "data": base64.b64encode(data).decode(), "mime_type": media_type}
            )
        return content, "image_to_video" if request.image_path else "text_to_video"

    async def _finish(self, model: ModelSchema, client: Any, endpoint: Endpoint, interaction: Any) -> Any:
        """Poll until the interaction ends; anything but ``completed`` is a ProviderError."""
        deadline = time.monotonic() + VIDEO_DEADLINE_S
        wait_s = _FIRST_POLL_S
        while interaction.status in _PENDING:
            if time.monotonic() + wait_s > deadline:
                raise ProviderError(
                    f"video interaction {interaction.id} did not finish in {VIDEO_DEADLINE_S:.0f} s",
                    provider=endpoint.provider,
                    model=model.id,
                    retryable=True,
                    timeout=True,
                )
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, _MAX_POLL_S)
            interaction = await self._on(model, client, endpoint, client.aio.interactions.get(interaction.id))
        if interaction.status != "completed":
            errors = "; ".join(str(e.message or e.code) for e in interaction.errors or ())
            raise ProviderError(
                f"video interaction {interaction.id} ended {interaction.status}"
                + (f": {errors}" if errors else ""),
                provider=endpoint.provider,
                model=model.id,
            )
        return interaction

    async def _video_bytes(
        self, model: ModelSchema, client: Any, endpoint: Endpoint, interaction: Any
    ) -> bytes:
        video = interaction.output_video
        if video is not None and video.data:
            try:
                return base64.b64decode(video.data, validate=True)
            except (binascii.Error, ValueError):
                raise ProviderError(
                    "the video in the answer is not valid base64", provider=endpoint.provider, model=model.id
                ) from None
        if video is not None and video.uri:
            return await self._download(model, client, endpoint, str(video.uri))
        raise ProviderError(
            f"video interaction {interaction.id} completed without a video",
            provider=endpoint.provider,
            model=model.id,
        )

    async def _download(self, model: ModelSchema, client: Any, endpoint: Endpoint, uri: str) -> bytes:
        """A video the answer only links to, fetched with the key that made it. Redirects are
        followed here: the key (and the host's headers) go only to the link's own origin, never
        to where a redirect points (httpx drops only ``Authorization`` on the way)."""
        key = str(getattr(client._api_client, "api_key", "") or "")
        mine = {**dict(endpoint.headers), "x-goog-api-key": key}
        url = origin = httpx.URL(uri)
        try:
            async with httpx.AsyncClient(follow_redirects=False, timeout=120) as http:
                for _ in range(_MAX_REDIRECTS + 1):
                    same = (url.scheme, url.host, url.port) == (origin.scheme, origin.host, origin.port)
                    response = await http.get(url, headers=mine if same else {})
                    if not response.is_redirect or "location" not in response.headers:
                        break
                    url = url.join(response.headers["location"])
        except httpx.HTTPError as exc:
            raise ProviderError(
                f"downloading the video failed: {type(exc).__name__}",
                provider=endpoint.provider,
                model=model.id,
                retryable=True,
            ) from None
        if response.status_code != 200:
            raise ProviderError(
                f"downloading the video failed: HTTP {response.status_code}",
                provider=endpoint.provider,
                model=model.id,
                status=response.status_code,
            )
        return response.content

    async def _on(self, model: ModelSchema, client: Any, endpoint: Endpoint, call: Awaitable[Any]) -> Any:
        """One SDK call on a given client (the interaction's key), its errors translated."""
        try:
            return await call
        except Exception as exc:
            key = str(getattr(client._api_client, "api_key", "") or "")
            error = self.translate(exc, endpoint, model, key)
            if error is None:
                raise
            raise error from None


def interaction_status_error(exc: Exception) -> tuple[int, str, Any] | None:
    """(status, message, headers) of an error the Interactions client raised for an HTTP status
    (``google.genai._interactions_errors.APIStatusError``: matched by shape, the module is
    private), else None."""
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int) or not type(exc).__module__.startswith("google.genai"):
        return None
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    response = getattr(exc, "response", None)
    return status, str(message or exc), getattr(response, "headers", None)


def interaction_connection_failed(exc: Exception) -> bool:
    """The Interactions client's ``APIConnectionError`` (its ``APITimeoutError`` included),
    matched by name as the module is private: unmatched, an unreachable Gemini escaped as a
    traceback (`car video`) and an ``internal_error`` job (`car serve`)."""
    return type(exc).__module__.startswith("google.genai") and any(
        c.__name__ == "APIConnectionError" for c in type(exc).__mro__
    )


def _seconds(data: bytes) -> float | None:
    """The length of an mp4, through PyAV when installed (None otherwise or when unreadable)."""
    try:
        import io

        import av
    except ImportError:
        return None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return container.duration / 1_000_000 if container.duration else None
    except (OSError, ValueError):  # PyAV's errors derive from both
        return None
