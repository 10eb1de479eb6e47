"""The Ollama runtime: one `ollama serve` for every Ollama model, its native model list registered;
and Ollama's native API (runtimes/ollama.py): pull with a streamed NDJSON progress, list the tags.
`ollama` here is tests/runtimes/fake_ollama.py (Ollama's API shapes), since Ollama is not installed."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.config import CarConfig
from car_inference.errors import DownloadFailed, ModelNotFound
from car_inference.registry import UnifiedRegistry
from car_inference.runtimes.managed import RuntimeSupervisor
from car_inference.runtimes.ollama import (
    OllamaProgress,
    ollama_answers,
    ollama_host,
    ollama_pull,
    ollama_tags,
)
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


# --- the native API: pull with progress, list ----------------------------------------------------


@pytest.fixture
def served(isolated_home: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE), "serve"], env={"OLLAMA_HOST": f"127.0.0.1:{port}"},
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None and "Listening" in proc.stderr.readline().decode()
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(5)


def test_pull_streams_each_layer_and_the_tag_is_listed(served: str) -> None:
    assert ollama_answers(served) and "smollm2:135m" not in [m.name for m in ollama_tags(served)]
    events: list[OllamaProgress] = []
    statuses = ollama_pull(served, "smollm2:135m", events.append)
    assert [s.status for s in statuses] == [
        "pulling manifest",
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    layer = [e for e in events if e.digest == "sha256:f535f83ec568" + "1" * 52]
    assert [e.completed for e in layer] == [67_724_576, 135_449_152, 203_173_728, 270_898_304]
    assert {e.total for e in layer} == {270_898_304} and layer[0].status == "pulling f535f83ec568"
    [pulled] = [m for m in ollama_tags(served) if m.name == "smollm2:135m"]
    assert pulled.size == 270_898_372 and pulled.quantization_level == "Q4_K_M" and pulled.family == "smollm2"


def test_pull_failures_are_one_line(served: str) -> None:
    with pytest.raises(
        DownloadFailed, match=r"could not pull nosuch:1b: pull model manifest: file does not exist$"
    ):
        ollama_pull(served, "nosuch:1b")
    with pytest.raises(
        DownloadFailed, match=r"stopped pulling broken:1b after 'pulling manifest'; pull again"
    ):
        ollama_pull(served, "broken:1b")
    gone = f"http://127.0.0.1:{free_port()}"
    assert not ollama_answers(gone)
    with pytest.raises(DownloadFailed, match=rf"^cannot reach Ollama at {gone} to pull x:1b \("):
        ollama_pull(gone, "x:1b")
    with pytest.raises(DownloadFailed, match=rf"^cannot reach Ollama at {gone} \("):
        ollama_tags(gone)


def test_ollama_host_follows_ollamas_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert ollama_host() == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:9999")
    assert ollama_host() == "http://0.0.0.0:9999"
    assert ollama_host("http://gpu-box:11434/v1/") == "http://gpu-box:11434", "a model's own host wins"


def _named(port: int) -> ModelSchema:
    """The README's kind of entry: an Ollama tag under an id of the catalog's own."""
    return _model(port).model_copy(update={"id": "local/qwen-ollama", "name": "qwen-ollama"})


def test_tags_are_registered_when_ollama_runs_elsewhere_and_a_catalog_tag_is_not_doubled(
    isolated_home: Path, ollama_bin: Path
) -> None:
    """Only a process that launched `ollama serve` itself registered its tags: with an Ollama
    service (external) or another process's (attached), ollama/llama3.2:1b did not exist, and
    `car generate -m ollama/llama3.2:1b` never found it. The owner added ollama/qwen3:0.6b next
    to local/qwen-ollama, the same tag twice."""
    port = free_port()
    service = subprocess.Popen(
        [sys.executable, str(FAKE), "serve"], env={"OLLAMA_HOST": f"127.0.0.1:{port}"}, stderr=subprocess.PIPE
    )
    sups: list[RuntimeSupervisor] = []

    def supervisor() -> RuntimeSupervisor:
        sups.append(RuntimeSupervisor(CarConfig(home=isolated_home), UnifiedRegistry([_named(port)]), FAST))
        return sups[-1]

    try:
        assert service.stderr is not None and "Listening" in service.stderr.readline().decode()
        external = supervisor()
        assert external.find("ollama").ensure() and external.find("ollama").state is RuntimeState.EXTERNAL
        external.apply_served()
        assert external.registry.resolve("ollama/llama3.2:1b").source.host == f"http://127.0.0.1:{port}"
        assert external.registry.find("ollama/qwen3:0.6b") is None, "local/qwen-ollama has that tag"
        asked = supervisor()  # a fresh process (the CLI): the name alone finds the running Ollama's tag
        assert asked.registry.resolve("ollama/llama3.2:1b").source.model_tag == "llama3.2:1b"
        assert asked.find("ollama").state is RuntimeState.STOPPED, "nothing was started for it"
        with pytest.raises(ModelNotFound):
            asked.registry.resolve("ollama/nosuch:1b")
        service.terminate()
        service.wait(5)
        owner = supervisor()
        assert owner.find("ollama").ensure() and owner.find("ollama").state is RuntimeState.RUNNING
        owner.apply_served()
        assert owner.registry.find("ollama/llama3.2:1b") is not None
        assert owner.registry.find("ollama/qwen3:0.6b") is None, "the owner doubled it too"
        attached = supervisor()
        assert attached.find("ollama").ensure() and attached.find("ollama").state is RuntimeState.ATTACHED
        attached.apply_served()
        assert attached.registry.find("ollama/llama3.2:1b") is not None
        assert attached.registry.find("ollama/qwen3:0.6b") is None
    finally:
        for sup in reversed(sups):
            sup.close()
        if service.poll() is None:
            service.kill()
