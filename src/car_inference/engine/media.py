"""Image and video calls, priced and recorded like text calls.

``run_media`` wraps one ``generate_image`` / ``generate_video`` call on its model:

- **spend**: a hosted model's catalog price (``per_image``, ``per_second`` of video) times the
  request's estimate is checked against the ``[spend]`` limits first, so a call that could cross
  them never starts; what came out (images written, seconds of video, else the estimate) is
  recorded after. In-process models cost nothing.
- **outcomes**: the attempt is recorded in the outcome tracker (task ``generate_image`` /
  ``generate_video``, its latency, success or the error's class) through the bookkeeper, as a
  generation is, so ``car spend``, the profiles and the traces see media calls too. Input the
  caller must fix (``InvalidInput``, ``UnsupportedMode``) is not the model's failure and is not
  counted; a call the caller stopped waiting for is not recorded.
- **circuit breakers**: as for text, a model whose circuit is open is not called
  (``CircuitOpen``), and each call's failure (weighted by ``failure_weight``) or success moves
  its circuit: ten 500s in a row from an image model left it closed, every request paying for
  another.
- **cancelled**: a hosted call the caller stops waiting for is charged its estimate (the provider
  bills a job it accepted; a cancelled video job kept running there, and spend limits never saw
  it). In-process work stops at its next step and costs nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..errors import CircuitOpen, InferenceError, InvalidInput, UnsupportedMode
from ..requests import GenerateImageRequest, GenerateImageResult, GenerateVideoRequest, GenerateVideoResult
from ..routing import InferenceTask
from ..routing.breaker import failure_weight
from ..routing.media import MEDIA_FAMILY
from ..schema import ModelSchema

if TYPE_CHECKING:
    from ..routing import OutcomeTracker, SpendControl
    from ..routing.breaker import CircuitBreakerRegistry
    from .bookkeeping import Bookkeeper

__all__ = ["image_cost", "run_media", "video_cost", "with_suffix_format"]

T = TypeVar("T", GenerateImageResult, GenerateVideoResult)
R = TypeVar("R", GenerateImageRequest, GenerateVideoRequest)

# The formats an output name's suffix names.
SUFFIX_FORMATS = {
    "png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp", "mp4": "mp4", "mov": "mov", "gif": "gif",
}  # fmt: skip


class _Engine(Protocol):
    spend: SpendControl
    tracker: OutcomeTracker
    bookkeeper: Bookkeeper
    breakers: CircuitBreakerRegistry


def image_cost(
    model: ModelSchema, request: GenerateImageRequest, result: GenerateImageResult | None
) -> float:
    """The catalog's price for the images asked for (``result`` None) or written."""
    price = 0.0 if model.in_process else model.cost.per_image or 0.0
    count = (request.variant_count or 1) if result is None else max(1, len(result.image_paths))
    return price * count


def video_cost(
    model: ModelSchema, request: GenerateVideoRequest, result: GenerateVideoResult | None
) -> float:
    """The catalog's price for the seconds asked for (``result`` None) or made (else asked for).
    Before the call, a model that picks the length itself is assumed to make its longest clip
    (``cost.max_video_seconds``): Gemini Omni Flash was checked at the default 4 s and charged
    10, twice a $0.50 daily limit in one call."""
    price = 0.0 if model.in_process else model.cost.per_second or 0.0
    made = result.duration_s if result is not None else None
    seconds = made or request.duration_s
    longest = model.cost.max_video_seconds
    if not made and longest is not None and "duration_s" not in request.model_fields_set:
        seconds = max(seconds, longest)  # not said how long it made: as long as it makes
    return price * seconds


def with_suffix_format(request: R) -> R:
    """The format an ``output_path`` names by its suffix when the request left ``format`` out
    (``cat.jpg`` is a JPEG); a suffix naming another format than a ``format`` given is
    ``InvalidInput`` (JPEG bytes were written into ``x.png``), as for speech."""
    if not request.output_path:
        return request
    named = SUFFIX_FORMATS.get(Path(request.output_path).suffix.lower().lstrip("."))
    formats = getattr(type(request).model_fields["format"].annotation, "__args__", ())
    if named is None or named == request.format or named not in formats:  # not this kind's suffix
        return request
    if "format" in request.model_fields_set:
        raise InvalidInput(
            f"output_path {request.output_path!r} names a .{named} file but format is {request.format!r}",
            param="format",
        )
    return request.model_copy(update={"format": named})


async def run_media(
    engine: _Engine,
    model: ModelSchema,
    task: InferenceTask,
    prompt: str,
    cost: Callable[[T | None], float],
    call: Callable[[], Awaitable[T]],
) -> T:
    estimate = cost(None)
    # Held until the cost is recorded: concurrent calls cannot all pass a limit (as generation).
    reservation = engine.spend.reserve(model.provider, estimate) if estimate else None
    if not engine.breakers.allow(model.id):
        engine.spend.release(reservation)
        raise CircuitOpen(model.id)
    trace_id, started_at, start = uuid.uuid4().hex, time.time(), time.perf_counter()
    family = MEDIA_FAMILY[task]

    def record(success: bool, error: InferenceError | None = None) -> None:
        engine.bookkeeper.submit(
            engine.tracker.record_attempt,
            model.id,
            task,
            family,
            "media",
            prompt,
            trace_id=trace_id,
            started_at=started_at,
            success=success,
            latency_ms=(time.perf_counter() - start) * 1000,
            error_class=type(error).__name__ if error is not None else None,
            message=str(error) if error is not None else "",
        )

    try:
        result = await call()
    except BaseException as exc:
        weight = failure_weight(exc) if isinstance(exc, InferenceError) else 0
        engine.breakers.record_failure(model.id, weight)  # weight 0: only hands a probe on
        if isinstance(exc, asyncio.CancelledError) and estimate:
            engine.spend.record(model.provider, model.id, estimate, reservation=reservation)
        else:
            engine.spend.release(reservation)
        if isinstance(exc, InferenceError) and not isinstance(exc, InvalidInput | UnsupportedMode):
            record(False, exc)  # the model's failure; the request's own fault counts nowhere
        raise
    engine.breakers.record_success(model.id)
    spent = cost(result) if estimate else 0.0
    if spent:
        engine.spend.record(model.provider, model.id, spent, reservation=reservation)
    else:
        engine.spend.release(reservation)
    record(True)
    return result
