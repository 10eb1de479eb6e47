"""`car serve`: the OpenAI-compatible HTTP API, JSON-RPC over WebSocket and /metrics."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from ..config import load_config
from .common import EXIT_USAGE, err, fail, handle_errors
from .interrupts import Interrupts

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def serve(
        host: Annotated[
            str | None,
            typer.Option("--host", help="address to listen on (default server.host, 127.0.0.1)"),
        ] = None,
        port: Annotated[
            int | None,
            typer.Option("--port", "-p", min=0, max=65535, help="port (default server.port, 8642)"),
        ] = None,
        log_level: Annotated[str, typer.Option("--log-level", help=", ".join(_LOG_LEVELS))] = "info",
    ) -> None:
        """Serve the models over HTTP: /v1 (OpenAI-compatible), /ws (JSON-RPC), /metrics.

        Listens on 127.0.0.1 unless told otherwise; any other address needs API keys
        (CAR_SERVER_API_KEYS or server.api_keys in config.toml). Ctrl-C stops it (exit 130)."""
        if log_level not in _LOG_LEVELS:
            raise fail(f"--log-level must be one of {', '.join(_LOG_LEVELS)}", EXIT_USAGE)
        # Ctrl-C until uvicorn's own handler takes over (``interrupts``); uvicorn gives the
        # signal back after its graceful shutdown, and it lands here too.
        with Interrupts() as interrupts:
            stopped_by = _serve(host, port, log_level, interrupts)
        interrupts.check()
        if stopped_by is not None:  # the signal given back was ignored (`car serve &` in a script)
            raise SystemExit(128 + stopped_by)


def _serve(host: str | None, port: int | None, log_level: str, interrupts: Interrupts) -> int | None:
    config = load_config()
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = config.server.model_copy(update=update)
    try:
        from ..server import BindRefused, PortInUse, bind, check_bind, create_app
        from ..server import serve as run_server
    except ImportError as exc:
        missing = f"the server needs its extra ({exc.name} is missing): pip install 'car-inference[server]'"
        raise fail(missing) from None
    interrupts.check()
    try:
        check_bind(settings.host, settings.api_keys)
        # Bound before anything is printed or loaded: a taken port is one line and exit 1.
        sock = bind(settings.host, settings.port)
    except BindRefused as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    except PortInUse as exc:
        raise fail(str(exc)) from None
    # The app makes the engine and closes it at shutdown (before uvicorn re-raises the signal).
    app = create_app(settings=settings)
    if interrupts.seen:
        app.state.car.engine.close()
        sock.close()
        interrupts.check()
    host = f"[{settings.host.strip('[]')}]" if ":" in settings.host else settings.host  # an IPv6 URL
    where = f"http://{host}:{sock.getsockname()[1]}"
    keys = "API keys required" if settings.api_keys else "no API keys"
    ws = where.replace("http", "ws", 1)
    err.print(escape(f"car serve: {where}/v1 (OpenAI API), {ws}/ws (JSON-RPC); {keys}"))
    return run_server(app, settings, log_level=log_level, sock=sock, stop_requested=lambda: interrupts.seen)
