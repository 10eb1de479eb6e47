"""`car health`: the running server's breakers when one answers, else the local view, and it says which."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from car_inference.cli import app
from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer, Fault

runner = CliRunner()
KEY = "k-health-test-0001"
MODEL = "fake/gpt-4o-mini"


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


@pytest.fixture
def server(isolated_home: Path, fake: FakeProviderServer) -> Iterator[ServerThread]:
    """A real server (with an API key) whose model fake/gpt-4o-mini has had its breaker opened by
    three upstream 500s, and a config.toml that points `car health` at it."""
    (isolated_home / "models.toml").write_text(
        f'[[endpoints]]\nname = "fake"\nbase_url = "{fake.openai_base_url}"\nmodels = ["gpt-4o-mini"]\n'
    )
    engine = InferenceEngine(home=isolated_home)
    thread = ServerThread(create_app(engine, ServerSettings(api_keys=[KEY]))).start()
    try:
        fake.queue(*[Fault.server_error() for _ in range(3)])
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {KEY}"}
        for _ in range(3):
            reply = httpx.post(thread.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert reply.status_code >= 500
        (isolated_home / "config.toml").write_text(f'[server]\nport = {thread.port}\napi_keys = ["{KEY}"]\n')
        yield thread
    finally:
        thread.stop()
        engine.close()


def test_shows_the_servers_breakers(server: ServerThread) -> None:
    code, out, err = car("health")
    assert code == 0, err
    assert f"from the server at http://127.0.0.1:{server.port}" in out
    row = next(line for line in out.splitlines() if MODEL in line)
    assert "open" in row and "3" in row

    code, out, _ = car("health", "--json")
    report = json.loads(out)
    assert code == 0 and report["source"] == {"from": "server", "url": f"http://127.0.0.1:{server.port}"}
    assert report["circuit_breakers"][MODEL]["state"] == "open"
    assert report["routing_scenarios"]

    code, out, _ = car("health", "--server", server.url, "--json")
    assert code == 0 and json.loads(out)["circuit_breakers"][MODEL]["state"] == "open"


def test_local_view_says_so(server: ServerThread, isolated_home: Path) -> None:
    code, out, _ = car("health", "--local")
    assert code == 0 and out.startswith("local view (--local; breakers are per process)")
    assert "circuit breakers: none yet" in out
    assert "breaker coordination: local (this process only)" in out
    assert f"machine: {os.cpu_count()} cores" in out and "no GPU" in out

    # A key the server refuses: the local view, and why.
    (isolated_home / "config.toml").write_text(f'[server]\nport = {server.port}\napi_keys = ["wrong"]\n')
    code, out, _ = car("health", "--json")
    source = json.loads(out)["source"]
    assert code == 0 and source["from"] == "local" and "refused the API key" in source["why"]


def test_without_a_server(isolated_home: Path) -> None:
    with ServerThread(create_app(InferenceEngine(home=isolated_home))) as thread:
        port = thread.port  # a port that was served and is free again once the server stops
    (isolated_home / "config.toml").write_text(f"[server]\nport = {port}\n")
    code, out, _ = car("health")
    assert code == 0 and out.startswith(f"local view (no server answered at http://127.0.0.1:{port}")
    assert "default generate" in out
    # A server named with --server must answer.
    code, _, err = car("health", "--server", f"http://127.0.0.1:{port}")
    assert code == 1 and "no server answered" in err
    code, _, err = car("health", "--server", "localhost:1", "--local")
    assert code == 2 and "exclude each other" in err


def test_speech_health_shows_each_direction(isolated_home: Path) -> None:
    """`car health` says what speech without -m runs and each side's first model; --json has it too."""
    code, out, err = car("health", "--local")
    assert code == 0, err
    assert "speech (local first):" in out
    assert (
        "speech to text: systran/faster-whisper-base ok (local systran/faster-whisper-base, remote -)" in out
    )
    assert "text to speech: piper/en_us-joe-medium ok (local piper/en_us-joe-medium, remote -)" in out
    (isolated_home / "config.toml").write_text(
        '[speech]\nallow_remote_fallback = false\npreferred_local_tts = "piper/no-such-voice"\n'
    )
    code, out, _ = car("health", "--local", "--json")
    speech = json.loads(out)["speech"]
    assert code == 0 and speech["tts_model"] is None and speech["stt_model"] == "systran/faster-whisper-base"
    assert any("no-such-voice" in p for p in speech["problems"])
    code, out, _ = car("health", "--local")
    assert "speech (local first, no hosted fallback):" in out and "text to speech: none" in out
    assert "no-such-voice" in out


def test_model_kinds_are_one_line_with_what_can_run(isolated_home: Path) -> None:
    """The kinds table's health (kinds.py): per kind with models, available/total."""
    code, out, err = car("health", "--local")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("model kinds (available/total): "))
    assert "gguf 1/" in line and "piper 1/1" in line and "openai 0/" in line  # no key: no hosted model
    kinds = {k["kind"]: k for k in json.loads(car("health", "--local", "--json")[1])["kinds"]}
    assert f"gguf {kinds['gguf']['available_models']}/{kinds['gguf']['models']}" in line


def test_a_state_database_away_shows_what_waits(capsys: pytest.CaptureFixture[str]) -> None:
    from car_inference.cli.health import _print_state

    _print_state({
        "backend": "postgresql", "location": "postgresql://db/car", "error": "OperationalError: down",
        "buffered": 3, "dropped": 1,
    })  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "unreachable" in out
        and "3 writes waiting in memory for it, 1 lost beyond [state] buffer_records" in out
    )


def test_records_the_store_has_not_caught_up_with_show(capsys: pytest.CaptureFixture[str]) -> None:
    from car_inference.cli.health import _print_state

    state = {"backend": "postgresql", "location": "postgresql://db/car", "schema_version": 3,
             "round_trip_ms": 0.4, "pending": 120, "lag_s": 0.05}  # fmt: skip
    _print_state(state)
    assert "not written yet" not in capsys.readouterr().out, "a writer's window is not a lag"
    _print_state({**state, "pending": 5400, "lag_s": 42.4})
    assert "5400 answers' records not written yet, the oldest 42 s ago" in capsys.readouterr().out


def test_the_text_report_shows_the_priors_in_use_and_spend(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the README says `car health` reports, in the text as in --json: priors and spend."""
    code, out, err = car("health", "--local")
    assert code == 0, err
    assert "benchmark priors: none" in out
    assert "spend: today $0.00 (no limit); this month $0.00 (no limit)" in out
    priors = tmp_path / "priors.json"
    priors.write_text(
        '[{"model_id": "huggingface/smollm2-135m-instruct:q4_1", "overall_score": 0.77,'
        ' "task_scores": {"code": 0.66}}]'
    )
    monkeypatch.setenv("CAR_BENCHMARK_PRIORS_PATH", str(priors))
    (isolated_home / "config.toml").write_text("[spend]\ndaily_usd = 1.5\n")
    code, out, err = car("health", "--local")
    assert code == 0, err
    assert f"huggingface/smollm2-135m-instruct:q4_1: 0.77 overall (code 0.66) from {priors}" in out
    assert "spend: today $0.00 of $1.50 ($1.50 left); this month $0.00 (no limit)" in out
