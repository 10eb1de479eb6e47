"""Runtime specs: command lines, locating and version-gating vLLM (with real executables that
print what `vllm --version` prints), provisioning steps, and running them."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from car_inference.config import CarConfig
from car_inference.engine import InferenceEngine
from car_inference.errors import ModelUnavailable
from car_inference.requests import GenerateRequest
from car_inference.runtimes.specs import (
    RUNTIME_FOR_KIND,
    VLLM_MIN,
    LlamaCppServerSpec,
    OllamaSpec,
    RuntimeFailed,
    VllmSpec,
    instance_name,
    is_managed,
    parse_version,
    run_step,
    runtime_problem,
    runtime_specs,
)
from car_inference.schema import ModelSchema

from .helpers import MANAGED_ID, managed_smollm2, small_config


def _vllm_model(**source: object) -> ModelSchema:
    return ModelSchema.model_validate({
        "id": "local/qwen3-0.6b-vllm", "name": "qwen3-0.6b", "provider": "local",
        "capabilities": ["generate"], "context_length": 4096,
        "source": {"kind": "vllm", "model_name": "Qwen/Qwen3-0.6B", "managed": True, **source},
    })  # fmt: skip


def _fake_binary(folder: Path, name: str, version_output: str, status: int = 0) -> Path:
    """An executable that answers ``--version`` the way the real one does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport sys\nprint({version_output!r})\nsys.exit({status})\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.11.0", (0, 11, 0)),
        ("0.6.3.post1", (0, 6, 3)),
        ("INFO 05-01 12:00:00 [__init__.py:239] Automatically detected platform cuda.\n0.8.5", (0, 8, 5)),
        ("1.2", (1, 2, 0)),
        ("no version here", None),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_version(text) == expected


def test_vllm_is_found_on_path_only_when_new_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _fake_binary(old, "vllm", "0.7.3")
    _fake_binary(new, "vllm", "0.10.1.1")
    spec = VllmSpec(tmp_path / "home")
    monkeypatch.setenv("PATH", str(old))
    assert spec.locate(spec.home) is None, f"older than {VLLM_MIN} is skipped"
    monkeypatch.setenv("PATH", f"{old}:{new}")
    assert spec.locate(spec.home) == new / "vllm" and spec.version() == "0.10.1"
    broken = tmp_path / "broken"
    _fake_binary(broken, "vllm", "Traceback ...", status=1)
    monkeypatch.setenv("PATH", str(broken))
    assert spec.locate(spec.home) is None, "one that cannot tell its version is not trusted"


def test_vllm_override_is_used_as_given_and_managed_env_is_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    spec = VllmSpec(home)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert spec.command() is None
    managed = _fake_binary(spec.managed_root(home) / "bin", "vllm", "0.9.2")
    assert spec.command() == [str(managed), "serve"]
    custom = _fake_binary(tmp_path / "custom", "my-vllm", "0.2.0")
    monkeypatch.setenv("CAR_VLLM_BIN", str(custom))
    assert spec.command() == [str(custom), "serve"], "the override is the user's choice, no version gate"


def test_vllm_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _fake_binary(tmp_path / "bin", "vllm", "0.11.0")
    monkeypatch.setenv("PATH", str(binary.parent))
    monkeypatch.setenv("MY_VLLM_KEY", "sk-local")
    spec = VllmSpec(tmp_path)
    model = _vllm_model(
        endpoint="http://127.0.0.1:8123", hf_repo="Qwen/Qwen3-0.6B-FP8", api_key_env="MY_VLLM_KEY"
    )
    launch = spec.launch(model, CarConfig(home=tmp_path))
    assert launch.argv == [
        str(binary), "serve", "Qwen/Qwen3-0.6B-FP8", "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "Qwen/Qwen3-0.6B", "--max-model-len", "4096",
    ]  # fmt: skip
    assert launch.base_url == "http://127.0.0.1:8123" and launch.health_path == "/health"
    assert launch.env == {"VLLM_API_KEY": "sk-local"}
    assert launch.name == "vllm-local-qwen3-0.6b-vllm" and launch.served_model == "Qwen/Qwen3-0.6B"
    default = spec.launch(_vllm_model(), CarConfig(home=tmp_path))
    assert default.port == 8000 and default.argv[2] == "Qwen/Qwen3-0.6B" and default.env == {}


def test_vllm_provision_steps_with_uv_and_with_pip(tmp_path: Path) -> None:
    spec = VllmSpec(tmp_path)
    root = tmp_path / "runtimes" / "vllm"
    assert spec.provision_steps(tmp_path, uv="/usr/bin/uv") == [
        ["/usr/bin/uv", "venv", "--python", "python3", str(root)],
        ["/usr/bin/uv", "pip", "install", "--python", str(root / "bin" / "python"), "vllm>=0.8.0"],
    ]
    assert spec.provision_steps(tmp_path, uv="", python="/opt/py/bin/python3.12") == [
        ["/opt/py/bin/python3.12", "-m", "venv", str(root)],
        [str(root / "bin" / "python"), "-m", "pip", "install", "vllm>=0.8.0"],
    ]


