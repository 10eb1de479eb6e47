"""`car keys stats|reset` and `car secrets put|list|rm`: API keys in rotation and in the OS keyring."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.table import Table

from ..config import load_config
from ..errors import close_matches
from ..keys import KeyPool, KeyStats
from ..secrets import SecretStore, check_name
from .common import EXIT_USAGE, err, fail, handle_errors, out, print_json

keys_app = typer.Typer(help="API keys in rotation: health and statistics.", no_args_is_help=True)
secrets_app = typer.Typer(help="Store API keys in the OS keyring.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print the result object as JSON")]
NameArg = Annotated[str, typer.Argument(help="the key variable, e.g. OPENAI_API_KEY")]


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(secrets_app, name="secrets")


def _pool() -> KeyPool:
    """The key pool, its statistics read from the state database; a database that cannot be used
    is a configuration error (exit 2, as for every other command), not "reset 0 key(s)", exit 0."""
    config = load_config()
    quiet = logging.getLogger("car_inference.keys")
    level, quiet.level = quiet.level, logging.ERROR  # its warning would repeat the error below
    try:
        pool = KeyPool.for_config(config)
    finally:
        quiet.setLevel(level)
    if pool.stats_error is not None:
        pool.close()
        raise fail(f"the key statistics cannot be used: {pool.stats_error}", EXIT_USAGE)
    return pool


def _state(row: KeyStats) -> str:
    if row.state == "cooling" and row.cooling_until is not None:
        return f"cooling until {row.cooling_until.astimezone():%H:%M:%S}"  # local time, as last used
    return row.state if row.source is not None else f"{row.state} (not configured now)"


@keys_app.command("stats")
@handle_errors
def stats(
    env_var: Annotated[str | None, typer.Argument(help="only this key variable")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests, failures and rate limits per key (keys masked)."""
    pool = _pool()
    _check_known(pool, env_var)
    data = pool.stats([env_var] if env_var else None)
    if as_json:
        print_json({name: [row.model_dump(mode="json") for row in rows] for name, rows in data.items()})
        return
    if not data:
        out.print("no API keys found (set OPENAI_API_KEY or the like, or `car secrets put NAME`)")
        return
    table = Table(header_style="bold")
    for column in ("variable", "key", "source", "requests", "failures", "429s", "last used", "last", "state"):
        table.add_column(column)
    for name, rows in data.items():
        for row in rows:
            table.add_row(
                name,
                row.masked,
                row.source or "-",
                str(row.requests),
                str(row.failures),
                str(row.rate_limits),
                f"{row.last_used.astimezone():%Y-%m-%d %H:%M:%S}" if row.last_used else "-",
                str(row.last_status) if row.last_status is not None else "-",
                _state(row),
            )
    out.print(table)


@keys_app.command("reset")
@handle_errors
def reset(env_var: Annotated[str | None, typer.Argument(help="only this key variable")] = None) -> None:
    """Re-enable keys disabled after a 401/403 and end cooldowns."""
    pool = _pool()
    _check_known(pool, env_var)
    changed = pool.reset(env_var)
    out.print(f"reset {changed} key(s)")


def _check_known(pool: KeyPool, env_var: str | None) -> None:
    """A variable no key is configured or used under is an error (exit 2) naming the known ones:
    `reset` said "reset 0 key(s)" and `stats` "no API keys found", both exiting 0."""
    known = sorted(pool.known_variables())
    if env_var is not None and env_var not in known:
        close = close_matches(env_var, known)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise fail(
            f"no key variable {env_var!r} is configured or used here (known: {', '.join(known)}){hint}", 2
        )


@secrets_app.command("put")
@handle_errors
def put(name: NameArg) -> None:
    """Store a key in the OS keyring: typed at a hidden prompt, or read from stdin when piped."""
    # Hidden prompt at a terminal (never echoed); piped input keeps it scriptable.
    if not name.strip():  # said "no value given for " about the value
        raise fail("the secret's name is empty: give the key variable it stands for, e.g. OPENAI_API_KEY", 2)
    check_name(name)  # before the prompt: a bad name was said only after the secret was typed
    value = typer.prompt(name, hide_input=True) if sys.stdin.isatty() else sys.stdin.read()
    value = value.strip()
    if not value:
        raise fail(f"no value given for {name}", 2)
    SecretStore(load_config().home).put(name, value)
    err.print(f"stored {name} in the OS keyring")


@secrets_app.command("list")
@handle_errors
def list_secrets(as_json: JsonOpt = False) -> None:
    """Names of the keys stored with `car secrets put` (never their values)."""
    store = SecretStore(load_config().home)
    store.ensure_available()  # without a keyring an empty list would say "nothing stored": not so
    names = store.indexed()  # an unreadable index is an error, not "nothing stored"
    if as_json:
        print_json(names)
        return
    for name in names:
        out.print(name)


@secrets_app.command("rm")
@handle_errors
def remove(name: NameArg) -> None:
    """Delete a stored key."""
    if not SecretStore(load_config().home).delete(name):
        raise fail(f"no stored secret named {name}")
    out.print(f"removed {name}")
