"""`car models pull|upgrade|pulled|ps` end to end: the Hub is tests/fakes/hf_hub.py on loopback,
Ollama is tests/runtimes/fake_ollama.py (Ollama's native API, NDJSON pull stream)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from car_inference.backends.cache import ModelCache
from car_inference.cli import app
from car_inference.cli.pulling import loaded_dir
from car_inference.runtimes.specs import free_port
from fakes.hf_hub import FakeHub, serving_hub
from fakes.http_answer import answering

runner = CliRunner()
README = Path(__file__).resolve().parents[2] / "README.md"
FAKE_OLLAMA = Path(__file__).parents[1] / "runtimes" / "fake_ollama.py"
WEIGHTS = os.urandom(400_000)

_MODELS = """
[[models]]
id = "tiny/tiny:q4_k_m"
name = "tiny"
provider = "tiny"
capabilities = ["generate"]
quality = 0.3
[models.source]
kind = "gguf"
hf_repo = "tiny/tiny-GGUF"
filename = "tiny-q4_k_m.gguf"
[models.cost]
size_mb = 1

[[models]]
id = "tiny/tiny:q8_0"
name = "tiny-q8"
provider = "tiny"
capabilities = ["generate"]
quality = 0.4
[models.source]
kind = "gguf"
hf_repo = "tiny/tiny-GGUF"
filename = "tiny-q8_0.gguf"
[models.cost]
size_mb = 1
"""


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def hub(isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    (isolated_home / "models.toml").write_text(_MODELS)
    with serving_hub(tmp_path / "hf-cache", monkeypatch) as fake:
        yield fake


def test_pull_shows_each_file_and_says_what_came(hub: FakeHub) -> None:
    commit = hub.publish("tiny/tiny-GGUF", {"tiny-q4_k_m.gguf": WEIGHTS})
    code, out, _ = car("models", "show", "tiny")
    assert "available: no" in out and "car models pull tiny/tiny:q4_k_m" in out
    code, out, err = car("models", "pull", "tiny")
    assert code == 0, err
    assert out.startswith(
        f"tiny/tiny:q4_k_m: pulled tiny/tiny-GGUF@{commit[:12]}, 1 file(s), 0.4 MB downloaded"
    )
    assert err.strip() == "tiny-q4_k_m.gguf: 0.4 MB, 0.4 MB downloaded, verified", "no bars off a terminal"
    code, out, _ = car("models", "show", "tiny")
    assert "available: yes" in out
    code, out, err = car("models", "pull", "tiny")  # it said "verified" of a file it did not read
    assert code == 0 and err.strip() == "tiny-q4_k_m.gguf: 0.4 MB, 0.0 MB downloaded, already there"
    code, out, _ = car("models", "pull", "tiny", "--json")
    data = json.loads(out)
    assert data["downloaded_bytes"] == 0 and data["commit"] == commit and data["available"] is True
    assert data["files"][0]["digest"].startswith("sha256:")
    code, out, _ = car("models", "pulled", "--json")
    assert json.loads(out) == [{"model": "tiny/tiny:q4_k_m", "source": f"tiny/tiny-GGUF@{commit[:12]}",
                                "size": len(WEIGHTS)}]  # fmt: skip


def test_rm_of_a_snapshot_model_keeps_another_entrys_pinned_commit(hub: FakeHub, isolated_home: Path) -> None:
    """The whole repo went: an entry pinned to another commit of it lost its files."""
    old = hub.publish("tiny/embed", {"config.json": b"{}", "model.safetensors": b"old" * 100})
    hub.publish("tiny/embed", {"model.safetensors": b"new" * 100})
    entry = (
        '\n[[models]]\nid = "tiny/{id}"\nname = "{id}"\nprovider = "tiny"\ncapabilities = ["embed"]\n'
        '[models.source]\nkind = "sentence"\nhf_repo = "tiny/embed"\nrevision = "{rev}"\n'
    )
    (isolated_home / "models.toml").write_text(
        _MODELS + entry.format(id="embed", rev="main") + entry.format(id="embed-pinned", rev=old)
    )
    assert car("models", "pull", "tiny/embed")[0] == 0 and car("models", "pull", "tiny/embed-pinned")[0] == 0
    code, _, err = car("models", "rm", "tiny/embed")
    assert code == 0, err
    assert "available: yes" in car("models", "show", "tiny/embed-pinned")[1]
    assert "available: no" in car("models", "show", "tiny/embed")[1]


def test_a_killed_pull_continues_in_the_next_one(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = os.urandom(2_000_000)
    hub.publish("tiny/tiny-GGUF", {"tiny-q4_k_m.gguf": big})
    hub.slow["tiny-q4_k_m.gguf"] = 0.05  # 64 kB every 50 ms: about 1.5 s for the file
    partial = (
        tmp_path
        / "hf-cache"
        / "models--tiny--tiny-GGUF"
        / "blobs"
        / f"{hashlib.sha256(big).hexdigest()}.incomplete"
    )
    proc = subprocess.Popen([sys.executable, "-m", "car_inference", "models", "pull", "tiny"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (partial.is_file() and partial.stat().st_size >= 300_000):
            assert time.monotonic() < deadline and proc.poll() is None, "the pull never got going"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.wait(10)
    left = partial.stat().st_size
    assert 300_000 <= left < len(big)
    hub.slow.clear()
    code, out, err = car("models", "pull", "tiny")
    assert code == 0, err
    assert f"continued from {left / 1e6:,.1f} MB left by an interrupted pull" in out
    assert hub.gets("/cdn/")[-1][2] == f"bytes={left}-"
    code, out, _ = car("models", "pull", "tiny", "--json")
    assert json.loads(out)["downloaded_bytes"] == 0
    assert Path(json.loads(out)["path"]).read_bytes() == big
    # Offline, a model on disk is there: a script making sure of it failed (exit 1) offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = car("models", "pull", "tiny")
    assert code == 0 and "nothing to download" in out, err


def test_pull_errors_are_one_line(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = car("models", "pull", "tiny")
    assert code == 1 and err.count("\n") == 1 and "no such repo on http://127.0.0.1" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = car("models", "pull", "tiny")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(
        "error: could not pull tiny/tiny:q4_k_m from tiny/tiny-GGUF: the Hub is switched off"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    code, _, err = car("models", "pull", "tiny")
    assert code == 1 and err.count("\n") == 1 and "cannot reach http://127.0.0.1:" in err
    assert "Traceback" not in err and "Retry" not in err


def test_upgrade_checks_then_pulls_a_new_revision_and_a_better_quant(hub: FakeHub) -> None:
    old = hub.publish("tiny/tiny-GGUF", {"tiny-q4_k_m.gguf": WEIGHTS, "tiny-q8_0.gguf": WEIGHTS * 2})
    assert car("models", "pull", "tiny")[0] == 0
    code, out, _ = car("models", "upgrade", "--check")
    assert code == 0 and out.splitlines() == [
        f"tiny/tiny:q4_k_m: up to date ({old[:12]})",
        "tiny/tiny:q4_k_m: a better quant exists: tiny/tiny:q8_0 (quality 0.3 → 0.4, 1 MB)",
        "1 upgrade(s) available: `car models upgrade` pulls them",
    ]
    new = hub.publish("tiny/tiny-GGUF", {"tiny-q4_k_m.gguf": WEIGHTS[::-1]})
    code, out, _ = car("models", "upgrade", "tiny", "--check", "--json")
    assert [(u["kind"], u["latest"], u["applied"]) for u in json.loads(out)] == [
        ("revision", new, False), ("quant", None, False),
    ]  # fmt: skip
    code, out, err = car("models", "upgrade")
    assert code == 0, err
    assert out.splitlines() == [
        f"tiny/tiny:q4_k_m: upgraded {old[:12]} → {new[:12]}: tiny-q4_k_m.gguf changed; 0.4 MB downloaded, "
        "0.4 MB of the old revision freed",
        "tiny/tiny:q4_k_m: pulled the better quant tiny/tiny:q8_0 (quality 0.3 → 0.4, 1 MB); the old one "
        "stays, `car models rm tiny/tiny:q4_k_m` deletes it",
    ]
    code, out, _ = car("models", "upgrade", "--check")
    assert out.splitlines() == [
        f"tiny/tiny:q4_k_m: up to date ({new[:12]})",
        f"tiny/tiny:q8_0: up to date ({new[:12]})",
    ]
    # It sent these to `car models pull`, which does nothing for them or refuses (and exited 1).
    code, _, err = car("models", "upgrade", "smollm2")
    assert code == 2 and "its files come with a package" in err and "upgrade the package with pip" in err
    code, _, err = car("models", "upgrade", "openai/gpt-4o-mini")
    assert code == 2 and "not pulled from the Hub (" in err and "nothing to upgrade" in err


# --- Ollama --------------------------------------------------------------------------------------


@pytest.fixture
def ollama_host(monkeypatch: pytest.MonkeyPatch) -> str:
    host = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("OLLAMA_HOST", host)
    return host


@pytest.fixture
def running_ollama(ollama_host: str) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, str(FAKE_OLLAMA), "serve"], env={"OLLAMA_HOST": ollama_host},
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None and "Listening" in proc.stderr.readline().decode()
    yield f"http://{ollama_host}"
    proc.terminate()
    proc.wait(5)


def test_ollama_pull_streams_progress_and_lists_the_model(running_ollama: str) -> None:
    code, out, err = car("models", "pull", "ollama/smollm2:135m")
    assert code == 0, err
    assert out.strip() == f"ollama/smollm2:135m: pulled by Ollama at {running_ollama}, 270.9 MB, Q4_K_M"
    assert err.splitlines() == [
        "  pulling manifest", "  pulling f535f83ec568 (270.9 MB)", "  pulling fbacade46b4d (0.0 MB)",
        "  verifying sha256 digest", "  writing manifest", "  success",
    ]  # fmt: skip
    code, out, _ = car("models", "pulled", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert rows["ollama/smollm2:135m"]["size"] == 270_898_372 and "ollama/qwen3:0.6b" in rows
    code, out, _ = car("models", "pull", "ollama/smollm2:135m", "--json")
    assert json.loads(out)["pulled"]["digest"].startswith("f535f83ec568")


def test_pulled_lists_the_hubs_models_when_ollama_cannot_list_its_own(ollama_host: str) -> None:
    """An Ollama that answers /api/version but fails /api/tags made `car models pulled` fail
    whole: the Hub's models, which need no Ollama, were not listed either."""

    def half_ollama(path: str) -> tuple[int, dict[str, str], bytes]:
        if path == "/api/version":
            return 200, {"content-type": "application/json"}, b'{"version": "0.9.0"}'
        return 500, {"content-type": "application/json"}, b'{"error": "internal"}'

    with answering(half_ollama, port=int(ollama_host.split(":")[1])):
        code, out, err = car("models", "pulled", "--json")
    assert code == 0 and "could not list its models: internal" in err, err
    assert isinstance(json.loads(out), list)


