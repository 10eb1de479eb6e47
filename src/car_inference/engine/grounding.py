"""``engine.ground``: boxes for a text target in an image, in pixels of that image.

A backend that grounds by itself (the embedded OCR grounder) is asked directly; any other
grounding model (a local GGUF VLM, Gemini, an OpenAI-compatible VLM host) gets one generate call
with the image and its family's grounding prompt, through the engine's ordinary generation path
(tracked, metered, breakers), and its answer is parsed (``grounding.parse_grounding``).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from ..errors import InvalidInput, ModelUnavailable, UnsupportedMode
from ..grounding import Grounder, grounding_prompt, image_size, parse_grounding, style_for
from ..requests import (
    GenerateParams,
    GenerateRequest,
    GroundRequest,
    GroundResult,
    ImageBlock,
    Message,
    TextBlock,
)
from ..schema import ModelCapability, ModelSchema

if TYPE_CHECKING:
    from .core import InferenceEngine

__all__ = ["MAX_IMAGE_BYTES", "PULL_HINT", "ground", "grounding_model", "load_image"]

MAX_IMAGE_BYTES = 32 * 2**20
PULL_HINT = (
    "pull a vision model (`car models pull qwen2.5-vl-3b`), set GEMINI_API_KEY for Gemini, or install "
    "the embedded OCR grounder for text targets (pip install 'car-inference[ocr]')"
)
# Enough for a few dozen boxes; greedy, since a box should not depend on a sample.
_PARAMS = GenerateParams(temperature=0.0, max_tokens=1024)


async def ground(engine: InferenceEngine, request: GroundRequest) -> GroundResult:
    if not request.prompt.strip():
        raise InvalidInput("grounding needs a target to find (an empty prompt was given)")
    model = grounding_model(engine, request.model)
    data = await load_image(request.image, engine.config.remote.timeout_s)
    width, height = image_size(data)
    backend = engine._runnable(model)  # an unpulled model says which pull it needs, here
    if isinstance(backend, Grounder):
        return await backend.ground(model, request, data)
    style = style_for(model)
    image = ImageBlock(data=base64.b64encode(data).decode(), media_type=_media_type(data))
    text = TextBlock(text=grounding_prompt(style, request.prompt, width, height))
    generate = GenerateRequest(
        messages=[Message(role="user", content=[image, text])], model=model.id, params=_PARAMS
    )
    result = await engine.generate(generate)
    return GroundResult(
        boxes=parse_grounding(result.text, width, height, style),
        raw_text=result.text,
        model_used=result.model_used,
        width=width,
        height=height,
    )


def grounding_model(engine: InferenceEngine, name: str | None) -> ModelSchema:
    """The named model (which must declare grounding), else the configured one, else the best
    available: vision-language models before text-only grounders (OCR finds text, not "the red
    car"), local first under ``routing.prefer_local``, then by quality prior."""
    if name:
        model = engine.resolve(name)
        if not model.has_capability(ModelCapability.GROUNDING):
            others = [m.id for m in engine.registry.query(capabilities=[ModelCapability.GROUNDING])]
            raise UnsupportedMode(
                "grounding",
                model.kind,
                f"{model.id} does not declare grounding; models that do: {', '.join(others[:8]) or 'none'}",
            )
        return model
    configured = engine.default_model(ModelCapability.GROUNDING)
    if configured is not None:
        return configured
    available = engine.registry.query(capabilities=[ModelCapability.GROUNDING], available_only=True)
    if not available:
        raise ModelUnavailable("grounding", f"no grounding model is available: {PULL_HINT}")
    local_first = engine.config.routing.prefer_local

    def rank(m: ModelSchema) -> tuple[bool, bool, float, bool, str]:
        sees = m.has_capability(ModelCapability.VISION)
        return (not sees, local_first and m.is_remote, -(m.quality or 0.0), m.is_remote, m.id)

    return min(available, key=rank)


async def load_image(block: ImageBlock, timeout_s: float) -> bytes:
    """The image's bytes: inline base64, a data: URL, an http(s) URL (fetched), a file:// URL or
    a path. The server refuses files before this (a client must not read the server's disk)."""
    if block.data is not None:
        return _b64(block.data)
    url = block.url or ""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep:
            raise InvalidInput("a data: URL needs a ',' before its payload")
        return _b64(payload) if header.endswith(";base64") else unquote(payload).encode("latin-1")
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return await _fetch(url, timeout_s)
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the image {path}: {exc.strerror or exc}") from None
    return _checked(data, str(path))


def _b64(text: str) -> bytes:
    try:
        return _checked(base64.b64decode(text, validate=True), "the base64 image")
    except (binascii.Error, ValueError):
        raise InvalidInput("the image's `data` is not valid base64") from None


def _checked(data: bytes, what: str) -> bytes:
    if not data:
        raise InvalidInput(f"{what} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"{what} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    return data


async def _fetch(url: str, timeout_s: float) -> bytes:
    import httpx

    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise InvalidInput(f"fetching the image {url} answered HTTP {response.status_code}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise InvalidInput(f"the image at {url} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    except InvalidInput:
        raise
    except Exception as exc:  # httpx's errors (InvalidURL is no HTTPError), a refused connection
        raise InvalidInput(f"cannot fetch the image {url}: {exc}") from None
    return _checked(bytes(data), url)


_SIGNATURES = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


def _media_type(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mt for sig, mt in _SIGNATURES if data.startswith(sig)), "image/png")
