"""What every command shares: consoles, the engine, JSON output, errors as one line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import sys
import typing
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from ..errors import (
    ConfigError,
    InferenceError,
    InvalidInput,
    ModelNotFound,
    SpendLimitExceeded,
    TokenizationError,
    TraceNotFound,
    UnsupportedMode,
    validation_summary,
)
from .interrupts import leave_at_the_next

T = TypeVar("T")

# Piped output is not cut to 80 columns: tables stay one row per model for grep and friends.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# Exit statuses: 2 for usage errors and unknown models (typer uses 2 for usage too), 1 otherwise.
EXIT_FAILURE = 1
EXIT_USAGE = 2


# The engines a command made, closed when it ends (``handle_errors``): never closed, each left
# state.db's write-ahead log beside it, so a copy of state.db alone missed the last records.
_ENGINES: list[Any] = []


def engine(*, discover: bool = False) -> Any:
    """A fresh engine for ``$CAR_HOME`` (imported lazily: `car --version` needs none of it),
    closed when the command ends. ``discover``: first ask the ``discover = true`` endpoints what
    they serve, as `car serve` does at start-up (`car models list` said such an endpoint's provider
    did not exist, and `car route` never considered its models); one that fails is a warning."""
    from ..engine import InferenceEngine

    made = InferenceEngine()
    _ENGINES.append(made)
    if discover and any(e.discover for e in made.registry.endpoints):
        for name, outcome in run(made.discover_endpoints()).items():
            if not isinstance(outcome, list):
                err.print(f"warning: endpoint {name}: discovery failed: {outcome}", markup=False)
    return made


def _close_engines() -> None:
    while _ENGINES:
        with contextlib.suppress(Exception):  # the command's own outcome is what the user sees
            _ENGINES.pop().close()


def named_model(value: str | None) -> str | None:
    """``--model``'s check: an empty name (``-m "$MODEL"`` with the variable unset) is a usage
    error, not a request to route: leaving the option out is how one asks for that."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty; leave it out to let the router choose")
    return value


ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", callback=named_model, help="model id, name or alias")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result object as JSON")]


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    return typer.Exit(code)


def from_stdin(value: str, what: str) -> str:
    """``value``, or stdin when it is ``-``, as `car generate -` reads its prompt: `car classify -`,
    `rerank -` and `tokenize MODEL -` worked on the one-character text "-" and said nothing."""
    if value != "-":
        return value
    text = sys.stdin.read()
    if not text.strip():
        raise fail(f"stdin held no {what}", EXIT_USAGE)
    return text


# Errors in what the user typed or configured; token ids a vocabulary does not have are one.
# What the caller asked for wrongly (a model or trace that does not exist, input, configuration).
# What the caller must change (HTTP 400/404 from the server): exit 2; failures of the work: exit 1.
# A spend limit is configuration the command cannot get past (the server's 402).
_USAGE_ERRORS = (
    ModelNotFound, TraceNotFound, ConfigError, InvalidInput, TokenizationError, UnsupportedMode,
    SpendLimitExceeded,
)  # fmt: skip


def _exit_code(exc: InferenceError) -> int:
    return EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_FAILURE


def handle_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn our exceptions into one clear line on stderr and a non-zero exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except ModelNotFound as exc:
            err.print(f"[bold red]error:[/] model not found: {escape(exc.name)}", markup=True)
            if exc.suggestions:
                err.print(f"did you mean: {', '.join(exc.suggestions)}?")
            if exc.why:
                err.print(escape(exc.why), markup=True)
            raise typer.Exit(EXIT_USAGE) from None
        except InferenceError as exc:
            raise fail(_one_line(str(exc)), _exit_code(exc)) from None
        except ValidationError as exc:  # a request or setting built from the command's arguments
            raise fail(_one_line(_as_options(exc, fn)), EXIT_USAGE) from None
        except KeyboardInterrupt:
            leave_at_the_next()  # a second Ctrl-C while the exit waits for a worker: out at once
            raise typer.Exit(130) from None
        except sqlite3.DatabaseError as exc:  # state.db damaged past its first pages: a traceback
            raise fail(_damaged_state(exc), EXIT_USAGE) from None
        finally:
            _close_engines()

    return wrapper


# Request fields whose option has another name (a field no option of the command fills stays named).
_FIELD_OPTIONS = {
    "width": "--size",
    "height": "--size",
    "variant_count": "--count",
    "duration_s": "--duration",
    "negative_prompt": "--negative",
    "output_path": "--output",
    "idle_timeout_s": "--idle-timeout",  # car runtimes start: [runtimes] settings
    "start_timeout_s": "--timeout",
}


def _options(command: Callable[..., Any]) -> dict[str, str]:
    """The command's options by parameter name: ``{"seed": "--seed", "max_tokens": "--max-tokens"}``
    (the longest of each option's names, as typer reads them from the annotations)."""
    try:
        hints = typing.get_type_hints(command, include_extras=True)
    except (NameError, TypeError):
        return {}
    options = {}
    for name, hint in hints.items():
        info = next(
            (m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)), None
        )
        if info is None:
            continue
        given = [info.default] if isinstance(info.default, str) and info.default.startswith("-") else []
        names = [*given, *(info.param_decls or ())] or ["--" + name.replace("_", "-")]
        options[name] = max(names, key=len)
    return options


def _as_options(exc: ValidationError, command: Callable[..., Any]) -> str:
    """``exc`` in one line, a field the command has an option for named as that option
    (``Invalid value for '--seed': ...``, as click says it), not as the request calls it."""
    own = _options(command)
    parts = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error.get("loc", ()))
        msg = str(error.get("msg", "")).removeprefix("Value error, ")
        field = loc[-1] if loc else ""
        if field in own:
            parts.append(f"Invalid value for '{own[field]}': {msg}")
        elif field in _FIELD_OPTIONS:  # filled by an option of another name: say which part
            parts.append(f"Invalid value for '{_FIELD_OPTIONS[field]}' ({field}): {msg}")
        else:
            parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or validation_summary(exc)


def _damaged_state(exc: sqlite3.DatabaseError) -> str:
    """The one line for a state database that fails part way (damaged pages, a full disk)."""
    reason = str(exc) or type(exc).__name__
    path = _state_path()
    if "malformed" in reason or "not a database" in reason:
        return (
            f"the learned-state database {path} is damaged ({reason}): move it aside to"
            " start with empty state, or restore it from a backup"
        )
    if "full" in reason:
        return f"the disk of the learned-state database {path} is full ({reason}): free space and try again"
    return f"the learned-state database {path} failed: {reason}"


def _state_path() -> str:
    """The state database's path, as the message names it ($CAR_HOME/state.db was said literally)."""
    from ..config import load_config

    try:
        return str(load_config().paths.state_db)
    except InferenceError:
        return "$CAR_HOME/state.db"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def print_json(value: Any) -> None:
    """Machine-readable output on stdout: the task's result object."""
    if isinstance(value, BaseModel):
        text = value.model_dump_json(indent=2)
    elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
        text = json.dumps([v.model_dump(mode="json") for v in value], indent=2)
    else:
        text = json.dumps(value, indent=2, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@contextmanager
def spinner(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner on stderr while a model loads or thinks; silent when stderr is not a terminal."""
    if enabled and err.is_terminal and not os.environ.get("CAR_NO_SPINNER"):
        with err.status(message, spinner="dots"):
            yield
    else:
        yield


def split_csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
