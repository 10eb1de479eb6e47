"""`car health`: what can run, where typical requests go, breakers and spend.

Circuit breakers live in the process that serves the requests. When a `car serve` answers at the
configured address (``server.host``/``server.port``, or ``--server``), its ``/v1/health`` report is
shown, breakers included; otherwise this process's own view, which has seen no traffic. The output
says which it is.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from ..config import CarConfig, load_config
from ..errors import money
from .common import EXIT_USAGE, engine, err, fail, handle_errors, out, print_json

# A server on this machine answers its health report in milliseconds; a port nobody listens on
# is refused at once. The timeout only bounds a server that is stuck.
_PROBE_TIMEOUT_S = 3.0
# Addresses a server listens on that a client cannot connect to as such.
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def server_url(config: CarConfig) -> str:
    """Where the configured `car serve` would answer."""
    host = _ANY_ADDRESS.get(config.server.host, config.server.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{config.server.port}"


def fetch_server_report(url: str, api_key: str | None) -> tuple[dict[str, Any] | None, str]:
    """The server's ``/v1/health`` report, or None and why there is none."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/v1/health", headers=headers, timeout=_PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return None, f"no server answered at {url} ({type(exc).__name__})"
    if response.status_code in (401, 403):
        return None, f"the server at {url} refused the API key (server.api_keys / CAR_SERVER_API_KEYS)"
    try:
        report = response.json()
    except ValueError:
        report = None
    if response.status_code != 200 or not isinstance(report, dict) or "circuit_breakers" not in report:
        return None, f"{url} answered /v1/health with HTTP {response.status_code}, not a car serve report"
    return report, f"the server at {url}"


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def health(
        server: Annotated[
            str | None,
            typer.Option("--server", help="ask this car serve (default: server.host:port from config)"),
        ] = None,
        local: Annotated[
            bool, typer.Option("--local", help="this process's view, even when a server runs")
        ] = False,
        as_json: Annotated[
            bool, typer.Option("--json", help="the health report as JSON, with its `source`")
        ] = False,
    ) -> None:
        """What can run now, where typical requests go, circuit breakers and spend.

        Asks the running `car serve` when one answers (its breakers are the ones that matter),
        else shows this process's view."""
        if server is not None and local:
            raise fail("--server and --local exclude each other", EXIT_USAGE)
        if server is not None and not server.startswith(("http://", "https://")):
            raise fail(f"--server must be an http:// or https:// URL, not {server!r}", EXIT_USAGE)
        config = load_config()
        url = server or server_url(config)
        report: dict[str, Any] | None = None
        source: dict[str, str | None]
        why = "--local"
        if not local:
            report, why = fetch_server_report(
                url, config.server.api_keys[0] if config.server.api_keys else None
            )
        if report is not None:
            source = {"from": "server", "url": url}
        elif server is not None:
            raise fail(why)  # the server asked for by name must answer
        else:
            report = engine().model_health().model_dump(mode="json")
            source = {"from": "local", "url": None, "why": why}
        if as_json:
            print_json({**report, "source": source})
            return
        _print_report(report, source)


def _print_report(report: dict[str, Any], source: dict[str, str | None]) -> None:
    if source["from"] == "server":
        out.print(f"[bold]from the server at {escape(str(source['url']))}[/]")
    else:
        out.print(f"[bold]local view[/] ({escape(str(source['why']))}; breakers are per process)")
    out.print(
        f"{report['available_models']}/{report['total_models']} models available "
        f"({report['local_models']} local, {report['remote_models']} remote)"
    )
    for d in report["defaults"]:
        state = "[green]ok[/]" if d["available"] else "[red]unavailable[/]"
        out.print(f"  default {d['capability']}: {escape(d['configured_model'])} {state}")
    for s in report["routing_scenarios"]:
        out.print(f"  {s['name']}: {escape(s['model_id'] or '-')} ({s['strategy'] or 'no candidate'})")
    _print_priors(report.get("benchmark_priors") or [])
    _print_breakers(report.get("circuit_breakers") or {}, source["from"] == "server")
    _print_spend(report.get("spend"))
    _print_state(report.get("state"))
    _print_speech(report.get("speech"))
    _print_kinds(report.get("kinds") or [])
    _print_extras(report)


def _print_priors(priors: list[dict[str, Any]]) -> None:
    """The benchmark priors in use (``CAR_BENCHMARK_PRIORS_PATH`` and the home's files), a line
    per model: its overall score, its task scores and the file it came from."""
    if not priors:
        out.print("benchmark priors: none (untried models start from the catalog's quality)")
        return
    out.print("benchmark priors:")
    for p in priors:
        tasks = ", ".join(f"{task} {score:.2f}" for task, score in sorted(p["task_scores"].items()))
        out.print(
            f"  {p['model_id']}: {p['overall_score']:.2f} overall"
            + (f" ({tasks})" if tasks else "")
            + f" from {p['source_path']}",
            markup=False,
        )


def _print_spend(spend: dict[str, Any] | None) -> None:
    """Spend today and this month, each against its limit (``car spend`` has the table)."""
    if not spend:
        return
    parts = []
    for e in spend["entries"]:
        scope = "" if e["scope"] == "global" else f"{e['scope']} "
        when = "today" if e["period"] == "daily" else "this month"
        limit = e.get("limit_usd")
        shown = f"{scope}{when} {money(e['spent_usd'])}"
        if limit is None:
            shown += " (no limit)"
        else:
            shown += f" of {money(limit)} ({money(e['remaining_usd'] or 0.0)} left)"
        parts.append(shown)
    out.print("spend: " + "; ".join(parts), markup=False)


