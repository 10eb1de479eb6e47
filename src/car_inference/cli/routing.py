"""`car route`, `car feedback`, `car spend`, `car profiles export|import|forget` (`car health`: health.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import money
from ..requests import GenerateParams, GenerateRequest, ImageBlock, RoutingWorkload
from .common import EXIT_USAGE, engine, err, fail, handle_errors, named_model, out, print_json

profiles_app = typer.Typer(help="Export, import or forget learned model profiles.", no_args_is_help=True)

_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
_PIXEL = ImageBlock(data="iVBORw0KGgo=", media_type="image/png")


def _money(value: float) -> str:
    return f"${value:.5f}" if value else "$0"


def register(app: typer.Typer) -> None:
    app.add_typer(profiles_app, name="profiles")

    @app.command()
    @handle_errors
    def route(
        prompt: Annotated[
            str, typer.Argument(help="the request to route (nothing is generated); - reads stdin")
        ],
        explain: Annotated[
            bool, typer.Option("--explain", help="show every candidate and exclusion")
        ] = False,
        tools: Annotated[bool, typer.Option("--tools", help="as if the request offered tools")] = False,
        vision: Annotated[bool, typer.Option("--vision", help="as if the request carried an image")] = False,
        workload: Annotated[
            RoutingWorkload, typer.Option(help="interactive or background")
        ] = RoutingWorkload.INTERACTIVE,
        model: Annotated[
            str | None, typer.Option("--model", "-m", callback=named_model, help="an explicit model")
        ] = None,
        max_tokens: Annotated[
            int | None, typer.Option("--max-tokens", "-n", min=1, help="caps expected output and cost")
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="the decision with its candidates as JSON")
        ] = False,
    ) -> None:
        """Show where a request would go and why."""
        if prompt == "-":  # as `car generate -` reads it (the text "-" was routed)
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise fail("the prompt is empty", 2)
        request = GenerateRequest(
            prompt=prompt,
            model=model,
            params=GenerateParams.model_validate(
                {"workload": workload} | ({"max_tokens": max_tokens} if max_tokens else {})
            ),
            tools=[_WEATHER_TOOL] if tools else None,
            images=[_PIXEL] if vision else None,
        )
        decision = engine(discover=model is None).route(request)
        if as_json:
            print_json(decision.model_dump(mode="json"))
            return
        out.print(f"[bold]{decision.model_id}[/]  ({decision.strategy})")
        out.print(decision.reason)
        tokens = decision.estimated_input_tokens
        out.print(
            f"task {decision.task_family}/{decision.complexity}, ~{tokens} input tokens, "
            f"context {decision.context_length or '?'}, predicted quality {decision.predicted_quality:.3f}"
            + (", needs compaction" if decision.needs_compaction else "")
            + (f", thinking budget {decision.thinking_budget}" if decision.thinking_budget else "")
        )
        if decision.fallbacks:
            out.print("fallbacks: " + ", ".join(decision.fallbacks))
        if not explain:
            return
        if not decision.candidates:  # an empty table was printed for a named model
            out.print("no candidates were scored: the model was named, so nothing was routed")
            return
        table = Table(header_style="bold", title="candidates (quality: belief mean ± sd, and the draw)")
        for column in ("model", "score", "quality", "drawn", "obs", "latency ms", "out tok", "cost", "why"):
            table.add_column(column)
        for c in decision.candidates:
            chosen = "[bold green]" if c.model_id == decision.model_id else ""
            table.add_row(
                f"{chosen}{c.model_id}",
                f"{c.score:.3f}",
                f"{c.quality:.2f} ± {c.quality_sd:.2f}",
                f"{c.sampled_quality:.2f}",
                str(c.quality_observations),
                f"{c.latency_ms:,.0f}",
                f"{c.expected_output_tokens:.0f}",
                _money(c.cost_usd),
                c.notes,
            )
        out.print(table)
        if decision.excluded:
            excluded = Table(header_style="bold", title="excluded")
            excluded.add_column("model")
            excluded.add_column("why")
            for model_id, why in sorted(decision.excluded.items()):
                excluded.add_row(model_id, why)
            out.print(excluded)

    @app.command()
    @handle_errors
    def feedback(
        trace_id: Annotated[str, typer.Argument(help="the trace_id of a result")],
        score: Annotated[float, typer.Argument(min=0.0, max=1.0, help="0 = bad .. 1 = good")],
    ) -> None:
        """Rate an answer; the router learns from it."""
        engine().feedback(trace_id, score)
        out.print(f"recorded {score:g} for {trace_id}")

    @app.command()
    @handle_errors
    def spend(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Spend today and this month against the configured limits."""
        status = engine().spend_status()
        if as_json:
            print_json(status)
            return
        table = Table(header_style="bold")
        for column in ("scope", "period", "spent", "limit", "remaining"):
            table.add_column(column)
        for row in status.entries:
            limit = "-" if row.limit_usd is None else money(row.limit_usd)
            remaining = "-" if row.remaining_usd is None else money(row.remaining_usd)
            table.add_row(row.scope, row.period, money(row.spent_usd), limit, remaining)
        out.print(table)


