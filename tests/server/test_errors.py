"""The one table from exceptions to HTTP statuses and JSON-RPC codes."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Awaitable

import psycopg
import pytest
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from car_inference.errors import (
    AllModelsFailed,
    CircuitOpen,
    ConfigError,
    InferenceFailed,
    ModelNotFound,
    ModelUnavailable,
    ProviderError,
    ProviderRejectedInput,
    SpendLimitExceeded,
    StateUnavailable,
    TokenizationError,
    TraceNotFound,
    UnsupportedMode,
)
from car_inference.requests import GenerateRequest
from car_inference.server.errors import ApiError, describe, error_body, error_response, guarded, rpc_error


def _provider(status: int | None, message: str = "boom") -> ProviderError:
    return ProviderError(
        message, provider="openai", model="openai/x", status=status, retryable=True, retry_after=3
    )


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ModelNotFound("qwen3-9b", ["qwen/qwen3-8b:q4_k_m"]), 404, "model_not_found"),
        (TraceNotFound("t"), 404, "trace_not_found"),
        (ModelUnavailable("m", "not pulled"), 503, "model_unavailable"),
        (UnsupportedMode("tool-use", "gguf", "no template"), 400, "unsupported_mode"),
        (TokenizationError("bad ids"), 400, "tokenization_error"),
        (SpendLimitExceeded("openai", "daily", 1.0, 0.99, 0.05), 402, "spend_limit_exceeded"),
        (CircuitOpen("m"), 503, "circuit_open"),
        (StateUnavailable("the PostgreSQL state store is unreachable", 1.0), 503, "state_unavailable"),
        (_provider(500), 502, "provider_error"),
        (_provider(429), 429, "upstream_rate_limited"),  # the SDK retries it after Retry-After
        (_provider(400), 400, "provider_rejected_input"),  # the client's input, not the provider's fault
        (_provider(422), 400, "provider_rejected_input"),
        (  # what status_error makes of a 400: an InvalidInput too, still the provider's refusal
            ProviderRejectedInput("bad tool schema", provider="openai", model="openai/x", status=400),
            400,
            "provider_rejected_input",
        ),
        (_provider(401), 502, "provider_error"),  # our key: not the client's to fix
        (
            ProviderError("timed out", provider="p", model="m", retryable=True, timeout=True),
            504,
            "upstream_timeout",
        ),
        (AllModelsFailed([("a", _provider(500)), ("b", InferenceFailed("x"))]), 502, "all_models_failed"),
        (AllModelsFailed([("a", _provider(429)), ("b", _provider(429))]), 429, "upstream_rate_limited"),
        (AllModelsFailed([("a", _provider(429)), ("b", _provider(500))]), 502, "all_models_failed"),
        (ConfigError("bad", path="/c.toml", line=3), 500, "configuration_error"),
        (InferenceFailed("model crashed"), 500, "inference_failed"),
        (TimeoutError(), 504, "request_timeout"),
        (ApiError(413, "too big", code="request_too_large"), 413, "request_too_large"),
        # The state database refused a statement (a table dropped by hand): the server's set-up.
        (sqlite3.OperationalError("no such table: feedback"), 503, "state_store_error"),
        (psycopg.errors.UndefinedTable('relation "feedback" does not exist'), 503, "state_store_error"),
    ],
)
def test_statuses(exc: BaseException, status: int, code: str) -> None:
    info = describe(exc)
    assert (info.status, info.code) == (status, code)
    assert info.error_class == type(exc).__name__
    body = error_body(info)["error"]
    assert set(body) >= {"message", "type", "param", "code"} and body["message"]


def test_details_travel_with_the_error() -> None:
    found = describe(ModelNotFound("qwen3-9b", ["qwen/qwen3-8b:q4_k_m"]))
    assert found.param == "model" and found.extra["suggestions"] == ["qwen/qwen3-8b:q4_k_m"]
    assert "qwen3-9b" in found.message and "qwen/qwen3-8b:q4_k_m" in found.message
    # An endpoint that never said what it serves is named (it was only in the server's log).
    why = "endpoint deadbox could not say what it serves: ReadTimeout"
    assert describe(ModelNotFound("deadbox/foo", [], why)).message.endswith(f"does not exist. ({why})")
    failed = describe(AllModelsFailed([("a", _provider(500)), ("b", InferenceFailed("x"))]))
    assert [a["model"] for a in failed.extra["attempts"]] == ["a", "b"] and failed.retryable
    provider = describe(_provider(500))
    assert provider.retry_after == 3 and error_response(provider).headers["retry-after"] == "3"
    limited = describe(_provider(429))
    assert limited.type == "rate_limit_error" and limited.extra == {"upstream_status": 429}
    assert error_response(limited).headers["retry-after"] == "3"
    both = describe(AllModelsFailed([("a", _provider(429)), ("b", _provider(429))]))
    assert both.retry_after == 3 and [a["model"] for a in both.extra["attempts"]] == ["a", "b"]
    media = describe(ModelUnavailable.none_for("piper", "no backend"), capability="text_to_speech")
    assert (
        media.status == 501 and media.message == "text_to_speech is not available on this server: no backend"
    )
    # One model that cannot run (not pulled) is its 503, not the capability's 501.
    one = describe(ModelUnavailable("piper/x", "not pulled"), capability="text_to_speech")
    assert one.status == 503 and one.code == "model_unavailable" and "piper/x" in one.message
    named = describe(
        UnsupportedMode("text_to_speech", "gguf", "smollm2 does not declare it"), capability="tts"
    )
    assert named.status == 400 and named.code == "unsupported_mode", (
        "the client's mistake, not the server's lack"
    )
    assert "30 s" in describe(TimeoutError(), timeout_s=30).message


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"messages": [{"role": "user", "content": 5}]})
    described = describe(info.value)
    assert described.status == 400 and described.param and described.param.startswith("messages[0].content")
    assert described.message.startswith("messages[0].content")


def test_validation_errors_report_the_union_branch_the_input_took() -> None:
    """Content given as a list is reported where the list is wrong, not as 'not a string', and
    without pydantic's branch names; a wrong type for an object field names no class of ours."""
    image = {"type": "image", "data": "AAAA", "detail": "ultra"}
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"messages": [{"role": "user", "content": [image]}]})
    described = describe(info.value)
    assert described.param == "messages[0].content[0].image.detail"
    assert described.message == "messages[0].content[0].image.detail: Input should be 'auto', 'low' or 'high'"
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "hi", "intent": 5})
    assert describe(info.value).message == "intent: Input should be an object"
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": 5, "max_tokens": "many"})
    assert describe(info.value).message == "prompt: Input should be a valid string (and 1 more error(s))"


