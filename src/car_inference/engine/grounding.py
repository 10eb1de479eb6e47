"""``engine.ground``: boxes for a text target in an image, in pixels of that image.

A backend that grounds by itself (the embedded OCR grounder) is asked directly; any other
grounding model (a local GGUF VLM, Gemini, an OpenAI-compatible VLM host) gets one generate call
with the image and its family's grounding prompt, through the engine's ordinary generation path
(tracked, metered, breakers), and its answer is parsed (``grounding.parse_grounding``).
"""

from __future__ import annotations

import base64
import functools
from typing import TYPE_CHECKING

from .. import tracing
from ..backends.base import run_blocking
from ..backends.image_input import media_type, read_image
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

__all__ = ["PULL_HINT", "ground", "grounding_model", "load_image"]

PULL_HINT = (
    "pull a vision model (`car models pull qwen2.5-vl-3b`), set GEMINI_API_KEY for Gemini, or install "
    "the embedded OCR grounder for text targets (pip install 'car-inference[ocr]')"
)
# Greedy, since a box should not depend on a sample. A few dozen boxes take ~1,000 tokens; the
# rest is room for a hosted model's thinking, which counts against the same limit (Gemini).
MAX_TOKENS = 2048
# The most pixels an image to ground may have (8,000 x 8,000): it is decoded whole, a 110 KB PNG
# of 30,000 x 30,000 px is 900 MB, and PIL warns past 89 megapixels (taking 10 s at 144).
MAX_PIXELS = 64_000_000


async def ground(engine: InferenceEngine, request: GroundRequest) -> GroundResult:
    if not request.prompt.strip():
        raise InvalidInput("grounding needs a target to find (an empty prompt was given)")
    model = grounding_model(engine, request.model)
    data = await load_image(request.image, engine.config.remote.timeout_s, private_ok=engine.private_urls_ok)
    width, height = image_size(data)
    if width * height > MAX_PIXELS:  # decoded, 30000 x 30000 px was PIL's DecompressionBombError
        raise InvalidInput(
            f"the image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); grounding"
            f" takes at most {MAX_PIXELS // 1_000_000} megapixels: scale it down"
        )
    backend = engine._runnable(model)  # an unpulled model says which pull it needs, here
    if isinstance(backend, Grounder):
        with tracing.span("inference.ground", model=model.id, provider=model.provider):
            return await backend.ground(model, request, data)
    style = style_for(model)
    image = ImageBlock(data=base64.b64encode(data).decode(), media_type=media_type(data))
    text = TextBlock(text=grounding_prompt(style, request.prompt, width, height))
    generate = GenerateRequest(
        messages=[Message(role="user", content=[image, text])],
        model=model.id,
        params=GenerateParams(
            temperature=0.0, max_tokens=min(MAX_TOKENS, model.max_output_tokens or MAX_TOKENS)
        ),
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
        raise ModelUnavailable.none_for("grounding", PULL_HINT)
    local_first = engine.config.routing.prefer_local

    def rank(m: ModelSchema) -> tuple[bool, bool, float, bool, str]:
        sees = m.has_capability(ModelCapability.VISION)
        return (not sees, local_first and m.is_remote, -(m.quality or 0.0), m.is_remote, m.id)

    # A model whose circuit is open is passed over while another can ground (every request was
    # its 503 for the whole cooldown); with none left, the first is refused as before.
    blocked = engine.router.breakers.blocked()
    return min([m for m in available if m.id not in blocked] or available, key=rank)


async def load_image(block: ImageBlock, timeout_s: float, *, private_ok: bool = True) -> bytes:
    """The image's bytes (backends/image_input.py), read or fetched off the event loop;
    ``private_ok=False``: a URL on a loopback or private address is refused."""
    return await run_blocking(functools.partial(read_image, block, timeout_s, private_ok=private_ok))