def test_provision_runs_the_steps_logs_them_and_names_the_one_that_failed(tmp_path: Path) -> None:
    spec = VllmSpec(tmp_path)
    log = tmp_path / "logs" / "vllm-install.log"
    root = spec.managed_root(tmp_path)
    make_bin = [sys.executable, "-c", f"import os; os.makedirs({str(root / 'bin')!r}); "
                f"open({str(root / 'bin' / 'vllm')!r}, 'w').write('')"]  # fmt: skip
    assert spec.provision(tmp_path, [make_bin], log) == root / "bin" / "vllm"
    assert log.read_text().startswith("--- car: ")
    failing = [
        sys.executable,
        "-c",
        "import sys; print('No matching distribution found for vllm'); sys.exit(1)",
    ]
    with pytest.raises(RuntimeFailed) as info:
        spec.provision(tmp_path, [failing], log)
    assert "exited with status 1" in str(info.value) and "No matching distribution" in str(info.value)
    with pytest.raises(RuntimeFailed, match="cannot run"):
        run_step([str(tmp_path / "no-such-tool")], "vllm")


def test_llamacpp_command_line(isolated_home: Path) -> None:
    config = small_config(isolated_home)
    launch = LlamaCppServerSpec().launch(managed_smollm2(), config)
    argv = launch.argv
    assert argv[:3] == [sys.executable, "-m", "car_inference.runtimes.llamacpp_server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(flags["--model"]).is_file()
    assert flags["--model_alias"] == MANAGED_ID and flags["--n_ctx"] == "512" and flags["--n_threads"] == "1"
    assert flags["--host"] == "127.0.0.1" and int(flags["--port"]) == launch.port > 0
    assert launch.health_path == "/v1/models" and launch.name == instance_name("llamacpp", MANAGED_ID)
    assert launch.env == {}, "weight layouts: the server decides (backends/ggml_cpu.py)"
    config.local.repack_weights = False
    assert LlamaCppServerSpec().launch(managed_smollm2(), config).env == {"CAR_LLAMA_REPACK": "0"}


def test_ollama_is_one_server_for_every_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def ollama_model(tag: str) -> ModelSchema:
        return ModelSchema.model_validate({
            "id": f"ollama/{tag}", "name": tag, "provider": "ollama", "capabilities": ["generate"],
            "source": {"kind": "ollama", "model_tag": tag, "host": "http://127.0.0.1:11500", "managed": True},
        })  # fmt: skip

    spec = OllamaSpec()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="install Ollama"):
        spec.launch(ollama_model("qwen3:0.6b"), CarConfig(home=tmp_path))
    binary = _fake_binary(tmp_path, "ollama", "ollama version is 0.12.0")
    launch = spec.launch(ollama_model("qwen3:0.6b"), CarConfig(home=tmp_path))
    assert launch.argv == [str(binary), "serve"] and launch.env == {"OLLAMA_HOST": "127.0.0.1:11500"}
    assert launch.name == "ollama" and spec.instance(ollama_model("llama3.2:1b")) == "ollama"
    assert spec.wire_name(ollama_model("llama3.2:1b")) == "llama3.2:1b"


def test_the_table_of_runtimes() -> None:
    assert RUNTIME_FOR_KIND == {"gguf": "llamacpp", "vllm": "vllm", "ollama": "ollama"}
    assert set(runtime_specs(None)) == {"llamacpp", "vllm", "ollama"}
    assert is_managed(managed_smollm2()) and is_managed(_vllm_model())
    assert not is_managed(_vllm_model(managed=False))


def test_vllm_is_asked_its_version_once_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls"
    binary = tmp_path / "bin" / "vllm"
    binary.parent.mkdir()

    def write(version: str) -> None:
        binary.write_text(f"#!{sys.executable}\nopen({str(calls)!r}, 'a').write('x')\nprint({version!r})\n")
        binary.chmod(0o755)

    write("0.9.0")
    monkeypatch.setenv("PATH", str(binary.parent))
    spec = VllmSpec(tmp_path)
    assert spec.command() == [str(binary), "serve"] and spec.version() == "0.9.0" and spec.locate(tmp_path)
    assert calls.read_text() == "x", "vLLM imports torch to answer: one call is enough"
    write("0.12.1 ")  # a new install (another size) is asked again
    assert spec.version() == "0.12.1" and calls.read_text() == "xx"


async def test_a_managed_model_whose_runtime_is_not_installed_is_not_available(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's managed vLLM model, with no vLLM here, was listed "available: yes" and kept
    as a routing candidate and fallback, then failed with "the vllm runtime is not installed"."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CAR_VLLM_BIN", raising=False)
    specs = runtime_specs(isolated_home)
    hint = specs["vllm"].install_hint
    assert runtime_problem(specs, _vllm_model()) == f"the vllm runtime is not installed: {hint}"
    assert runtime_problem(specs, _vllm_model(managed=False)) is None, "a server the user runs"
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "local/qwen3-0.6b-vllm"\nname = "qwen3-0.6b-vllm"\nprovider = "local"\n'
        'capabilities = ["generate"]\ncontext_length = 4096\nquality = 0.99\n'
        '[models.source]\nkind = "vllm"\nmodel_name = "Qwen/Qwen3-0.6B"\nmanaged = true\n'
    )
    engine = InferenceEngine()
    schema = engine.registry.find("local/qwen3-0.6b-vllm")
    assert schema is not None and not schema.available
    assert "vllm runtime is not installed" in engine.registry.unavailable_reason(schema)
    decision = engine.route(GenerateRequest(prompt="Write a haiku about the sea."))
    assert "local/qwen3-0.6b-vllm" not in [decision.model_id, *decision.fallbacks]
    with pytest.raises(ModelUnavailable, match="the vllm runtime is not installed"):
        await engine.generate(GenerateRequest(prompt="hi", model="local/qwen3-0.6b-vllm"))
    # Once a vllm is there (found, its version not yet asked), the model is available again.
    _fake_binary(tmp_path / "empty", "vllm", "0.11.0")
    engine.registry.refresh_availability()
    assert engine.registry.find("local/qwen3-0.6b-vllm").available  # type: ignore[union-attr]
    engine.close()