def _print_kinds(kinds: list[dict[str, Any]]) -> None:
    """One line: the source kinds with models, how many can run; a kind without its backend,
    with the install hint (kinds.py; a plugin's kinds say where they came from)."""
    if not kinds:
        return
    shown = [
        f"{k['kind']} {k['available_models']}/{k['models']}"
        + (f" ({k['origin']})" if k.get("origin") not in (None, "built-in") else "")
        for k in kinds
        if k.get("models")
    ]
    out.print("model kinds (available/total): " + ", ".join(shown), markup=False)
    for k in kinds:
        if k.get("models") and not k.get("backend_installed"):
            out.print(
                f"  {k['kind']}: no backend installed ({k.get('install_hint') or 'see README'})", markup=False
            )


def _print_speech(speech: dict[str, Any] | None) -> None:
    """Per direction: what a request naming no model runs, and each side's first model."""
    if not speech:
        return
    policy = "local first" if speech["prefer_local"] else "hosted first"
    if speech["prefer_local"] and not speech["allow_remote_fallback"]:
        policy += ", no hosted fallback"
    out.print(f"speech ({policy}):")
    for short, name in (("stt", "speech to text"), ("tts", "text to speech")):
        model = speech.get(f"{short}_model")
        state = "[green]ok[/]" if speech.get(f"{short}_available") else "[red]unavailable[/]"
        sides = ", ".join(
            f"{side} {escape(str(speech.get(f'{side}_{short}_default') or '-'))}"
            for side in ("local", "remote")
        )
        out.print(f"  {name}: {escape(model) + ' ' + state if model else '[red]none[/]'} ({sides})")
    for problem in speech.get("problems") or []:
        out.print(f"  [yellow]{escape(problem)}[/]")


def _print_state(state: dict[str, Any] | None) -> None:
    if not state:  # a server of an older version
        return
    where = f"learned state: {state['backend']} at {escape(str(state['location']))}"
    if state.get("error"):
        out.print(f"{where} [red]unreachable[/] ({escape(str(state['error']))})")
    else:
        out.print(f"{where}, schema {state['schema_version']}, {state['round_trip_ms']:.2f} ms round trip")
    if state.get("lag_s", 0) >= 1:  # records wait a writer's window (50 ms) when it keeps up
        out.print(
            f"  {state.get('pending', 0)} answers' records not written yet, the oldest "
            f"{state['lag_s']:.0f} s ago: the store is not keeping up",
            markup=False,
        )
    if state.get("buffered") or state.get("dropped"):
        out.print(
            f"  {state.get('buffered', 0)} writes waiting in memory for it, "
            f"{state.get('dropped', 0)} lost beyond [state] buffer_records",
            markup=False,
        )


def _print_extras(report: dict[str, Any]) -> None:
    """Breaker coordination, managed runtimes and the machine, when the report has them."""
    coord = report.get("coordination")
    if coord:
        if coord["backend"] == "local":
            out.print("breaker coordination: local (this process only)")
        elif coord.get("reachable") is False:
            why = escape(str(coord.get("error")))
            out.print(f"breaker coordination: redis [red]unreachable[/], local meanwhile ({why})")
        else:
            latency = coord.get("latency_ms")
            shown = f", {latency:.2f} ms round trip" if isinstance(latency, int | float) else ""
            out.print(f"breaker coordination: redis at {escape(str(coord.get('url')))}{shown}")
    for r in report.get("runtimes") or []:
        where = f" at {r['base_url']}" if r.get("base_url") else ""
        out.print(
            f"runtime {escape(r['name'])} ({r['runtime']}): {r['state']}{where}, {r['restarts']} restarts"
        )
    hw = (report.get("hardware") or {}).get("hardware")
    if hw:
        gpus = (
            ", ".join(f"{g['name']} {g['memory_total_mb'] // 1024} GiB" for g in hw.get("gpus") or [])
            or "no GPU"
        )
        out.print(
            f"machine: {hw['cpu']['cores']} cores, {hw['memory']['total_mb'] // 1024} GiB RAM, {escape(gpus)}"
            " (car hardware: what fits)"
        )


def _print_breakers(breakers: dict[str, dict[str, Any]], from_server: bool) -> None:
    if not breakers:
        seen = "the server's models have" if from_server else "this process has"
        out.print(f"circuit breakers: none yet ({seen} had no failures or traffic to count)")
        return
    table = Table(header_style="bold", title="circuit breakers")
    for column in ("model", "state", "consecutive failures", "retry in"):
        table.add_column(column)
    for model_id, b in sorted(breakers.items()):
        state = str(b.get("state", "?"))
        style = {"open": "red", "half_open": "yellow"}.get(state, "green")
        retry = b.get("retry_in_s")
        table.add_row(
            escape(model_id),
            f"[{style}]{state}[/]",
            str(b.get("consecutive_failures", 0)),
            f"{retry:.0f} s" if isinstance(retry, int | float) else "-",
        )
    out.print(table)
    if not any(b.get("state") != "closed" for b in breakers.values()):
        err.print("all circuits closed", style="dim")
