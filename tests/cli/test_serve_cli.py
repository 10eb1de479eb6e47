"""`car serve`, registered on a typer app of the test's own (the same `register` the `car` app uses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
        "car_inference.server.serve", lambda app, settings, **kwargs: ran.append(settings.host)
    )
    monkeypatch.setattr("car_inference.server.create_app", lambda settings: None)
    result = CliRunner().invoke(cli(), ["serve", "--host", host, "--port", "0"])
    assert result.exit_code == 0, result.stderr
    assert ran == [host]


def _start(home: Path, port: int, *extra: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "car_inference", "serve", "--port", str(port), *extra],
        env={**os.environ, "CAR_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_healthy(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.ConnectError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


def test_started_in_the_background_of_a_script_still_exits_130_on_sigint(isolated_home: Path) -> None:
    """A script's `car serve &` starts with SIGINT ignored (no job control). uvicorn still stops
    on it, then gives the signal back to the ignoring handler, and the exit status was 0."""
    port = _free_port()

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    process = _start(isolated_home, port, "--log-level", "warning", preexec_fn=ignore_sigint)
    try:
        _wait_healthy(process, port)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "Traceback" not in err, err


def test_a_taken_port_is_one_line_before_any_banner(isolated_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _start(isolated_home, port)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert err.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the port is in use (choose another with --port)"
    ]


def test_ctrl_c_during_a_stream_ends_it_cleanly_and_fast(isolated_home: Path) -> None:
    port = _free_port()
    process = _start(isolated_home, port, "--log-level", "warning")
    try:
        _wait_healthy(process, port)
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
            "max_tokens": 2000,
            "stream": True,
        }
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            trace = response.headers["x-car-trace-id"]
            lines = response.iter_lines()
            assert next(line for line in lines if '"content":"' in line and '"content":""' not in line)
            process.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            rest = [line for line in lines if line]
        _, err = process.communicate(timeout=20)
        took = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    # Not a speed target: the answer would run on for 2,000 tokens (tens of seconds) if shutdown
    # waited for it; on a quiet machine it ends in under a second, on a loaded one 3.6 s was seen.
    assert took < 8.0, f"shutdown took {took:.1f} s"
    assert rest[-1] == "data: [DONE]" and '"code":"server_shutdown"' in rest[-2]
    for noise in ("Traceback", "CancelledError", "ProgrammingError", "Exception in ASGI"):
        assert noise not in err, err
    # The cut attempt was written before the store closed (an abandoned trace, counted nowhere).
    from car_inference.engine import InferenceEngine

    engine = InferenceEngine(home=isolated_home)
    try:
        assert engine.store.trace(trace) is not None
    finally:
        engine.close()


def _wait_until_loaded(process: subprocess.Popen[str], library: str) -> None:
    """Until the child has mapped ``library`` (Linux's /proc), so that a signal sent next lands in
    car's code, not in Python's own start-up (where any Python program prints a traceback)."""
    deadline = time.monotonic() + 60
    maps = Path(f"/proc/{process.pid}/maps")
    while library not in maps.read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.005)


# From the first import after car's own handler is in place (pydantic's, in the CLI's imports),
# through the server's imports and the engine, to uvicorn starting: a Ctrl-C that landed in a
# weakref callback there used to be dropped, and the server came up as if never interrupted.
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("delay_s", [0.0, 0.1, 0.25, 0.4, 0.6, 0.9, 1.3])
def test_ctrl_c_while_starting_is_quiet(isolated_home: Path, delay_s: float) -> None:
    process = _start(isolated_home, _free_port(), "--log-level", "warning")
    _wait_until_loaded(process, "pydantic_core")
    time.sleep(delay_s)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"car serve still running 30 s after Ctrl-C: {process.communicate()}")
    # 130, or ended by the signal itself (-2) when it lands while uvicorn hands it back on the way
    # out: a shell reports both as 130. What matters is that nothing is printed.
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err


def test_sigterm_sends_the_spans_still_queued(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn ends a SIGTERM by the signal itself, so the at-exit flush never ran: a replica
    stopped by systemd or Kubernetes lost its last batch of spans (up to 5 s of traces)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    bodies: list[bytes] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    collector = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    )
    port = _free_port()
    process = _start(isolated_home, port, "--log-level", "warning")
    try:
        _wait_healthy(process, port)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/route",
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        collector.shutdown()
    assert any(b"inference.route" in body for body in bodies)