def test_rm_of_an_ollama_model_says_who_keeps_it(ollama_host: str) -> None:
    """`car models rm ollama/<tag>` said "model not found" (pull, upgrade and pulled take that
    name), and a catalog Ollama model "nothing of it is on this disk"."""
    code, _, err = car("models", "rm", "ollama/smollm2:135m")
    assert code == 2 and "ollama/smollm2:135m is kept by Ollama: `ollama rm smollm2:135m` deletes it" in err
    code, _, err = car("models", "pull", "openai/gpt-4o-mini")
    assert code == 2 and "served by its provider or server; nothing to download" in err


def test_ctrl_c_during_a_pull_says_how_to_go_on(hub: FakeHub, tmp_path: Path) -> None:
    """It exited 130 without a word; what came is kept and the next pull continues from it."""
    hub.publish("tiny/tiny-GGUF", {"tiny-q4_k_m.gguf": WEIGHTS})
    hub.slow["tiny-q4_k_m.gguf"] = 0.25  # 64 kB a quarter second: about 1.6 s in all
    child = subprocess.Popen(
        [sys.executable, "-m", "car_inference", "models", "pull", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    partial = tmp_path / "hf-cache" / "models--tiny--tiny-GGUF" / "blobs"
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".incomplete") and p.stat().st_size for p in partial.glob("*")):
        assert time.monotonic() < deadline and child.poll() is None, "the pull did not start"
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130 and b"Traceback" not in err
    assert b"stopped: `car models pull tiny` again continues where it stopped" in err, err
    hub.slow.clear()
    code, out, _ = car("models", "pull", "tiny", "--json")
    assert code == 0 and json.loads(out)["files"][0]["resumed_from"] > 0


