"""The Ollama runtime: one `ollama serve` for every Ollama model, its native model list registered.
`ollama` here is tests/runtimes/fake_ollama.py (Ollama's API shapes), since Ollama is not installed."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.config import CarConfig
from car_inference.registry import UnifiedRegistry
from car_inference.runtimes.managed import RuntimeSupervisor
from car_inference.runtimes.specs import free_port
from car_inference.runtimes.state import pid_alive
from car_inference.runtimes.supervisor import RuntimeState
from car_inference.schema import ModelSchema

from .helpers import FAST, wait_for

FAKE = Path(__file__).with_name("fake_ollama.py")


@pytest.fixture
def ollama_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "bin" / "ollama"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CAR_OLLAMA_BIN", str(path))
    return path


def _model(port: int, tag: str = "qwen3:0.6b") -> ModelSchema:
    return ModelSchema.model_validate({
        "id": f"ollama/{tag}", "name": tag, "provider": "ollama", "capabilities": ["generate"],
        "source": {"kind": "ollama", "model_tag": tag, "host": f"http://127.0.0.1:{port}", "managed": True},
    })  # fmt: skip


@pytest.fixture
def setup(isolated_home: Path, ollama_bin: Path) -> Iterator[tuple[RuntimeSupervisor, int]]:
    port = free_port()
    registry = UnifiedRegistry([_model(port)])
    sup = RuntimeSupervisor(CarConfig(home=isolated_home), registry, settings=FAST.model_copy())
    yield sup, port
    sup.close()


def test_starts_ollama_serve_and_registers_what_it_lists(setup: tuple[RuntimeSupervisor, int]) -> None:
    sup, port = setup
    runtime = sup.find("ollama")
    assert runtime is sup.runtime_for(_model(port, "anything:latest")), "one server for every model"
    assert runtime.ensure() == f"http://127.0.0.1:{port}"
    assert runtime.state is RuntimeState.RUNNING and runtime.served == ["qwen3:0.6b", "llama3.2:1b"]
    assert sup.registry.find("ollama/llama3.2:1b") is None, "registered where the registry is used"
    sup.apply_served()
    added = sup.registry.resolve("ollama/llama3.2:1b")
    assert added.kind == "ollama" and added.source.managed and added.source.model_tag == "llama3.2:1b"
    assert added.source.host == f"http://127.0.0.1:{port}" and "runtime" in added.tags
    assert len([m for m in sup.registry.list() if m.id == "ollama/qwen3:0.6b"]) == 1, "known ones kept"
    assert "Listening on 127.0.0.1" in runtime.files.log_path.read_text(), "OLLAMA_HOST reached it"


def test_a_running_ollama_is_used_and_never_stopped(setup: tuple[RuntimeSupervisor, int]) -> None:
    sup, port = setup
    service = subprocess.Popen(
        [sys.executable, str(FAKE), "serve"], env={"OLLAMA_HOST": f"127.0.0.1:{port}"}, stderr=subprocess.PIPE
    )
    try:
        assert service.stderr is not None and "Listening" in service.stderr.readline().decode()
        runtime = sup.find("ollama")
        assert runtime.ensure() == f"http://127.0.0.1:{port}"
        assert runtime.state is RuntimeState.EXTERNAL and runtime.pid is None
        assert not runtime.files.log_path.exists(), "nothing was started"
        sup.close()
        assert service.poll() is None and pid_alive(service.pid), "not ours to stop"
        assert runtime.state is RuntimeState.STOPPED
        service.terminate()
        service.wait(5)
        wait_for(lambda: runtime.ensure() is not None and runtime.state is RuntimeState.RUNNING,
                 what="our own server once the service is gone")  # fmt: skip
    finally:
        if service.poll() is None:
            service.kill()
