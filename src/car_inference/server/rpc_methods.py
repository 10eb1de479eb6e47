"""The JSON-RPC methods of ``/ws`` (server/jsonrpc.py): one function per method, and what each
takes. Each gets the ``Session`` it runs in, its params and its request id; what it returns is the
``result``, what it raises the ``error`` (``Session._run``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, overload

from pydantic import BaseModel

from ..errors import close_matches
from ..requests import ClassifyRequest, EmbedRequest, GenerateRequest, RerankRequest
from ..requests_media import SynthesizeRequest, TranscribeRequest
from ..schema import ModelCapability
from .common import FEEDBACK_FIELDS, feedback_call
from .errors import ApiError, validated
from .grounding import GROUNDING, rpc_ground
from .images import IMAGES, VIDEOS, rpc_generate_image, rpc_generate_video
from .media import STT, TTS
from .runner_rpc import RUNNER_METHODS
from .speech_rpc import rpc_synthesize, rpc_transcribe, rpc_voices
from .translate import MAX_CLASSIFY_LABELS, MAX_EMBED_INPUTS, MAX_RERANK_DOCUMENTS, check_batch, routed

if TYPE_CHECKING:
    from .jsonrpc import Session

__all__ = ["CAPABILITIES", "METHODS", "Method", "Params", "auto", "unknown_param", "valid_id"]

Params = dict[str, Any]
Method = Callable[["Session", Params, Any], Awaitable[Any]]


def valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


def auto(params: Params) -> Params:
    """``"model": "auto"`` means no model: route (generation) or the capability's default."""
    if params.get("model") and routed(params["model"]):  # "auto" in any case; "" stays an error
        return {**params, "model": None}
    return params


@overload
def _string(params: Params, key: str) -> str: ...
@overload
def _string(params: Params, key: str, *, required: bool) -> str | None: ...
def _string(params: Params, key: str, *, required: bool = True) -> str | None:
    value = params.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"`{key}` must be a non-empty string", code="invalid_value", param=key)
    return value


def _tokenizer_model(session: Session, params: Params) -> str:
    name = _string(auto(params), "model", required=False)
    if name:
        return name
    model = session.engine.default_model(ModelCapability.GENERATE)
    if model is None:
        raise ApiError(400, "`model` is required: no default generation model is configured", param="model")
    return model.id


async def _infer(session: Session, params: Params, rid: Any) -> Any:
    return await session.infer(params, rid)


async def _infer_stream(session: Session, params: Params, rid: Any) -> Any:
    return await session.infer(params, rid, stream=True)


async def _embed(session: Session, params: Params, rid: Any) -> Any:
    request = EmbedRequest.model_validate(auto(params))  # texts: some, none empty (as /v1/embeddings)
    check_batch(request.texts, MAX_EMBED_INPUTS, "texts")
    return (await session.engine.embed(request)).model_dump(mode="json")


async def _rerank(session: Session, params: Params, rid: Any) -> Any:
    request = RerankRequest.model_validate(auto(params))
    check_batch(request.documents, MAX_RERANK_DOCUMENTS, "documents")
    return (await session.engine.rerank(request)).model_dump(mode="json")


async def _classify(session: Session, params: Params, rid: Any) -> Any:
    request = ClassifyRequest.model_validate(auto(params))
    check_batch(request.labels, MAX_CLASSIFY_LABELS, "labels")
    result = await session.engine.classify(request)
    return result.model_dump(mode="json")


async def _tokenize(session: Session, params: Params, rid: Any) -> Any:
    text = params.get("text")
    if not isinstance(text, str):
        raise ApiError(400, "`text` must be a string", code="invalid_value", param="text")
    result = await session.engine.tokenize(_tokenizer_model(session, params), text)
    return result.model_dump(mode="json")


async def _detokenize(session: Session, params: Params, rid: Any) -> Any:
    tokens = params.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise ApiError(400, "`tokens` must be a list of integers", code="invalid_value", param="tokens")
    result = await session.engine.detokenize(_tokenizer_model(session, params), tokens)
    return result.model_dump(mode="json")


async def _models_list(session: Session, params: Params, rid: Any) -> Any:
    capability = params.get("capability")
    if capability is not None and (
        not isinstance(capability, str) or capability not in {c.value for c in ModelCapability}
    ):
        known = ", ".join(c.value for c in ModelCapability)
        raise ApiError(400, f"`capability` must be one of {known}", code="invalid_value", param="capability")
    available = params.get("available")
    if available is not None and not isinstance(available, bool):  # bool("false") is True
        raise ApiError(400, "`available` must be true or false", code="invalid_value", param="available")
    models = []
    for model in session.engine.list_models():
        if capability is not None and not model.has_capability(capability):
            continue
        if available is not None and model.available != available:
            continue
        models.append(model.summary())
    return models