def test_ollama_upgrade_pulls_again_and_says_whether_it_changed(running_ollama: str) -> None:
    assert car("models", "pull", "ollama/smollm2:135m")[0] == 0
    code, out, _ = car("models", "upgrade", "ollama/smollm2:135m", "--check")
    assert code == 0 and out.splitlines()[0] == (
        "ollama/smollm2:135m: Ollama cannot tell without pulling; "
        "`car models upgrade ollama/smollm2:135m` pulls its latest version"
    )
    code, out, _ = car("models", "upgrade", "ollama/smollm2:135m")
    assert code == 0 and out.strip() == "ollama/smollm2:135m: up to date (f535f83ec568)"
    new = "sha256:9999aaaabbbb" + "4" * 52
    httpx.post(f"{running_ollama}/fake/library", json={"tag": "smollm2:135m", "layers": [[new, 300_000_000]]})
    code, out, _ = car("models", "upgrade", "ollama/smollm2:135m", "--json")
    [done] = json.loads(out)
    assert (done["kind"], done["commit"][:12], done["latest"][:12], done["applied"]) == (
        "revision", "f535f83ec568", "9999aaaabbbb", True,
    )  # fmt: skip


def test_ollama_refusal_is_its_own_message(running_ollama: str) -> None:
    code, _, err = car("models", "pull", "ollama/nosuch:7b")
    assert code == 1 and err.splitlines() == [
        "  pulling manifest",
        f"error: Ollama at {running_ollama} could not pull nosuch:7b: "
        "pull model manifest: file does not exist",
    ]


