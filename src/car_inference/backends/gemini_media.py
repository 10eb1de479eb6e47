"""Hosted image generation on Gemini's native image models (Nano Banana), through google-genai
(video: gemini_video.py).

Mixed into the Gemini backend. An image is a ``generateContent`` call with
``response_modalities=["IMAGE"]``: the prompt, then the images to edit as inline parts; the answer
carries the picture as an inline part. Gemini takes an aspect ratio and a size tier rather than
pixels, so a width and height the caller set become ``image_config`` (the ratio must be one Gemini
offers; the tier is the smallest that holds the longer side) and the result reports the size
that came back. A seed goes out as ``seed``; ``variant_count`` makes that many calls. Negative
prompts, steps, guidance and masks are not part of this API: asking for one is
``UnsupportedMode``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from ..errors import InferenceError, ProviderError, UnsupportedMode
from ..requests import GenerateImageRequest, GenerateImageResult
from ..schema import ModelSchema
from .gemini_video import GeminiVideoMixin
from .media_files import output_path, read_upload, refuse_unset, variant_path, write_atomic

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .remote import Endpoint

__all__ = ["ASPECT_RATIOS", "GeminiMediaMixin"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
_TIERS = ((1024, "1K"), (2048, "2K"), (4096, "4K"))
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


class GeminiMediaMixin(GeminiVideoMixin):
    """``generate_image`` for the Gemini backend (its ``make_client`` returns a ``genai.Client``);
    ``generate_video`` comes from ``GeminiVideoMixin`` (gemini_video.py)."""

    if TYPE_CHECKING:  # provided by RemoteBackend
        kind: ClassVar[str]

        def with_keys(self, model: ModelSchema, call: Callable[[Any, Endpoint], Awaitable[Any]]) -> Any: ...

    async def generate_image(
        self, model: ModelSchema, request: GenerateImageRequest, progress: Progress | None = None
    ) -> GenerateImageResult:
        from google.genai import types

        refuse_unset(
            self.kind, model, request, ("negative_prompt", "steps", "guidance", "mask_path"), "Gemini"
        )
        if request.format != "png":
            raise UnsupportedMode(f"image/{request.format}", self.kind, f"{model.id} answers png images")
        target = output_path(request.output_path, request.format, "car-image-")
        image_config = None
        if {"width", "height"} & request.model_fields_set:
            image_config = types.ImageConfig(**_image_config(self.kind, model, request.width, request.height))
        count = request.variant_count or 1
        # Variant i with seed + i, as local models make them: one seed for all made n paid copies.
        configs = [
            types.GenerateContentConfig(
                response_modalities=["IMAGE"],
                seed=None if request.seed is None else request.seed + i,
                image_config=image_config,
            )
            for i in range(count)
        ]
        parts = [types.Part(text=request.prompt)]
        for image_path in request.image_paths:
            _, data, media_type = read_upload(image_path)
            parts.append(types.Part.from_bytes(data=data, mime_type=media_type))
        contents = [types.Content(role="user", parts=parts)]

        def call_with(config: Any) -> Any:
            async def call(client: Any, endpoint: Endpoint) -> Any:
                return await client.aio.models.generate_content(
                    model=endpoint.wire_model, contents=contents, config=config
                )

            return call

        answers = await asyncio.gather(
            *(self.with_keys(model, call_with(c)) for c in configs), return_exceptions=True
        )
        images = _made(model, answers)
        paths = [variant_path(target, i) for i in range(len(images))]
        for (data, _), path in zip(images, paths, strict=True):
            write_atomic(path, data)
        if progress is not None:
            progress(1, 1)
        width, height = _png_size(images[0][0])
        return GenerateImageResult(
            image_path=str(target),
            media_type=images[0][1],
            model_used=model.id,
            width=width,
            height=height,
            seed=request.seed,
            image_paths=[str(p) for p in paths],
        )


def _made(model: ModelSchema, answers: list[Any]) -> list[tuple[bytes, str]]:
    """The images of the variants that came back. One that failed no longer discards the others
    (made and paid for): they are kept, and the failure is logged; when none came, the first
    failure is the answer."""
    images, failures = [], []
    for answer in answers:
        if isinstance(answer, BaseException):
            failures.append(answer)
            continue
        try:
            images.append(_image_of(model, answer))
        except InferenceError as exc:
            failures.append(exc)
    if not images:
        raise failures[0]
    if failures:
        log.warning("%s: %d of %d images failed: %s", model.id, len(failures), len(answers), failures[0])
    return images


class _ImageSize(TypedDict):
    """The ``ImageConfig`` fields a width and height set."""

    aspect_ratio: str
    image_size: str


def _image_config(kind: str, model: ModelSchema, width: int, height: int) -> _ImageSize:
    """Gemini's ``aspect_ratio`` and ``image_size`` for a width and height."""
    divisor = math.gcd(width, height)
    ratio = f"{width // divisor}:{height // divisor}"
    if ratio not in ASPECT_RATIOS:
        raise UnsupportedMode(
            f"size {width}x{height}", kind, f"{model.id} makes the aspect ratios {', '.join(ASPECT_RATIOS)}"
        )
    longest = max(width, height)
    tier = next((name for side, name in _TIERS if longest <= side), None)
    if tier is None:
        raise UnsupportedMode(f"size {width}x{height}", kind, f"{model.id} makes images up to 4096 pixels")
    return {"aspect_ratio": ratio, "image_size": tier}


def _image_of(model: ModelSchema, response: Any) -> tuple[bytes, str]:
    """The first inline image of an answer and its media type; a ProviderError saying why not."""
    for candidate in response.candidates or []:
        for part in getattr(candidate.content, "parts", None) or []:
            inline = part.inline_data
            if inline is not None and inline.data and (inline.mime_type or "").startswith("image/"):
                # A media type we do not know is reported as png, what Gemini sends.
                media_type = inline.mime_type if inline.mime_type in _EXTENSIONS else "image/png"
                return inline.data, media_type
    feedback = getattr(response, "prompt_feedback", None)
    reason = getattr(feedback, "block_reason", None)
    if reason is None and response.candidates:
        reason = response.candidates[0].finish_reason
    why = f"blocked ({getattr(reason, 'value', reason)})" if reason not in (None, "STOP") else "no image"
    raise ProviderError(f"the answer holds no image: {why}", provider="gemini", model=model.id)


def _png_size(data: bytes) -> tuple[int | None, int | None]:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return None, None
