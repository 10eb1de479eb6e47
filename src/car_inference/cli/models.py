"""`car models ...` and `car config ...`."""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import InferenceError, close_matches
from ..schema import ModelCapability
from .common import EXIT_USAGE, engine, err, fail, handle_errors, out, print_json, run

models_app = typer.Typer(help="List, inspect and pull models.", no_args_is_help=True)
config_app = typer.Typer(help="Show settings.", no_args_is_help=True)


def _price(value: float) -> str:
    return f"{value:g}" if value else "-"


@models_app.command("list")
@handle_errors
def list_models(
    capability: Annotated[
        list[ModelCapability] | None,
        typer.Option(
            "--capability",
            "-c",
            metavar="CAPABILITY",  # the choices as one <list[...]> wrapped mid-word in the help
            help="required capability (repeatable): " + ", ".join(c.value for c in ModelCapability),
        ),
    ] = None,
    local: Annotated[bool, typer.Option("--local", help="only models that run on this machine")] = False,
    remote: Annotated[bool, typer.Option("--remote", help="only hosted models")] = False,
    available: Annotated[bool, typer.Option("--available", help="only models that can run now")] = False,
    provider: Annotated[str | None, typer.Option(help="only this provider")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the model schemas as JSON")] = False,
) -> None:
    """The catalog: built-in models plus $CAR_HOME/models.toml."""
    if local and remote:  # printed an empty table, as if the catalog had none
        raise fail("--local and --remote exclude each other: give one, or neither for both", EXIT_USAGE)
    eng = engine(discover=True)
    if provider is not None:
        providers = sorted({m.provider for m in eng.list_models()})
        if provider.lower() not in {p.lower() for p in providers}:  # printed "0 model(s)" with no hint
            close = close_matches(provider, providers)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            known = ", ".join(providers)
            raise fail(f"no provider {provider!r} in the catalog (providers: {known}){hint}", EXIT_USAGE)
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
    out.print(f"[bold]{escape(schema.id)}[/]  {escape(schema.name)}")
    if schema.description:
        out.print(schema.description)
    for key in ("provider", "family", "context_length", "max_output_tokens", "quality", "tags", "aliases"):
        if data.get(key) not in (None, [], "", 0):
            out.print(f"  {key}: {escape(str(data[key]))}")
    out.print(f"  capabilities: {', '.join(c.value for c in schema.capabilities)}")
    out.print(f"  source: {escape(str(data['source']))}")
    cost = {k: v for k, v in data["cost"].items() if v}
    if cost:
        out.print(f"  cost: {escape(str(cost))}")
    if schema.available:
        out.print("  available: [green]yes[/]")
    else:
        out.print(f"  available: [red]no[/] — {escape(eng.registry.unavailable_reason(schema))}")


@models_app.command("pull")
@handle_errors
def pull_model(
    model: Annotated[
        str, typer.Argument(help="model id, name or alias; `ollama/<tag>` pulls through Ollama")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="print what was pulled as JSON (no progress bars)")
    ] = False,
) -> None:
    """Download a model: a Hub model's files into the Hugging Face cache (resumable, verified
    against the Hub's sha256), an Ollama model through Ollama (the only command that downloads)."""
    from ..catalog.pull import pull
    from .progress import PullBars
    from .pulling import describe_pull, find_model, pull_ollama

    eng = engine()
    schema = find_model(eng, model)
    bars = PullBars(err, enabled=not as_json)
    if schema.spec.runtime == "ollama":  # Ollama pulls its own models
        host, found = pull_ollama(eng, schema, bars)
        if as_json:
            print_json({"model": schema.id, "host": host, "pulled": found.model_dump() if found else None})
            return
        what = f", {found.size / 1e6:,.1f} MB, {found.quantization_level or '?'}" if found else ""
        out.print(f"{schema.id}: pulled by Ollama at {host}{what}", markup=False)
        return
    try:
        with bars:
            report = pull(schema, bars)
    except KeyboardInterrupt:  # it exited 130 without a word; what came is kept
        err.print(f"stopped: `car models pull {model}` again continues where it stopped", markup=False)
        raise
    eng.registry.refresh_availability()
    if as_json:
        print_json({"model": schema.id, "path": str(report.path), "repo": report.repo or None,
                    "commit": report.commit or None, "previous_commit": report.previous_commit,
                    "downloaded_bytes": report.downloaded_bytes, "files": [vars(f) for f in report.files],
                    "available": eng.resolve(schema.id).available})  # fmt: skip
        return
    out.print(describe_pull(report), markup=False)


