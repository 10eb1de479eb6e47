"""`car models ...` and `car config ...`."""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from ..schema import ModelCapability
from .common import engine, err, fail, handle_errors, out, print_json, run, spinner

models_app = typer.Typer(help="List, inspect and pull models.", no_args_is_help=True)
config_app = typer.Typer(help="Show settings.", no_args_is_help=True)


def _price(value: float) -> str:
    return f"{value:g}" if value else "-"


@models_app.command("list")
@handle_errors
def list_models(
    capability: Annotated[
        list[ModelCapability] | None,
        typer.Option("--capability", "-c", help="required capability (repeatable)"),
    ] = None,
    local: Annotated[bool, typer.Option("--local", help="only models that run on this machine")] = False,
    remote: Annotated[bool, typer.Option("--remote", help="only hosted models")] = False,
    available: Annotated[bool, typer.Option("--available", help="only models that can run now")] = False,
    provider: Annotated[str | None, typer.Option(help="only this provider")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the model schemas as JSON")] = False,
) -> None:
    """The catalog: built-in models plus $CAR_HOME/models.toml."""
    eng = engine()
    models = eng.registry.query(
        capabilities=list(capability or []),
        local_only=local,
        remote_only=remote,
        available_only=available,
        provider=provider,
    )
    if as_json:
        print_json([m.model_dump(mode="json") for m in models])
        return
    table = Table(show_lines=False, header_style="bold")
    for column in ("id", "kind", "capabilities", "context", "$in/M", "$out/M", "available"):
        table.add_column(column, no_wrap=column in ("id", "kind"))
    for m in models:
        table.add_row(
            m.id,
            m.kind,
            ", ".join(c.value for c in m.capabilities),
            f"{m.context_length:,}" if m.context_length else "-",
            _price(m.cost.input_per_mtok),
            _price(m.cost.output_per_mtok),
            "[green]yes[/]" if m.available else "[dim]no[/]",
        )
    out.print(table)
    out.print(f"{len(models)} model(s)", style="dim")


@models_app.command("show")
@handle_errors
def show_model(
    model: Annotated[str, typer.Argument(help="model id, name or alias")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Everything the catalog knows about one model."""
    eng = engine()
    schema = eng.resolve(model)
    data = schema.model_dump(mode="json")
    if as_json:
        print_json(data)
        return
    out.print(f"[bold]{schema.id}[/]  {schema.name}")
    if schema.description:
        out.print(schema.description)
    for key in ("provider", "family", "context_length", "max_output_tokens", "quality", "tags", "aliases"):
        if data.get(key) not in (None, [], "", 0):
            out.print(f"  {key}: {data[key]}")
    out.print(f"  capabilities: {', '.join(c.value for c in schema.capabilities)}")
    out.print(f"  source: {data['source']}")
    cost = {k: v for k, v in data["cost"].items() if v}
    if cost:
        out.print(f"  cost: {cost}")
    if schema.available:
        out.print("  available: [green]yes[/]")
    else:
        out.print(f"  available: [red]no[/] — {eng.registry.unavailable_reason(schema)}")


@models_app.command("pull")
@handle_errors
def pull_model(
    model: Annotated[str, typer.Argument(help="model id, name or alias")],
    as_json: Annotated[
        bool, typer.Option("--json", help="print the model id and its local path as JSON")
    ] = False,
) -> None:
    """Download a model's files from Hugging Face (the only command that downloads weights)."""
    eng = engine()
    schema = eng.resolve(model)
    with spinner(f"Pulling {schema.id}..."):
        path = eng.pull(schema.id)
    if as_json:
        print_json({"model": schema.id, "path": str(path), "available": eng.resolve(schema.id).available})
        return
    out.print(f"{schema.id}: {path}", markup=False)


@models_app.command("discover")
@handle_errors
def discover(
    endpoint: Annotated[
        list[str] | None, typer.Argument(help="endpoint names from models.toml (default: all of them)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ask the OpenAI-compatible endpoints in models.toml which models they serve."""
    eng = engine()
    names = endpoint or [e.name for e in eng.registry.endpoints]
    if not names:
        raise fail("no [[endpoints]] in models.toml", 1)
    report = run(eng.discover_endpoints(names))
    if as_json:
        print_json({k: v if isinstance(v, list) else {"error": str(v)} for k, v in report.items()})
        return
    failed = False
    for name, found in report.items():
        if isinstance(found, list):
            out.print(f"[bold]{name}[/]: {len(found)} model(s)")
            for model_id in found:
                out.print(f"  {model_id}")
        else:
            failed = True
            err.print(f"[bold red]{name}[/]: {found}")
    if failed:
        raise typer.Exit(1)


@models_app.command("rm")
@handle_errors
def remove(
    model: Annotated[str, typer.Argument(help="model id, name or alias")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Delete a pulled model's files from the Hugging Face cache and say how much that freed."""
    from ..catalog.remove import remove_model

    schema = engine().resolve(model)
    removal = remove_model(schema)
    if as_json:
        print_json({"model": schema.id, "freed_bytes": removal.freed_bytes,
                    "removed": [str(p) for p in removal.paths]})  # fmt: skip
        return
    out.print(f"{schema.id}: removed, {removal.freed_bytes / 1e6:,.1f} MB freed", markup=False)


@models_app.command("ps")
@handle_errors
def running(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Models loaded in the servers car supervises on this machine (any process): measured
    resident memory of each server and its workers, and how long it has been idle."""
    eng = engine()
    rows = [s for s in eng.runtimes.statuses() if s.state in ("running", "restarting", "attached")]
    if as_json:
        print_json(rows)
        return
    table = Table(header_style="bold")
    for column in ("model", "runtime", "pid", "memory", "idle", "url"):
        table.add_column(column, no_wrap=column in ("model", "url"))
    for s in rows:
        table.add_row(
            ", ".join(s.served) or s.model_id or s.name, s.runtime, str(s.pid or "-"),
            f"{s.rss_mb:,.0f} MB" if s.rss_mb is not None else "-",
            "-" if s.idle_s is None else f"{s.idle_s:.0f}s", s.base_url or "-",
        )  # fmt: skip
    out.print(table)
    out.print(f"{len(rows)} running", style="dim")


@config_app.command("show")
@handle_errors
def show_config(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The effective settings (file + environment), secrets masked."""
    from ..config import load_config

    config = load_config()
    data = config.redacted()
    if as_json:
        print_json(data)
        return
    where = "" if config.paths.config_file.exists() else ", not present"
    sys.stdout.write(f"# CAR_HOME {config.home} (config file: {config.paths.config_file}{where})\n")
    sys.stdout.write(to_toml({k: v for k, v in data.items() if k != "home"}))


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def to_toml(data: dict[str, Any], table: tuple[str, ...] = ()) -> str:
    """``data`` as TOML that ``tomllib`` reads back; a setting that is not set (None, which TOML
    cannot spell) becomes a comment, so the output can be pasted into config.toml."""
    lines: list[str] = []
    subtables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key in subtables:
            continue
        if value is None:
            lines.append(f"# {_key(key)} = (not set)")
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    text = ""
    if table and (lines or not subtables):
        text += f"[{'.'.join(_key(k) for k in table)}]\n"
    text += "".join(line + "\n" for line in lines)
    for key, value in subtables.items():
        text += ("\n" if text else "") + to_toml(value, (*table, key))
    return text


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{" + inner + "}"
    return json.dumps(str(value))
