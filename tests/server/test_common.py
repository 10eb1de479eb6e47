"""Headers, JSON helpers and the in-flight bound."""

from __future__ import annotations

import json
import threading

import pytest
from starlette.requests import Request

from car_inference.server.common import (
    BIG_BODY,
    Limiter,
    as_object,
    ascii_header,
    car_headers,
    client_of,
    dumps,
    parse_json,
    read_call,
)
from car_inference.server.errors import ApiError


def test_route_reasons_become_ascii_header_values() -> None:
    reason = "adaptive: chat/simple → smollm2 (quality ≥ 0.5 — est 20 ms)\r\nX-Evil: 1"
    value = ascii_header(reason)
    assert value.isascii() and "\r" not in value and "\n" not in value
    assert value == "adaptive: chat/simple -> smollm2 (quality >= 0.5 - est 20 ms)X-Evil: 1"
    assert ascii_header("café") == "cafe"
    assert ascii_header("(quality 0.44 ± 0.15 from 2 obs") == "(quality 0.44 +- 0.15 from 2 obs"
    assert len(ascii_header("x" * 2000)) == 512


def test_car_headers_skip_what_is_missing() -> None:
    assert car_headers("m", "t", "r") == {
        "x-car-model": "m",
        "x-car-trace-id": "t",
        "x-car-route-reason": "r",
    }
    assert car_headers("m") == {"x-car-model": "m"}
    assert car_headers(None) == {}


def test_limiter_and_dumps() -> None:
    limiter = Limiter(2)
    assert limiter.try_acquire() and limiter.try_acquire() and not limiter.try_acquire()
    limiter.release()
    assert limiter.try_acquire()
    assert dumps({"a": "é"}) == '{"a":"é"}'.encode()


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"[" * 1000 + b"]" * 1000, "nested too deeply"),  # RecursionError: a 500 before
        (b'{"a":' * 150 + b"1" + b"}" * 150, "nested too deeply"),  # parses, but deeper than the limit
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "5000 digits"),  # int() refuses over 4300: a 500
        (b'{"seed": -' + b"1" * 101 + b"}", "digits"),
        (b'{"model": "\\ud800"}', "lone UTF-16 surrogate"),  # cannot be written out as UTF-8
        (b'{"model": "\\uDBFF"}', "surrogate"),
        (b'{"temperature": NaN}', "NaN is not a JSON value"),
        (b'{"temperature": 1e999}', "out of range"),
        (b'{"a": 1', "malformed JSON"),
    ],
)
def test_parse_json_refuses_what_would_crash_later(raw: bytes, says: str) -> None:
    for text in (raw, raw.decode()):  # an HTTP body, a WebSocket text message
        with pytest.raises(ApiError) as info:
            parse_json(text)
        assert info.value.status == 400 and info.value.code == "invalid_json"
        assert says in info.value.message
    # Strictly UTF-8: the bytes of a lone surrogate (CESU-8) and UTF-16 are refused, not decoded.
    for body in (b'{"a": "\xff"}', b'{"a": "a\xed\xbf\xbfb"}', '{"a": 1}'.encode("utf-16")):
        with pytest.raises(ApiError, match="not UTF-8"):
            parse_json(body)
    assert parse_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a UTF-8 byte-order mark is fine
    for body, kind in ((b"null", "null"), (b"[1]", "an array"), (b'"x"', "a string"), (b"3", "a number")):
        with pytest.raises(ApiError, match=f"expected a JSON object, got {kind}"):
            as_object(parse_json(body))


def test_parse_json_keeps_what_is_valid() -> None:
    deep = b'{"a":' * 99 + b"1" + b"}" * 99
    assert parse_json(deep)["a"]["a"]["a"]
    assert parse_json(b'{"emoji": "\\ud83d\\ude00", "n": -12, "x": 1.5}') == {
        "emoji": "😀",
        "n": -12,
        "x": 1.5,
    }
    assert parse_json('{"text": "a \\\\ud800 b"}') == {"text": "a \\ud800 b"}  # an escaped backslash
    assert parse_json(b"[" * 60 + b"]" * 60)  # many brackets, but shallow enough


def _request(body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "headers": headers or [], "path": "/"}, receive)


async def test_a_large_body_is_parsed_and_built_off_the_event_loop() -> None:
    """A 31 MB chat of a million content parts held every other client 5.4 s: it was parsed on a
    worker thread but translated and validated on the event loop."""
    seen: list[threading.Thread] = []

    def build(body: dict[str, object]) -> object:
        seen.append(threading.current_thread())
        return body["x"]

    small = json.dumps({"x": 1}).encode()
    large = json.dumps({"x": 2, "pad": "p" * BIG_BODY}).encode()
    assert await read_call(_request(small), build) == 1
    assert await read_call(_request(large), build) == 2
    assert seen[0] is threading.current_thread() and seen[1] is not threading.current_thread()
    with pytest.raises(ApiError, match="the request body: "):
        await read_call(_request(large[:-1]), build)
    with pytest.raises(ApiError, match="expected a JSON object, got an array"):
        await read_call(_request(b"[" + b" " * BIG_BODY + b"]"), build)


async def test_a_compressed_body_is_a_415_naming_its_encoding() -> None:
    """A gzip body was read as JSON and answered "not UTF-8 text"."""
    import gzip

    body = gzip.compress(b'{"x": 1}')
    with pytest.raises(ApiError) as info:
        await read_call(_request(body, [(b"content-encoding", b"gzip")]), dict)
    assert info.value.status == 415 and "Content-Encoding gzip" in info.value.message
    plain = _request(b'{"x": 1}', [(b"content-encoding", b"identity")])
    assert await read_call(plain, dict) == {"x": 1}


def test_one_key_is_one_client_however_its_header_is_written() -> None:
    """`bearer a`, `BEARER a` and `Bearer  a` were clients of their own: each had its own share of
    the per-client limit, and a video job made with one was a 404 when polled with another."""
    scopes = [
        {"headers": [(b"authorization", v)]} for v in (b"Bearer a", b"bearer a", b"BEARER a", b"Bearer  a ")
    ]
    assert len({client_of(scope, True) for scope in scopes}) == 1
    assert client_of({"headers": [(b"authorization", b"Bearer b")]}, True) != client_of(scopes[0], True)
    assert client_of({"headers": [(b"authorization", b"Basic a")]}, True) is None
