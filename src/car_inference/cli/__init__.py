"""The `car` command line."""

from __future__ import annotations

from typing import Annotated, cast

from .interrupts import EXIT_INTERRUPTED, Interrupts, leave_now

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


# click's exception root, which typer vendors from 0.2x on: found through a class typer exports.
# (Typed as its subclass BadParameter, which adds nothing main() uses.)
_CLICK_EXCEPTION = cast(
    "type[typer.BadParameter]", next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
)


def main() -> None:
    """The console script: every error one line on stderr, usage errors included (click's own
    are a usage line, a hint and a box), exit status 2 for those."""
    from .common import err

    try:
        code = app(standalone_mode=False)
    except _CLICK_EXCEPTION as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `car models` alone: typer printed the help
            raise SystemExit(2) from None
        ctx = getattr(exc, "ctx", None)
        see = f" (`{ctx.command_path} --help`)" if ctx is not None else ""
        message = exc.format_message().replace(": Value error, ", ": ")  # a validator's own words
        err.print(f"error: {message}{see}", markup=False)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:  # end of input at a prompt
        err.print("aborted", markup=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # before a command's own handling (typer building the commands)
        leave_now()
    if code == EXIT_INTERRUPTED:  # a Ctrl-C, acted on: out now, a second one cannot interrupt that
        leave_now()
    raise SystemExit(code if isinstance(code, int) else 0)