@models_app.command("upgrade")
@handle_errors
def upgrade(
    model: Annotated[
        str | None, typer.Argument(help="one pulled model (default: every pulled model)")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="only report what an upgrade would pull")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Pull a newer revision of pulled models (the Hub's commit moved) and better quants from the
    catalog that fit this machine; the old revision's files are deleted, an old quant is kept.
    A named Ollama model (`ollama/<tag>`) is pulled again through Ollama."""
    from ..catalog.upgrade import Upgrade, apply_each, check_upgrades, pulled_models
    from ..hardware import cached_hardware
    from .progress import PullBars
    from .pulling import describe_upgrade, find_model, upgrade_ollama

    eng = engine()
    catalog = eng.registry.list()
    targets = pulled_models(catalog)
    schema = find_model(eng, model) if model is not None else None
    upgrades: list[Upgrade]
    if schema is not None and schema.spec.runtime == "ollama":
        upgrades = [upgrade_ollama(eng, schema, PullBars(err, enabled=not as_json), check)]
    else:
        if schema is not None:
            if schema.id not in {m.id for m in targets}:
                raise fail(_not_upgradable(schema), EXIT_USAGE)
            targets = [schema]
        upgrades = check_upgrades(targets, catalog, cached_hardware())
    if not check and (schema is None or schema.kind != "ollama"):
        by_id = {m.id: m for m in catalog}
        with PullBars(err, enabled=not as_json) as bars:
            upgrades = apply_each(upgrades, by_id, bars)
        eng.registry.refresh_availability()
    failed = sum(u.error is not None for u in upgrades)
    if as_json:
        print_json([u.to_json() for u in upgrades])
    else:
        for u in upgrades:
            out.print(describe_upgrade(u, check), markup=False)
        pending = sum(u.kind in ("revision", "quant") and u.error is None for u in upgrades)
        if not upgrades:
            out.print("no pulled models", style="dim")
        elif check and pending:
            out.print(f"{pending} upgrade(s) available: `car models upgrade` pulls them", style="dim")
    if failed:  # each model was tried and reported; the status says not all went well
        raise typer.Exit(1)


def _not_upgradable(schema: Any) -> str:
    """Why ``car models upgrade`` has nothing to do for a model not pulled from the Hub: it sent
    packaged and hosted models to `car models pull`, which does nothing for them or refuses."""
    from ..catalog.pull import pull_plan

    try:
        plan = pull_plan(schema)
    except InferenceError as exc:
        return f"{schema.id} is not pulled from the Hub ({getattr(exc, 'reason', exc)}): nothing to upgrade"
    if plan is None:
        return (f"{schema.id} is not pulled from the Hub (its files come with a package, or are a file of "
                "yours): upgrade the package with pip")  # fmt: skip
    return f"{schema.id} is not pulled yet: `car models pull {schema.id}` first"


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
    known = [e.name for e in eng.registry.endpoints]
    names = endpoint or known
    if not names:
        raise fail("no [[endpoints]] in models.toml", EXIT_USAGE)
    unknown = [n for n in names if n not in known]
    if unknown:
        listed = ", ".join(known) or "none"
        near = close_matches(unknown[0], known)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise fail(
            f"no endpoint named {', '.join(unknown)} in models.toml (endpoints: {listed}){hint}", EXIT_USAGE
        )
    report = run(eng.discover_endpoints(names))
    if as_json:
        print_json({k: v if isinstance(v, list) else {"error": str(v)} for k, v in report.items()})
        return
    failed = False
    for name, found in report.items():
        if isinstance(found, list):
            out.print(f"[bold]{escape(name)}[/]: {len(found)} model(s)")
            for model_id in found:
                out.print(f"  {escape(model_id)}")
        else:
            failed = True
            err.print(f"[bold red]{escape(name)}[/]: {escape(str(found))}")
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
    from .pulling import find_model

    eng = engine()
    schema = find_model(eng, model)  # `ollama/<tag>` too, as pull, upgrade and pulled take it
    repo = getattr(schema.source, "hf_repo", None)
    pinned = frozenset(  # commits of the repo other entries are pinned to: theirs, not this model's
        str(getattr(m.source, "revision", ""))
        for m in eng.registry.list()
        if m.id != schema.id
        and repo
        and getattr(m.source, "hf_repo", None) == repo
        and re.fullmatch(r"[0-9a-f]{40}", getattr(m.source, "revision", None) or "")
    )
    removal = remove_model(schema, keep=pinned)
    if as_json:
        print_json({"model": schema.id, "freed_bytes": removal.freed_bytes,
                    "removed": [str(p) for p in removal.paths]})  # fmt: skip
        return
    out.print(f"{schema.id}: removed, {removal.freed_bytes / 1e6:,.1f} MB freed", markup=False)


@models_app.command("ps")
@handle_errors
def running(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What is loaded now: models in the servers car supervises on this machine (any process),
    with the measured resident memory of each server and its workers, and models loaded in-process
    by car processes (a `car serve`), with the memory their load added; how long each has been idle."""
    from .pulling import loaded_rows

    eng = engine()
    rows = [s for s in eng.runtimes.statuses() if s.state in ("running", "restarting", "attached")]
    loaded = loaded_rows(eng)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows] + loaded)
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
    for r in loaded:
        memory = (
            f"{r['measured_mb']:,.0f} MB" if r["measured_mb"] is not None else f"~{r['estimated_mb']:,.0f} MB"
        )
        idle = "busy" if r["state"] == "busy" else f"{r['idle_s']:.0f}s"
        table.add_row(r["model"], f"in-process ({r['kind']})", str(r["pid"]), memory, idle, "-")
    out.print(table)
    out.print(f"{len(rows)} running, {len(loaded)} loaded in-process", style="dim")


