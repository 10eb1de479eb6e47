"""Headers, JSON helpers and the in-flight bound."""

from __future__ import annotations

from car_inference.server.common import Limiter, ascii_header, car_headers, dumps


def test_route_reasons_become_ascii_header_values() -> None:
    reason = "adaptive: chat/simple → smollm2 (quality ≥ 0.5 — est 20 ms)\r\nX-Evil: 1"
    value = ascii_header(reason)
    assert value.isascii() and "\r" not in value and "\n" not in value
    assert value == "adaptive: chat/simple -> smollm2 (quality >= 0.5 - est 20 ms)X-Evil: 1"
    assert ascii_header("café") == "cafe"
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
