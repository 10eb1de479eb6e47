"""``POST /v1/route``: the router's decision for a request, without running it.

For route-only use (what RouteLLM users do): the body is a ``/v1/chat/completions`` body (``model``
omitted or ``auto`` routes, a named model is explained); the answer is the decision with every
candidate's quality belief, expected cost and why it won or lost. With ``record`` (the default)
the decision is kept as a pending trace whose id comes back: the caller runs the model itself and
reports how it went with ``POST /v1/feedback {"trace_id", "score"}``, which teaches the router
exactly as an answer it produced would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from .common import HEADER_TRACE, ServerState, json_response, read_call
from .errors import ApiError, guarded
from .translate import GenerationCall, chat_request

__all__ = ["register"]


def register(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    api = guarded(timeout_s=state.settings.request_timeout_s, retry_hint=state.retry_hint)

    @api
    async def route(request: Request) -> Response:
        record, call = await read_call(request, _route_call)
        decision = await engine.route_async(call.request)  # a named model must generate
        state.metrics.decision(str(decision.strategy))
        # The trace is written at once (feedback may follow at once), off the loop: a store that
        # is slow or busy with the writer's batch holds this request only.
        trace_id = await asyncio.to_thread(engine.open_trace, decision) if record else None
        headers = {HEADER_TRACE: trace_id} if trace_id else None  # x-request-id follows it, as for answers
        return json_response(
            {"trace_id": trace_id, "decision": decision.model_dump(mode="json")}, headers=headers
        )

    app.add_route("/v1/route", route, methods=["POST"])


def _route_call(body: dict[str, Any]) -> tuple[bool, GenerationCall]:
    record = body.pop("record", True)
    if not isinstance(record, bool):
        raise ApiError(400, "`record` must be true or false", param="record")
    body.pop("stream", None)  # nothing is generated, so nothing streams
    return record, chat_request(body)
