"""Running the app: the bind check, uvicorn in the foreground (``car serve``) or in a background
thread (tests, benchmarks, an application embedding the server)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from ..config import ServerSettings
from .common import ServerState
from .logs import install_redaction
from .transport import coalescing_protocol

__all__ = [
    "BindRefused",
    "PortInUse",
    "Server",
    "ServerThread",
    "bind",
    "check_bind",
    "is_loopback",
    "serve",
    "uvicorn_config",
]


class BindRefused(Exception):
    """Asked to listen beyond this machine without API keys."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (``localhost``, 127.0.0.0/8, ``::1``).
    Any other name or address (``0.0.0.0``, ``::``, a LAN address, a host name) is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: list[str]) -> None:
    """Refuse to listen on a non-loopback address without API keys (``BindRefused``)."""
    if is_loopback(host) or any(k.strip() for k in api_keys):
        return
    raise BindRefused(
        f"refusing to listen on {host} without API keys: anyone who can reach it could use your models "
        "and provider keys; set CAR_SERVER_API_KEYS=key1,key2 (or api_keys = [...] under [server] in "
        "$CAR_HOME/config.toml), or bind 127.0.0.1"
    )


def uvicorn_config(
    app: Any, settings: ServerSettings, *, log_level: str = "info", **extra: Any
) -> uvicorn.Config:
    protocol = coalescing_protocol(settings.header_timeout_s)
    if protocol is not None:
        extra.setdefault("http", protocol)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        lifespan="on",
        ws_max_size=int(settings.ws_max_message_mb * 1024 * 1024),
        # In-flight work is told to stop at once (ServerState.stop); this only bounds a stuck one.
        timeout_graceful_shutdown=2,
        **extra,
    )
    install_redaction(settings.api_keys)  # after uvicorn set its loggers up
    return config


class Server(uvicorn.Server):
    """uvicorn's server, which first asks the app's work in flight to end (streams with an error
    event and ``[DONE]``, waiting requests with a 503) so that a shutdown takes a moment, cuts
    nothing silently, and leaves no task writing to a closed store. ``stop_requested``: asked once
    started, for a stop asked for before uvicorn's own signal handlers were in place."""

    def __init__(self, config: uvicorn.Config, stop_requested: Callable[[], bool] | None = None) -> None:
        super().__init__(config)
        self._stop_requested = stop_requested
        self.stopped_by: int | None = None  # the first signal that asked it to stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._stop_requested is not None and self._stop_requested():
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "car", None)
        if state is not None:
            await state.stop()
        await super().shutdown(sockets)


class PortInUse(Exception):
    """The address to listen on is taken (or cannot be bound)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``, or ``PortInUse`` saying why not (in one line)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as exc:
        taken = exc.errno == errno.EADDRINUSE  # the port's hint only then (not for a host not ours)
        reason = "the port is in use (choose another with --port)" if taken else exc.strerror or str(exc)
        raise PortInUse(f"cannot listen on {host}:{port}: {reason}") from None


def serve(
    app: Any,
    settings: ServerSettings,
    *,
    log_level: str = "info",
    sock: socket.socket | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> int | None:
    """Serve until interrupted (Ctrl-C / SIGTERM), on ``sock`` when given (see ``bind``). A
    ``stop_requested`` that says yes once the server has started stops it at once (gracefully).
    Returns the signal that stopped it, if one did and the process is still here: uvicorn gives
    the signal back to the handler in place before it, and one the parent set to be ignored (a
    script's ``car serve &``) does nothing, so the caller decides the exit status."""
    check_bind(settings.host, settings.api_keys)
    sock = sock if sock is not None else bind(settings.host, settings.port)
    server = Server(uvicorn_config(app, settings, log_level=log_level), stop_requested)
    server.run(sockets=[sock])
    return server.stopped_by


class ServerThread:
    """The app served by uvicorn in a daemon thread on a free loopback port (its own event loop)::

    with ServerThread(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")

    uvicorn's part of the settings (header timeout, WebSocket message size) are the app's own
    unless ``settings`` is given; host and port are always loopback and a free port.
    """

    def __init__(
        self, app: Any, settings: ServerSettings | None = None, *, log_level: str = "warning"
    ) -> None:
        if settings is None:
            state = getattr(getattr(app, "state", None), "car", None)
            settings = state.settings if isinstance(state, ServerState) else ServerSettings()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn_config(
            app, settings.model_copy(update={"host": "127.0.0.1", "port": self.port}), log_level=log_level
        )
        self.server = Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="car-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout_s: float = 30) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
