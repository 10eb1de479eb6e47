"""`car runtimes list|start|stop|logs|install`: the servers car starts and supervises."""

from __future__ import annotations

import os
import shlex
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from .common import engine, err, fail, handle_errors, out, print_json, spinner

runtimes_app = typer.Typer(
    help="Servers car starts and supervises: llama.cpp server, vLLM, Ollama.", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="print the result object as JSON")]
NameArg = Annotated[str, typer.Argument(help="a runtime instance, a managed model's id or name, or `ollama`")]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


@runtimes_app.command("list")
@handle_errors
def list_runtimes(as_json: JsonOpt = False) -> None:
    """Each runtime (installed? version) and each instance: running ones (in any process) and the
    catalog's managed models that nothing runs yet."""
    eng = engine()
    kinds = []
    for spec in eng.runtimes.specs.values():
        problem = spec.problem()  # not just "not installed": an old vllm found is said so
        kinds.append({
            "runtime": spec.name, "serves_kind": spec.kind, "installed": problem is None,
            "version": spec.version(), "install": spec.install_hint, "problem": problem,
        })  # fmt: skip
    instances = eng.runtimes.statuses()
    if as_json:
        print_json({"runtimes": kinds, "instances": [s.model_dump(mode="json") for s in instances]})
        return
    for row in kinds:
        found = f"[green]{escape(str(row['version'] or 'installed'))}[/]"
        where = found if row["installed"] else f"[dim]{escape(str(row['problem']))}[/]"
        out.print(f"[bold]{escape(str(row['runtime']))}[/] ({row['serves_kind']} models): {where}")
    table = Table(header_style="bold")
    for column in ("instance", "model", "state", "url", "pid", "owner", "restarts", "idle"):
        table.add_column(column, no_wrap=column in ("instance", "url"))
    for s in instances:
        table.add_row(
            s.name, s.model_id or "-", str(s.state), s.base_url or "-", str(s.pid or "-"),
            str(s.owner_pid or "-"), str(s.restarts), _ago(s.idle_s),
        )  # fmt: skip
    out.print(table)
    for s in instances:
        if s.error:  # why one failed (its owner gave up), or its owner died
            out.print(f"{escape(s.name)}: {escape(s.error)}", style="red" if s.state == "failed" else "dim")
    out.print(f"{len(instances)} instance(s)", style="dim")


@runtimes_app.command("start")
@handle_errors
def start(
    name: NameArg,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            help="stop after this many idle seconds; 0: never (default: [runtimes] idle_timeout_s "
            "when config.toml or CAR_RUNTIMES__IDLE_TIMEOUT_S sets it, else run until stopped)"
        ),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for it to answer")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a runtime and supervise it in the foreground (restarts on crash) until Ctrl-C,
    `car runtimes stop`, or the idle timeout. If it already runs, say where and return."""
    from ..runtimes.supervisor import RuntimeState

    eng = engine()
    settings = eng.runtimes.settings
    if idle_timeout is not None:
        settings.idle_timeout_s = idle_timeout
    elif "idle_timeout_s" not in settings.model_fields_set:  # only the built-in 15 minutes
        settings.idle_timeout_s = None  # a server started on purpose runs until stopped
    if timeout is not None:
        settings.start_timeout_s = timeout
    runtime = eng.runtimes.find(name)
    with spinner(f"Starting {runtime.name}..."):
        url = runtime.ensure()
    status = runtime.status()
    if as_json:
        print_json(status)
    owned = runtime.state is RuntimeState.RUNNING
    if not as_json:
        how = f"pid {status.pid}, log {status.log_path}" if owned else f"already running ({runtime.state})"
        served = ", ".join(status.served) or "-"
        out.print(f"[bold]{escape(runtime.name)}[/] at {escape(str(url))}: {escape(served)} ({escape(how)})")
    if not owned:
        return
    if not as_json:
        err.print("supervising; Ctrl-C or `car runtimes stop` stops it", style="dim")
    interrupted = False
    try:
        while runtime.state not in (RuntimeState.STOPPED, RuntimeState.FAILED):
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        runtime.stop()
    if runtime.state is RuntimeState.FAILED and not interrupted:
        raise fail(f"{runtime.name}: {runtime.error}")
    if interrupted:  # 130, as `car serve` and `car generate` exit on Ctrl-C (it was 0)
        raise typer.Exit(130)
    why = _STOPPED_BECAUSE.get(runtime.stopped_because or "", "stopped")
    err.print(f"{escape(runtime.name)}: stopped ({why})")  # it ended without a word


_STOPPED_BECAUSE = {"idle": "idle timeout", "stop": "`car runtimes stop`"}


@runtimes_app.command("stop")
@handle_errors
def stop(name: NameArg, timeout: Annotated[float, typer.Option(help="seconds to wait")] = 30.0) -> None:
    """Ask the process supervising a runtime to stop it, and wait until it has."""
    from ..runtimes.managed import stop_elsewhere

    eng = engine()
    runtime = eng.runtimes.find(name)
    if stop_elsewhere(eng.runtimes.home, runtime.name, timeout_s=timeout):  # still running: an error
        out.print(f"{runtime.name}: stopped")
    else:
        out.print(f"{runtime.name}: not running")


@runtimes_app.command("logs")
@handle_errors
def logs(
    name: NameArg,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="how many lines from the end")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
) -> None:
    """The end of a runtime's log ($CAR_HOME/logs/NAME.log)."""
    runtime = engine().runtimes.find(name)
    path = runtime.files.log_path
    if not path.is_file():
        raise fail(f"{runtime.name} has no log yet ({path})")
    for line in runtime.files.log_tail(lines):
        typer.echo(line)
    if follow:
        _follow(path)


def _follow(path: Any) -> None:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        try:
            while True:
                chunk = f.read()
                if chunk:
                    typer.echo(chunk.decode("utf-8", "replace"), nl=False)
                else:
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return


@runtimes_app.command("install")
@handle_errors
def install(
    runtime: Annotated[str, typer.Argument(help="the runtime to provision (vllm)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the commands, run nothing")] = False,
) -> None:
    """Install vLLM into $CAR_HOME/runtimes/vllm (with uv when it is on PATH, else venv + pip)."""
    from ..runtimes.specs import VllmSpec

    eng = engine()
    spec = eng.runtimes.specs.get(runtime)
    if not isinstance(spec, VllmSpec):
        hint = getattr(spec, "install_hint", "no such runtime")
        raise fail(f"only vllm is provisioned by car; {runtime}: {hint}", 2)
    steps = spec.provision_steps(eng.runtimes.home)
    for argv in steps:
        out.print(shlex.join(argv))
    if dry_run:
        return
    log = eng.runtimes.home / "logs" / "vllm-install.log"
    with spinner("Installing vLLM (this downloads several GB)..."):
        found = spec.provision(eng.runtimes.home, steps, log)
    out.print(f"vllm: {found} (log {log})")
