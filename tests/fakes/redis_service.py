"""The real Redis some tests need (127.0.0.1:6379, or ``CAR_TEST_REDIS_URL``), with a key prefix
of its own per test run, and a Redis a test starts itself (to stop it mid-test).

Without Redis a test skips, saying why, or fails under ``CAR_REQUIRE_SERVICES=1`` (``services.py``).
Every key a run wrote (``car_test_<random>:*``) is deleted when the process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import time
import uuid

from .live_keys import LIVE_KEYS
from .services import service_missing

__all__ = ["RedisServer", "closed_port", "redis_prefix", "redis_url"]

URL = os.environ.get("CAR_TEST_REDIS_URL") or LIVE_KEYS.get("CAR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_PREFIX = f"car_test_{uuid.uuid4().hex[:12]}:"

_checked: str | None = None  # "" once reachable, else why not


def redis_url() -> str:
    """The test Redis's URL, or a skip (a failure under CAR_REQUIRE_SERVICES=1) when it is away."""
    global _checked
    if _checked is None:
        try:
            import redis
        except ImportError:
            _checked = "redis-py is not installed (pip install 'car-inference[redis]')"
        else:
            try:
                redis.Redis.from_url(URL, socket_connect_timeout=2, socket_timeout=2).ping()
            except (redis.RedisError, OSError) as exc:
                _checked = f"Redis is not reachable at {URL}: {exc}"
            else:
                _checked = ""
                atexit.register(_clean)
    if _checked:
        service_missing(_checked)
    return URL


def redis_prefix() -> str:
    """A key prefix no other test (nor run) uses, under the run's prefix."""
    return f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:"


def _clean() -> None:
    import redis

    try:
        client = redis.Redis.from_url(URL, socket_connect_timeout=2, socket_timeout=2)
        keys = list(client.scan_iter(match=f"{RUN_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)
    except (redis.RedisError, OSError):
        pass  # Redis went away first: nothing left to clean here


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of the test's own on a free port, without persistence, to stop and
    start again; skips (or fails under CAR_REQUIRE_SERVICES=1) when the binary is not installed."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            service_missing("redis-server is not on PATH (needed to stop a Redis mid-test)")
        self.port = closed_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.binary is not None
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
