"""The `car` command line."""

from __future__ import annotations

from typing import Annotated

from .interrupts import Interrupts

# Ctrl-C during the imports below (a few hundred ms, before any command handles it) exits 130
# quietly once they are done (``interrupts``); the usual KeyboardInterrupt is back after them.
_starting = Interrupts().install()

import typer  # noqa: E402

from .. import __version__  # noqa: E402
from . import generate, ground, hardware, health, keys, media, routing, serve, speech, state, tasks  # noqa: E402
from .models import config_app, models_app  # noqa: E402
from .runtimes import runtimes_app  # noqa: E402

_starting.restore()
_starting.check()

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
