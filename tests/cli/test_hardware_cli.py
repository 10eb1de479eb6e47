"""`car hardware`: this machine and the catalog models that fit, as JSON and as text."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from car_inference.cli import app
from car_inference.hardware import detect_hardware

runner = CliRunner()


def test_hardware_json_reports_the_machine_and_recommendations() -> None:
    result = runner.invoke(app, ["hardware", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    machine = detect_hardware()
    assert report["hardware"]["cpu"]["cores"] == machine.cpu.cores
    assert report["hardware"]["memory"]["total_mb"] == machine.memory.total_mb
    assert [g["name"] for g in report["hardware"]["gpus"]] == [g.name for g in machine.gpus]
    recs = {r["capability"]: r["models"] for r in report["recommendations"]}
    # The embedded defaults are small enough for any machine that runs the tests, and are pulled.
    embed = {m["id"]: m for m in recs["embed"]}
    assert embed["sentence-transformers/all-minilm-l6-v2"]["available"] is True
    generate = recs["generate"]
    assert generate and all(
        m["needs_mb"] <= report["ram_budget_mb"] or m["placement"] == "gpu" for m in generate
    )
    qualities = [m["quality"] or 0.0 for m in generate]
    assert qualities == sorted(qualities, reverse=True)


def test_hardware_text_output() -> None:
    result = runner.invoke(app, ["hardware"])
    assert result.exit_code == 0, result.stderr
    assert "CPU" in result.stdout and "RAM" in result.stdout and "best local models that fit" in result.stdout
    assert "all-minilm-l6-v2" in result.stdout
    # A model that is not here says what brings it: a pull (or an extra, for a packaged one).
    assert "available" in result.stdout and "no (car models pull)" in result.stdout