class _StayingClient:
    """An ASGI receive: an empty body, then nothing (a client that does not disconnect)."""

    def __init__(self) -> None:
        self.sent = False

    async def __call__(self) -> dict[str, object]:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        return {}


async def _awaited(response: Awaitable[Response]) -> Response:
    """A guarded route's call as a coroutine (``guarded`` types it an Awaitable), for asyncio.run."""
    return await response


def test_unexpected_errors_are_generic_500s_logged_server_side(caplog: pytest.LogCaptureFixture) -> None:
    @guarded()
    async def broken(request: Request) -> Response:
        raise RuntimeError("secret internals at /home/me")

    with caplog.at_level(logging.ERROR, logger="car_inference.server"):
        scope = {"type": "http", "method": "GET", "headers": []}
        response = asyncio.run(_awaited(broken(Request(scope, receive=_StayingClient()))))
    assert response.status_code == 500
    body = json.loads(bytes(response.body))
    assert body["error"]["code"] == "internal_error" and "secret" not in bytes(response.body).decode()
    assert "Traceback" not in bytes(response.body).decode()
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


def test_json_rpc_error_objects() -> None:
    error = rpc_error(describe(ModelNotFound("x", ["y"])))
    assert error["code"] == -32001 and error["data"]["error"] == "ModelNotFound"
    assert error["data"]["status"] == 404 and error["data"]["suggestions"] == ["y"]
    assert rpc_error(describe(ApiError(400, "bad")))["code"] == -32602
    assert rpc_error(describe(_provider(500)))["data"]["retry_after"] == 3
    assert rpc_error(describe(RuntimeError("x")))["code"] == -32603


def test_an_open_circuit_says_when_to_retry() -> None:
    info = describe(CircuitOpen("m"), retry_hint=lambda exc: 12.4)
    assert (info.status, info.retryable, info.retry_after) == (503, True, 12.4)
    assert error_response(info).headers["retry-after"] == "12"
    assert describe(CircuitOpen("m")).retry_after is None  # no hint: no guess
    data = rpc_error(info)["data"]
    assert data["retryable"] is True and data["retry_after"] == 12.4


def test_a_refusal_with_a_retry_time_is_retryable() -> None:
    busy = ApiError(429, "busy", type="rate_limit_error", code="server_busy", retry_after=1)
    data = rpc_error(describe(busy))["data"]
    assert data["retryable"] is True and data["retry_after"] == 1
    assert rpc_error(describe(ApiError(400, "bad")))["data"]["retryable"] is False


def test_a_misspelt_field_is_named_with_the_one_it_was_meant_for() -> None:
    """`text` sent to embed said only "texts: Field required", never naming `text`."""
    from car_inference.requests import EmbedRequest

    with pytest.raises(ValidationError) as info:
        EmbedRequest.model_validate({"text": ["a"]})
    described = describe(info.value)
    assert described.param == "text"
    assert described.message.startswith("text: Extra inputs are not permitted; did you mean texts?")
