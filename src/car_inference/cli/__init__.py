"""The `car` command line."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

_interrupted: list[int] = []


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # Remembered, not raised: an exception raised from a signal handler lands in whatever code runs
    # then, and where that is a weakref callback or a __del__ (the import system runs some), Python
    # prints "Exception ignored" and drops it: the Ctrl-C was lost and the command carried on.
    _interrupted.append(signum)


# Ctrl-C during the imports below (a few hundred ms, before any command handles it) exits 130
# quietly once they are done; the usual KeyboardInterrupt is back after them.
_QUIET_START = (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
)
if _QUIET_START:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import typer  # noqa: E402

from .. import __version__  # noqa: E402
from . import generate, ground, hardware, health, keys, media, routing, serve, speech, state, tasks  # noqa: E402
from .models import config_app, models_app  # noqa: E402
from .runtimes import runtimes_app  # noqa: E402

if _QUIET_START:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted:
        raise SystemExit(130)  # no traceback, the exit status of any other Ctrl-C

app = typer.Typer(
    name="car",
    help="One API over local and remote AI models, with an adaptive router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(runtimes_app, name="runtimes")
generate.register(app)
tasks.register(app)
ground.register(app)
speech.register(app)
media.register(app)
keys.register(app)
routing.register(app)
health.register(app)
hardware.register(app)
serve.register(app)
state.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"car-inference {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    pass


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before a command's own handling (typer building the commands)
        raise SystemExit(130) from None