def test_ollama_is_started_for_a_pull_and_stopped_after(
    ollama_host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = car("models", "pull", "ollama/qwen3:0.6b")
    assert code == 1 and err.startswith(
        f"error: Ollama is not running at http://{ollama_host}, and `ollama` is not installed"
    )
    binary = tmp_path / "ollama"
    binary.write_text(
        f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(FAKE_OLLAMA)!r}, run_name='__main__')\n"
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CAR_OLLAMA_BIN", str(binary))
    code, out, err = car("models", "pull", "ollama/qwen3:0.6b")
    assert code == 0, err
    assert out.strip() == f"ollama/qwen3:0.6b: pulled by Ollama at http://{ollama_host}, 522.7 MB, Q4_K_M"
    code, out, _ = car("models", "ps", "--json")
    assert json.loads(out) == [], "the ollama serve started for the pull is stopped"


# --- ps: in-process models ------------------------------------------------------------------------


def test_ps_lists_models_loaded_in_process_by_other_engines(isolated_home: Path) -> None:
    cache = ModelCache(budget_mb=100, record_dir=loaded_dir(isolated_home))

    def load() -> mmap.mmap:
        # 64 MB of fresh pages, each written: a new mapping, so RSS grows even in a big process that
        # has freed memory to reuse (a bytearray could be served from it and move RSS by 5 MB)
        weights = mmap.mmap(-1, 64 * 2**20)
        for at in range(0, len(weights), 4096):
            weights[at] = 1
        return weights

    entry = cache.get_or_load("gguf:test/tiny", 7, load)
    code, out, _ = car("models", "ps", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert row["model"] == "test/tiny" and row["runtime"] == "in-process" and row["kind"] == "gguf"
    assert row["pid"] == os.getpid() and row["state"] == "idle" and row["estimated_mb"] == 7
    assert row["measured_mb"] is None or row["measured_mb"] >= 60, "the 64 MB it allocated, when RSS saw it"
    with entry.lock:  # a use reaches the record within RECORD_EVERY_S
        deadline = time.monotonic() + 5
        while (row := json.loads(car("models", "ps", "--json")[1])[0])["state"] != "busy":
            assert time.monotonic() < deadline, row
            time.sleep(0.02)
        assert row["idle_s"] == 0
    _, out, _ = car("models", "ps")
    assert "test/tiny" in out and "in-process (gguf)" in out and "0 running, 1 loaded in-process" in out
    cache.clear()
    assert json.loads(car("models", "ps", "--json")[1]) == []


# --- the README's "Pulling models" transcript -----------------------------------------------------


def _transcript() -> list[tuple[list[str], dict[str, str], list[str]]]:
    """The ``console`` block of the README's "Pulling models": (args, environment, lines shown)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Pulling models\n") :]
    section = section[: section.index("\n## ", 5)]
    block = section[section.index("```console\n") + len("```console\n") :]
    commands: list[tuple[list[str], dict[str, str], list[str]]] = []
    for line in block[: block.index("```")].splitlines():
        if line.startswith("$ "):
            words = shlex.split(line[2:])
            env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
            words = words[len(env) :]
            assert words[0] == "car", line
            commands.append((words[1:], env, []))
        else:
            commands[-1][2].append(line)
    return commands


def _shown(expected: str) -> re.Pattern[str]:
    """A transcript line as a pattern: ``...`` stands for what differs between runs."""
    return re.compile(".*".join(re.escape(piece) for piece in expected.split("...")))


def test_the_readme_transcript_runs(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, running_ollama: str
) -> None:
    hub.publish("Qwen/Qwen3-0.6B-GGUF", {"Qwen3-0.6B-Q8_0.gguf": os.urandom(600_000)})
    hub.publish("Qwen/Qwen3-1.7B-GGUF", {"Qwen3-1.7B-Q8_0.gguf": os.urandom(1_800_000)})
    hub.cut("Qwen3-1.7B-Q8_0.gguf", after=200_000, times=5)  # the first pull of it breaks off
    before = {  # what changes on the Hub between the transcript's commands
        "models upgrade --check": lambda: hub.publish(
            "Qwen/Qwen3-0.6B-GGUF", {"Qwen3-0.6B-Q8_0.gguf": os.urandom(700_000)}
        ),
    }
    commands = _transcript()
    assert len(commands) >= 8
    for args, env, lines in commands:
        if (setup := before.get(" ".join(args))) is not None:
            setup()
        with monkeypatch.context() as scoped:
            for name, value in env.items():
                scoped.setenv(name, value)
            result = runner.invoke(app, args)
        shown = (result.stderr + result.stdout).splitlines()
        assert result.exit_code == (1 if lines[-1].startswith("error:") else 0), (args, shown)
        assert len(shown) == len(lines), (args, shown)
        for expected, line in zip(lines, shown, strict=True):
            assert _shown(expected).fullmatch(line), f"car {' '.join(args)}: {line!r} is not {expected!r}"


def test_ps_shows_what_another_engine_loaded_with_its_measured_memory(isolated_home: Path) -> None:
    script = (
        "import asyncio, sys; from car_inference.engine import InferenceEngine;"
        "eng = InferenceEngine(); assert asyncio.run(eng.warm_up(['smollm2'])) == [None];"
        "print('loaded', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "loaded"
        code, out, _ = car("models", "ps", "--json")
        assert code == 0
        [row] = json.loads(out)
        assert row["model"] == "huggingface/smollm2-135m-instruct:q4_1" and row["pid"] == proc.pid
        assert row["runtime"] == "in-process" and row["state"] == "idle" and row["idle_s"] < 60
        assert row["measured_mb"] is not None and row["measured_mb"] > 50, (
            "what the load added to that process"
        )
    finally:
        proc.kill()
        proc.wait(10)
    assert json.loads(car("models", "ps", "--json")[1]) == [], "a dead process's record is dropped"