@profiles_app.command("export")
@handle_errors
def export_profiles(
    path: Annotated[Path, typer.Argument(help="where to write outcome_profiles.json; - for stdout")],
) -> None:
    """Write the learned profiles in the seed's outcome_profiles.json shape."""
    if str(path) == "-":  # as `car generate -` reads stdin (it wrote a file named "-")
        print_json(engine().export_profiles())
        return
    count = engine().export_profiles_file(path)
    out.print(f"wrote {count} profile(s) to {path}")


@profiles_app.command("forget")
@handle_errors
def forget_profile(model: Annotated[str, typer.Argument(help="a model id or name")]) -> None:
    """Forget what the router learned about a model (after an upgrade behind the same name, say):
    it is tried again in every context as a new model is. Its traces stay."""
    model_id, gone = engine().forget_model(model)
    out.print(
        f"forgot {gone} learned row(s) of {model_id}" if gone else f"nothing was learned about {model_id}"
    )


@profiles_app.command("import")
@handle_errors
def import_profiles(
    path: Annotated[Path, typer.Argument(help="an outcome_profiles.json file; - for stdin")],
) -> None:
    """Load profiles from an outcome_profiles.json file: each replaces that model's learned state
    here (other models keep theirs; importing a file twice counts it once)."""
    try:  # `-` is stdin, as export's `-` is stdout (`car profiles export - | ... import -`)
        text = (
            sys.stdin.buffer.read().decode("utf-8") if str(path) == "-" else path.read_text(encoding="utf-8")
        )
        data: Any = json.loads(text)
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise fail(f"{path} is not a JSON profiles file: {exc}", EXIT_USAGE) from None
    except RecursionError:  # "[[[[..." a hundred thousand deep: the decoder's traceback
        raise fail(f"{path} is not a JSON profiles file: it is nested too deeply", EXIT_USAGE) from None
    if not isinstance(data, list):
        raise fail(f"{path}: expected a JSON list of profiles", EXIT_USAGE)
    eng = engine()
    ids = {p.get("model_id") for p in data if isinstance(p, dict)}
    had = {p.model_id: p.total_calls for p in eng.export_profiles() if p.model_id in ids and p.total_calls}
    count = eng.import_profiles(data)
    out.print(f"imported {count} profile(s) from {path}")
    if had:  # "merge" said nothing of the 601 outcomes a 5-call profile replaced
        lost = ", ".join(f"{model} ({calls:,} calls)" for model, calls in sorted(had.items()))
        out.print(f"replaced what was learned here for {lost}")
    _say_unknown(eng, sorted(i for i in ids if isinstance(i, str) and eng.registry.find(i) is None))
    _say_unread(data)


def _say_unread(data: list[Any]) -> None:
    """Task keys no request is counted under are kept but named (``profiles.unread_keys``)."""
    from ..routing.profiles import ModelProfile, unread_keys

    for raw in data:
        keys = unread_keys(ModelProfile.model_validate(raw))
        if keys:
            err.print(
                f"warning: {raw['model_id']}: task_stats {', '.join(map(repr, keys))} kept, unused:"
                " the router reads a task family (chat, code, math, ...), family|cluster"
                " (code|latin-short) or template|p<hash>",
                markup=False,
            )


def _say_unknown(eng: Any, unknown: list[str]) -> None:
    """Profiles of models this catalog lacks are kept (a model may be added later) but named: a
    misspelt id was imported without a word, and nothing ever routes to it."""
    from ..errors import close_matches

    known = [m.id for m in eng.registry.list()]
    for model_id in unknown:
        near = close_matches(model_id, known)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        err.print(
            f"warning: {model_id} is not in this catalog: its profile is kept, unused{hint}", markup=False
        )
