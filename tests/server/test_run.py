"""The bind check and the background server thread."""

from __future__ import annotations

import httpx
import pytest

from car_inference.config import ServerSettings
from car_inference.server import BindRefused, ServerThread, check_bind, create_app, is_loopback
from car_inference.server.run import uvicorn_config


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com", ""):
        assert not is_loopback(host), host


def test_non_loopback_needs_keys() -> None:
    check_bind("127.0.0.1", [])
    check_bind("0.0.0.0", ["k"])
    for keys in ([], ["  "]):
        with pytest.raises(BindRefused) as info:
            check_bind("0.0.0.0", keys)
        message = str(info.value)
        assert "\n" not in message and "CAR_SERVER_API_KEYS" in message and "api_keys" in message


def test_uvicorn_config_follows_the_settings() -> None:
    settings = ServerSettings(host="127.0.0.1", port=9999, max_body_mb=2)
    config = uvicorn_config(object(), settings)
    assert (config.host, config.port) == ("127.0.0.1", 9999)
    assert config.ws_max_size == int(settings.ws_max_message_mb * 1024 * 1024) == 4 * 1024 * 1024


def test_server_thread_serves_and_stops(isolated_home: object) -> None:
    server = ServerThread(create_app()).start()
    url = server.url
    assert httpx.get(url + "/health").status_code == 200
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")