async def _health(session: Session, params: Params, rid: Any) -> Any:
    return (await asyncio.to_thread(session.engine.model_health)).model_dump(mode="json")


async def _route(session: Session, params: Params, rid: Any) -> Any:
    request = validated(GenerateRequest, auto(params), {})
    return session.engine.route(request).model_dump(mode="json")


async def _feedback(session: Session, params: Params, rid: Any) -> Any:
    return await feedback_call(session.engine, params)


async def _cancel(session: Session, params: Params, rid: Any) -> Any:
    target = params.get("id")
    if target is None or not valid_id(target):  # the ids a request may carry (1.0 is none)
        raise ApiError(
            400, "`id` must be the string or whole-number id of a request", code="invalid_value", param="id"
        )
    task = session.in_flight.get(target)
    if task is None or task is asyncio.current_task():
        return {"id": target, "cancelled": False}
    session.cancelled.add(target)
    task.cancel()
    return {"id": target, "cancelled": True}


METHODS: dict[str, Method] = {
    "infer": _infer,
    "infer.stream": _infer_stream,
    "embed": _embed,
    "rerank": _rerank,
    "classify": _classify,
    "tokenize": _tokenize,
    "detokenize": _detokenize,
    "models.list": _models_list,
    "health": _health,
    "route": _route,
    "feedback": _feedback,
    "cancel": _cancel,
    "generate_image": rpc_generate_image,
    "generate_video": rpc_generate_video,
    "ground": rpc_ground,
    "transcribe": rpc_transcribe,
    "synthesize": rpc_synthesize,
    "voices": rpc_voices,
    **RUNNER_METHODS,
}


def _takes(model: type[BaseModel], *wire: str) -> frozenset[str]:
    """A request model's fields (none has an alias) and the ``wire`` params the method takes apart."""
    return frozenset({*model.model_fields, *wire})


# What each method takes: a misspelt parameter ("capabilty", "promt") is an error naming close
# matches, whichever the method. Those validated by a request model refused one too, but said
# only "Extra inputs are not permitted". Fields naming a server path stay in (their method
# refuses them with its own words); the image, video and grounding methods say so themselves.
_GENERATE = _takes(GenerateRequest, "stream")
_SERVER_PATHS = frozenset({"audio_path", "output_path", "reference_audio_path"})
_PARAMS: dict[str, frozenset[str]] = {
    "infer": _GENERATE,
    "infer.stream": _GENERATE,
    "route": _takes(GenerateRequest),
    "embed": _takes(EmbedRequest),
    "rerank": _takes(RerankRequest),
    "classify": _takes(ClassifyRequest),
    "transcribe": _takes(TranscribeRequest, "audio", "filename", "stream"),
    "synthesize": _takes(SynthesizeRequest),
    "tokenize": frozenset({"text", "model"}),
    "detokenize": frozenset({"tokens", "model"}),
    "models.list": frozenset({"capability", "available"}),
    "health": frozenset(),
    "feedback": FEEDBACK_FIELDS,
    "cancel": frozenset({"id"}),
    "voices": frozenset({"model"}),
    "runner.register": frozenset({"models", "timeout_s", "name"}),
    "runner.unregister": frozenset(),
    "runner.event": frozenset({"id", "event"}),
}


def unknown_param(method: str, params: Params) -> ApiError | None:
    """A 400 naming the first parameter ``method`` does not take (and close matches), or None."""
    known = _PARAMS.get(method)
    if known is None:
        return None
    extra = next((key for key in params if key not in known), None)
    if extra is None:
        return None
    shown = sorted(known - _SERVER_PATHS)
    close = close_matches(extra, shown)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    takes = ", ".join(shown) or "none"
    message = f"`{extra}` is not a parameter of {method} (it takes: {takes}){hint}"
    return ApiError(400, message, code="invalid_value", param=extra)


# The methods whose HTTP routes answer a missing backend with a 501 naming the capability
# (``errors.describe``): the same failure gets the same status (``data.status``) here.
CAPABILITIES = {
    "generate_image": IMAGES,
    "generate_video": VIDEOS,
    "ground": GROUNDING,
    "transcribe": STT,
    "synthesize": TTS,
    "voices": TTS,
}
