"""`car route`, `car feedback`, `car spend`, `car health`, `car profiles`."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from car_inference.cli import app

runner = CliRunner()


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def car_input(stdin: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_route_explains_and_prints_json() -> None:
    code, out, _ = car("route", "Write a Python function that merges two sorted lists", "--explain")
    assert code == 0
    assert "huggingface/smollm2-135m-instruct:q4_1" in out and "candidates" in out and "excluded" in out
    assert "not available" in out and "lacks generate" in out
    code, out, _ = car("route", "hi", "--json", "--workload", "background")
    decision = json.loads(out)
    assert code == 0 and decision["strategy"] in ("adaptive", "explore") and decision["candidates"]
    assert decision["candidates"][0]["model_id"] == decision["model_id"]


def test_route_reads_a_dash_prompt_from_stdin() -> None:
    """`car route -` routed the text "-" (a chat request), where `car generate -` reads stdin."""
    ask = "Write a Python function that merges two sorted lists and prove its complexity"
    piped = json.loads(car_input(ask, "route", "-", "--json")[1])
    given = json.loads(car("route", ask, "--json")[1])
    assert piped["task_family"] == given["task_family"] == "code"
    assert piped["estimated_input_tokens"] == given["estimated_input_tokens"]
    code, _, err = car_input("  \n", "route", "-")
    assert code == 2 and "the prompt is empty" in err


def test_route_explains_a_named_model_without_an_empty_table() -> None:
    code, out, _ = car("route", "hi", "-m", "smollm2", "--explain")
    assert code == 0 and "no candidates were scored: the model was named" in out
    assert "candidates (quality" not in out


def test_route_with_tools_or_vision_needs_a_capable_model() -> None:
    code, _, err = car("route", "What is in this image?", "--vision")
    assert code == 1 and "vision" in err and "Traceback" not in err


def test_route_honours_preferred_model(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text('[preferred]\ngenerate = "smollm2"\n')
    _, out, _ = car("route", "hi", "--json")
    data = json.loads(out)
    assert data["strategy"] == "preferred" and data["reason"] == "preferred generation model override"
    assert all(not c["notes"].startswith("chosen") for c in data["candidates"]), "the preferred model was"


def test_feedback_spend_health_and_profiles(tmp_path: Path) -> None:
    code, out, _ = car("generate", "Say hi.", "-n", "4", "--json")
    trace = json.loads(out)["trace_id"]
    assert car("feedback", trace, "0.8")[0] == 0
    code, _, err = car("feedback", "unknown-trace", "0.8")
    assert code == 2 and "no such trace" in err, "an unknown trace is named wrongly, as a model"
    assert car("feedback", trace, "7")[0] == 2, "score outside 0..1 is a usage error"

    code, out, _ = car("spend", "--json")
    assert code == 0 and {e["scope"] for e in json.loads(out)["entries"]} == {"global"}
    code, out, _ = car("health", "--json")
    assert code == 0 and json.loads(out)["routing_scenarios"]
    code, out, _ = car("health")
    assert code == 0 and "default generate" in out

    path = tmp_path / "profiles.json"
    code, out, _ = car("profiles", "export", str(path))
    profiles = json.loads(path.read_text())
    assert code == 0 and any(p["model_id"].startswith("huggingface/smollm2") for p in profiles)
    assert car("profiles", "import", str(path))[0] == 0
    code, out, _ = car("profiles", "export", "-")  # stdout, as `generate -` reads stdin
    assert code == 0 and json.loads(out) == profiles
    code, out, err = car_input(out, "profiles", "import", "-")  # stdin: `export - | import -`
    assert code == 0 and f"imported {len(profiles)} profile(s)" in out
    assert "unused" not in err, "an export's own keys are the router's"
    # "Merge" said nothing of what an import replaces: the models whose outcomes it replaced.
    assert "replaced what was learned here for huggingface/smollm2-135m-instruct:q4_1 (" in out
    # A profile of a model this catalog lacks is kept, and named: a misspelt id was taken silently.
    misspelt = [{"model_id": "huggingface/smollm2-135m-instruct:q4_2", "total_calls": 0}]
    code, _, err = car_input(json.dumps(misspelt), "profiles", "import", "-")
    assert code == 0 and "huggingface/smollm2-135m-instruct:q4_2 is not in this catalog" in err
    assert "did you mean huggingface/smollm2-135m-instruct:q4_1" in err
    # A task key the router never reads is kept, and named: "Code" was imported without a word.
    stats = {k: {"calls": 1} for k in ("Code", "code", "code|latin-short", "template|p0123456789")}
    odd = [{"model_id": "huggingface/smollm2-135m-instruct:q4_1", "total_calls": 1, "task_stats": stats}]
    code, _, err = car_input(json.dumps(odd), "profiles", "import", "-")
    assert code == 0 and "task_stats 'Code' kept, unused" in err and "'code'" not in err
    code, _, err = car_input("[" * 100_000, "profiles", "import", "-")  # was a RecursionError traceback
    assert code == 2 and "nested too deeply" in err and "Traceback" not in err
    code, out, _ = car("profiles", "forget", "smollm2-135m")
    assert code == 0 and "forgot" in out and "huggingface/smollm2-135m" in out
    code, out, _ = car("profiles", "forget", "smollm2-135m")
    assert code == 0 and "nothing was learned about huggingface/smollm2-135m" in out
    code, _, err = car("profiles", "forget", "smolm2-135m")
    assert code == 2 and "smolm2-135m" in err and "smollm2-135m" in err, "unknown: named, close matches"
    path.write_text("{not json")
    code, _, err = car("profiles", "import", str(path))
    assert code == 2 and "profiles.json is not a JSON profiles file" in err
    code, _, err = car("profiles", "import", str(tmp_path / "none.json"))
    assert code == 2 and "cannot read" in err and "No such file" in err
    path.write_text("[1, 2]")
    code, _, err = car("profiles", "import", str(path))
    assert code == 2 and "Input should be a valid dictionary" in err and "Traceback" not in err
