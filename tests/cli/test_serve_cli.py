"""`car serve`, registered on a typer app of the test's own (the same `register` the `car` app uses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from car_inference.cli import serve

APP = """
import typer
from car_inference.cli import serve
app = typer.Typer()
@app.callback()
def root() -> None: pass
serve.register(app)
app()
"""


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        pass

    serve.register(app)
    return app


def test_refuses_a_public_address_without_keys() -> None:
    result = CliRunner().invoke(cli(), ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to listen on 0.0.0.0 without API keys")
    assert "CAR_SERVER_API_KEYS" in lines[0] and "[server]" in lines[0]


def test_bad_log_level_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli(), ["serve", "--log-level", "loud"])
    assert result.exit_code == 2 and "--log-level" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_until_interrupted(isolated_home: Path) -> None:
    port = _free_port()
    env = {**os.environ, "CAR_HOME": str(isolated_home), "CAR_SERVER_API_KEYS": "k1"}
    process = subprocess.Popen(
        [sys.executable, "-c", APP, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        # Keys from the environment apply.
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k1"})
        assert models.status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 130, err  # the shell's convention for Ctrl-C
    assert f"car serve: http://127.0.0.1:{port}/v1" in err and "API keys required" in err


@pytest.mark.parametrize("host", ["localhost", "::1"])
def test_loopback_hosts_need_no_keys(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(
        "car_inference.server.serve", lambda app, settings, log_level, sock: ran.append(settings.host)
    )
    monkeypatch.setattr("car_inference.server.create_app", lambda settings: None)
    result = CliRunner().invoke(cli(), ["serve", "--host", host, "--port", "0"])
    assert result.exit_code == 0, result.stderr
    assert ran == [host]
