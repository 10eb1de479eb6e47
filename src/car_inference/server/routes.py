"""The OpenAI-compatible routes: chat and text completions (plain and streamed), embeddings,
rerank, the model list, and feedback on an answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from ..errors import InvalidInput
from ..requests import InferenceResult
from .common import (
    ServerState,
    car_headers,
    feedback_call,
    json_response,
    read_call,
    read_json,
)
from .errors import guarded
from .sse import ChatChunks, CompletionChunks, EventStream
from .translate import (
    GenerationCall,
    chat_completion,
    chat_request,
    completion_request,
    embed_request,
    embeddings_response,
    model_object,
    models_list,
    rerank_request,
    rerank_response,
    routed,
    text_completion,
)

__all__ = ["register"]

Render = Callable[[InferenceResult, int], dict[str, Any]]


def register(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    metrics = state.metrics
    timeout_s = state.settings.request_timeout_s
    api = guarded(timeout_s=timeout_s, retry_hint=state.retry_hint)

    async def generate(call: GenerationCall, render: Render, chunks: type[ChatChunks]) -> Response:
        if call.stream:
            return EventStream(state, engine.stream(call.request), chunks(call))
        async with asyncio.timeout(timeout_s):
            result = await engine.generate(call.request)  # a failure is counted by ``guarded``
        routing = result.routing
        if routing is not None:
            metrics.decision(str(routing.decision.strategy))
            metrics.fallback(model for model, _ in routing.attempts)
        metrics.generation(result.model_used, result.latency_ms, result.time_to_first_token_ms, result.usage)
        reason = routing.reason if routing is not None else None
        headers = car_headers(result.model_used, result.trace_id, reason)
        return json_response(render(result, call.request.params.max_tokens), headers=headers)

    @api
    async def chat_completions(request: Request) -> Response:
        call = await read_call(request, chat_request)
        return await generate(call, chat_completion, ChatChunks)

    @api
    async def completions(request: Request) -> Response:
        call = await read_call(request, completion_request)
        return await generate(call, text_completion, CompletionChunks)

    @api
    async def embeddings(request: Request) -> Response:
        embed, encoding = await read_call(request, embed_request)
        try:
            async with asyncio.timeout(timeout_s):
                result = await engine.embed(embed)
        except InvalidInput as exc:  # the engine's `texts[0]` is the client's `input[0]`
            if not (exc.param or "").startswith("texts"):
                raise
            param = (exc.param or "").replace("texts", "input", 1)
            raise InvalidInput(str(exc).replace(exc.param or "", param, 1), param=param) from None
        return json_response(embeddings_response(result, encoding), headers=car_headers(result.model_used))

    @api
    async def rerank(request: Request) -> Response:
        call, return_documents = await read_call(request, rerank_request)
        async with asyncio.timeout(timeout_s):
            result = await engine.rerank(call)
        body = rerank_response(result, return_documents)
        return json_response(body, headers=car_headers(result.model_used))

    @api
    async def list_models(request: Request) -> Response:
        return json_response(models_list(engine.list_models()))

    @api
    async def get_model(request: Request) -> Response:
        name = request.path_params["model_id"]
        if routed(name):
            return json_response(models_list([])["data"][0])
        return json_response(model_object(engine.resolve(name)))

    @api
    async def feedback(request: Request) -> Response:
        return json_response(await feedback_call(engine, await read_json(request)))

    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_route("/v1/rerank", rerank, methods=["POST"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_route("/v1/feedback", feedback, methods=["POST"])
