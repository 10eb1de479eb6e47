"""The `car` command line."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import generate, health, keys, media, routing, serve, speech, tasks
from .models import config_app, models_app
from .runtimes import runtimes_app

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
speech.register(app)
media.register(app)
keys.register(app)
routing.register(app)
health.register(app)
serve.register(app)


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
    app()
