"""``POST /v1/ground`` and the JSON-RPC method ``ground``: boxes for a text target in an image.

Body (and params): ``prompt`` (what to find), ``image`` (a data: URL, an http(s) URL, or an object
``{"data": base64, "media_type"?}`` / ``{"url"}``), ``model`` (optional; ``auto`` or absent: the
grounding default). The answer is the ``GroundResult``: ``boxes`` in pixels of the image
(``x1, y1, x2, y2``, ``label``, ``score`` where the model gives one), ``raw_text``, ``model_used``,
``width``, ``height``. A client cannot name a file on the server's disk.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlparse

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from ..engine import InferenceEngine
from ..grounding import GroundingOutputError
from ..requests import GroundRequest, GroundResult
from .common import ServerState, car_headers, json_response, read_json
from .errors import ApiError, guarded

__all__ = ["GROUNDING", "ground_request", "register", "rpc_ground"]

GROUNDING = "grounding"  # the capability a missing backend names (errors.describe)
_SCHEMES = ("data", "http", "https")


def ground_request(body: dict[str, Any]) -> GroundRequest:
    """The request in ``body``; ``ApiError`` (400) for what a client got wrong."""
    image = body.get("image")
    if isinstance(image, str):
        image = {"url": image}
    if not isinstance(image, dict):
        raise ApiError(400, '`image` must be a data: or http(s) URL, or {"data": base64}', param="image")
    url = image.get("url")
    if isinstance(url, str) and _scheme(url) not in _SCHEMES:
        raise ApiError(400, "`image.url` must be a data: or http(s) URL (no files)", param="image")
    model = body.get("model")
    fields = {**body, "image": image, "model": None if model == "auto" else model}
    return GroundRequest.model_validate(fields)


def _scheme(url: str) -> str:
    try:
        return urlparse(url).scheme.lower()
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ApiError(400, f"`image.url` is malformed: {exc}", param="image") from None


async def run_ground(engine: InferenceEngine, request: GroundRequest, timeout_s: float) -> GroundResult:
    try:
        async with asyncio.timeout(timeout_s):
            return await engine.ground(request)
    except GroundingOutputError as exc:  # the model answered, but not in boxes we can read
        raise ApiError(502, str(exc), type="upstream_error", code="unreadable_model_output") from None


def register(app: FastAPI, state: ServerState) -> None:
    timeout_s = state.settings.request_timeout_s

    @guarded(GROUNDING, timeout_s=timeout_s, retry_hint=state.retry_hint)
    async def ground(request: Request) -> Response:
        result = await run_ground(state.engine, ground_request(await read_json(request)), timeout_s)
        return json_response(result.model_dump(mode="json"), headers=car_headers(result.model_used))

    app.add_route("/v1/ground", ground, methods=["POST"])


async def rpc_ground(session: Any, params: dict[str, Any], rid: Any) -> Any:
    result = await run_ground(
        session.engine, ground_request(params), session.state.settings.request_timeout_s
    )
    return result.model_dump(mode="json")
