"""`car state migrate`: move the learned state from the SQLite file into shared PostgreSQL;
`car state prune`: delete old traces, roll up the spend ledger."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..config import load_config, make_home
from ..redaction import redact_url
from .common import EXIT_USAGE, fail, handle_errors, out, print_json

state_app = typer.Typer(
    help="Where the learned routing state lives (SQLite or PostgreSQL).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(state_app, name="state")


@state_app.command("migrate")
@handle_errors
def migrate(
    source: Annotated[
        Path | None, typer.Option("--from", help="the SQLite state file (default: $CAR_HOME/state.db)")
    ] = None,
    target: Annotated[
        str | None, typer.Option("--to", help="postgresql:// URL (default: the state url in config.toml)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result object as JSON")] = False,
) -> None:
    """Copy outcomes, traces, feedback, learned router state and spend from SQLite into
    PostgreSQL. The file's learned counters are added to those there, once per file; other rows
    already there are kept, so running it twice copies nothing twice."""
    from ..routing.store_api import is_postgres_url
    from ..routing.store_migrate import copy_sqlite_state

    config = load_config()
    url = target or config.state.url
    if url is None:
        raise fail("no PostgreSQL to migrate to: pass --to postgresql://... or set [state] url", EXIT_USAGE)
    if not is_postgres_url(url):
        raise fail(f"--to must be a postgresql:// URL, not {redact_url(url)!r}", EXIT_USAGE)
    path = source or config.paths.state_db
    try:
        result = copy_sqlite_state(path, url)
    except sqlite3.DatabaseError as exc:  # part way: the handler would name $CAR_HOME/state.db
        raise fail(
            f"{path}: the SQLite state cannot be read ({exc or type(exc).__name__}); it was left as it is,"
            " and what was copied before stays (a second run copies nothing twice)",
            EXIT_USAGE,
        ) from None
    if as_json:
        print_json(result)
        return
    where = f"{result.target}, that is {result.server}" if result.server else result.target
    out.print(f"{escape(result.source)} -> {escape(where)} (schema {result.schema_version})")
    table = Table(header_style="bold")
    for column in ("table", "rows in SQLite", "copied", "added to", "already there"):
        table.add_column(column)
    for t in result.tables:
        table.add_row(t.table, str(t.source_rows), str(t.copied), str(t.added_to), str(t.already_there))
    out.print(table)
    if not result.counters_added:
        out.print(
            "this file's learned counters were added by an earlier copy: only rows not there were copied"
        )


@state_app.command("prune")
@handle_errors
def prune(
    days: Annotated[
        float | None,
        typer.Option(
            "--older-than-days", min=0, help="default: [state] trace_retention_days (30); 0 deletes nothing"
        ),
    ] = None,
    template_days: Annotated[
        float | None,
        typer.Option(
            "--templates-older-than-days",
            min=0,
            help="default: [state] template_retention_days (90); 0 forgets no template",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result object as JSON")] = False,
) -> None:
    """Delete traces (and their feedback) older than the retention, forget the learned rows of
    templates not seen for their retention, and roll the spend ledger's past days up into one
    entry per day, provider and model, as `car serve` does every hour. The rest of the learned
    router state and the spend totals stay."""
    from ..routing.store_api import compact_old_spend, forget_dormant_templates, open_store, prune_old_traces

    config = load_config()
    days = config.state.trace_retention_days if days is None else days
    template_days = config.state.template_retention_days if template_days is None else template_days
    for option, value in (("--older-than-days", days), ("--templates-older-than-days", template_days)):
        if not math.isfinite(value):  # inf deleted nothing and --json printed Infinity, not JSON
            raise fail(f"{option} must be a finite number of days, not {value}", EXIT_USAGE)
    make_home(config.home)  # a CAR_HOME that is a file: one line, not a FileExistsError traceback
    state = config.state
    store = open_store(state.url, config.paths.state_db, answer_timeout_s=state.answer_timeout_s)
    try:
        deleted = prune_old_traces(store, days)
        forgotten = len(forget_dormant_templates(store, template_days))
        rolled = compact_old_spend(store)
    finally:
        store.close()
    if as_json:
        print_json(
            {
                "deleted": deleted, "older_than_days": days, "templates_forgotten": forgotten,
                "templates_older_than_days": template_days, "spend_entries_rolled_up": rolled,
            }
        )  # fmt: skip
        return
    out.print(
        f"deleted {deleted} traces older than {days:g} days" if days > 0 else "kept every trace (0 days)"
    )
    out.print(
        f"forgot {forgotten} templates not seen for {template_days:g} days"
        if template_days > 0
        else "kept every template (0 days)"
    )
    out.print(f"rolled {rolled} spend entries up into daily totals")