@models_app.command("pulled")
@handle_errors
def pulled(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Models whose files are on this machine: catalog models pulled from the Hub (their revision
    and size on disk) and, when Ollama answers, what Ollama has pulled (its `/api/tags`)."""
    from ..catalog.locate import local_path
    from ..catalog.pull import pull_plan
    from ..catalog.upgrade import cached_commit, pulled_models
    from ..runtimes.ollama import ollama_answers, ollama_host, ollama_tags

    eng = engine()
    rows: list[dict[str, Any]] = []
    for m in pulled_models(eng.registry.list()):
        plan = pull_plan(m)
        path = local_path(m)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        commit = (cached_commit(plan, m) or "?")[:12] if plan else ""
        rows.append({"model": m.id, "source": f"{plan.repo}@{commit}"
                     if plan else str(path), "size": sum(p.stat().st_size for p in files)})  # fmt: skip
    host = ollama_host()
    if ollama_answers(host):
        try:
            tags = ollama_tags(host)
        except InferenceError as exc:  # the Hub's rows are listed still (it failed them all)
            err.print(f"warning: {exc}", style="yellow", markup=False)
            tags = []
        rows += [{"model": f"ollama/{t.name}", "source": f"ollama {host} ({t.quantization_level or '?'})",
                  "size": t.size} for t in tags]  # fmt: skip
    if as_json:
        print_json(rows)
        return
    table = Table(header_style="bold")
    for column in ("model", "from", "size"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        table.add_row(r["model"], r["source"], f"{r['size'] / 1e6:,.1f} MB")
    out.print(table)
    out.print(f"{len(rows)} pulled", style="dim")


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
    if isinstance(value, str):  # DEL is a control character TOML wants escaped (json leaves it)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{" + inner + "}"
    return json.dumps(str(value))
