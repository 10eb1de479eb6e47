"""Per-runtime specs: how to find, check, provision and launch each OpenAI-compatible server we
supervise, and how to ask it what it serves.

- ``llamacpp``: llama-cpp-python's server (``python -m llama_cpp.server``, through
  ``runtimes/llamacpp_server.py``), one process per GGUF
  model whose source says ``managed = true``; runs on CPU, in this interpreter.
- ``vllm``: ``vllm serve``, one process per model, found through ``$CAR_VLLM_BIN``, ``PATH`` or
  the managed environment under ``$CAR_HOME/runtimes/vllm`` (which ``provision`` creates with
  ``uv``, or ``venv`` + pip when uv is absent); auto-discovered builds must meet ``VLLM_MIN``.
- ``ollama``: ``ollama serve``, one process for every Ollama model; its native API lists models.

A spec is data plus a few small functions; the supervisor runs the processes. Which spec serves a
model is the table ``RUNTIME_FOR_KIND`` keyed by source kind.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..backends import ggml_cpu
from ..config import CarConfig
from ..errors import ModelUnavailable, ProviderError
from ..schema import ModelSchema

__all__ = [
    "RUNTIME_FOR_KIND",
    "VLLM_MIN",
    "Launch",
    "LlamaCppServerSpec",
    "OllamaSpec",
    "RuntimeFailed",
    "RuntimeSpec",
    "VllmSpec",
    "free_port",
    "instance_name",
    "is_managed",
    "parse_version",
    "runtime_problem",
    "runtime_specs",
]


class RuntimeFailed(ProviderError):
    """A managed server could not be started or kept running; the message ends with its log."""

    def __init__(self, message: str, *, runtime: str, model: str | None, log: list[str] = ()) -> None:  # type: ignore[assignment]
        tail = " | ".join(line.strip() for line in log[-5:] if line.strip())
        super().__init__(
            message + (f"; last log lines: {tail}" if tail else ""),
            provider=runtime,
            model=model or "*",
            retryable=True,
        )


@dataclass(frozen=True)
class Launch:
    """One server to run: the command, where it answers and what it serves."""

    name: str  # instance name: state, lock and log files are named after it
    runtime: str
    argv: list[str]
    host: str
    port: int
    health_path: str
    served_model: str | None = None  # the model's name on the wire; None: a many-model server
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def instance_name(runtime: str, model_id: str | None) -> str:
    """``llamacpp-huggingface-smollm2-135m-instruct-q4_1``: safe as a file name, stable per model."""
    if model_id is None:
        return runtime
    return f"{runtime}-" + re.sub(r"[^a-z0-9_.]+", "-", model_id.lower()).strip("-")


_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The last ``X.Y[.Z]`` in ``text`` (``vllm --version`` may print warnings before it)."""
    found = _VERSION.findall(text)
    if not found:
        return None
    major, minor, patch = found[-1]
    return int(major), int(minor), int(patch or 0)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


class RuntimeSpec:
    """What the supervisor needs to know about one kind of server."""

    name: str = ""
    kind: str = ""  # the source kind it serves
    health_path: str = "/v1/models"
    install_hint: str = ""
    per_model: bool = True  # one server per model (else one for all of the kind's models)
    # The body field its OpenAI API takes a repeat penalty in (an extension of the API), or None.
    repeat_penalty_field: str | None = None

    def instance(self, model: ModelSchema) -> str:
        return instance_name(self.name, model.id if self.per_model else None)

    def wire_name(self, model: ModelSchema) -> str:
        """The model's name on the server's OpenAI API."""
        return str(getattr(model.source, "model_name", None) or model.id)

    def command(self) -> list[str] | None:
        """The argv prefix that starts the server, or None when it is not installed here."""
        raise NotImplementedError

    def version(self) -> str | None:
        return None

    def launch(self, model: ModelSchema, config: CarConfig) -> Launch:
        raise NotImplementedError

    def context_window(self, model: ModelSchema, config: CarConfig) -> int:
        """The window the server runs ``model`` with (usage's ``context_window``)."""
        return model.context_length

    def served(self, base_url: str, timeout_s: float = 2.0) -> list[str]:
        """Model names the running server serves (OpenAI ``GET /v1/models``)."""
        response = httpx.get(base_url + "/v1/models", timeout=timeout_s)
        response.raise_for_status()
        return [str(item["id"]) for item in response.json()["data"]]

    def installed(self) -> bool:
        """Whether a server can be started here, cheaply (it decides availability when a catalog
        loads; ``require`` makes the full check on first use)."""
        return self.command() is not None

    def problem(self) -> str | None:
        """Why no server can be started here (None when one can): the full check, which
        ``require`` raises and `car runtimes list` shows."""
        if self.command() is not None:
            return None
        return f"the {self.name} runtime is not installed: {self.install_hint}"

    def require(self, model_id: str) -> list[str]:
        found = self.command()
        if found is None:
            raise ModelUnavailable(model_id, self.problem() or f"the {self.name} runtime is not installed")
        return found

    def served_source(self, base_url: str, wire_name: str) -> dict[str, Any] | None:
        """A catalog source for a model the server at ``base_url`` serves that the catalog lacks
        (None: do not register it)."""
        return None

    def serves_as(self, model: ModelSchema, base_url: str) -> str | None:
        """``model``'s name on the server at ``base_url`` when it is one of that server's models."""
        return None


class LlamaCppServerSpec(RuntimeSpec):
    name = "llamacpp"
    kind = "gguf"
    repeat_penalty_field = "repeat_penalty"
    install_hint = "pip install 'car-inference[runtimes]' (llama-cpp-python[server])"
    # The server's own imports beyond llama_cpp (llama-cpp-python's `server` extra).
    _needs = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

    def command(self) -> list[str] | None:
        if not all(importlib.util.find_spec(m) is not None for m in self._needs):
            return None
        # llama_cpp.server behind a small launcher that applies [local] repack_weights.
        return [sys.executable, "-m", "car_inference.runtimes.llamacpp_server"]

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("llama-cpp-python")
        except PackageNotFoundError:
            return None

    def context_window(self, model: ModelSchema, config: CarConfig) -> int:
        """``local.n_ctx`` capped by the model's own window, as in-process."""
        return min(config.local.n_ctx, model.context_length or config.local.n_ctx)

    def launch(self, model: ModelSchema, config: CarConfig) -> Launch:
        from ..catalog.locate import local_path

        argv = self.require(model.id)
        host, port = "127.0.0.1", free_port()
        context = self.context_window(model, config)
        argv = [
            *argv,
            "--model", str(local_path(model)),
            "--model_alias", model.id,
            "--host", host,
            "--port", str(port),
            "--n_ctx", str(context),
            "--n_batch", str(config.local.n_batch),
            "--n_gpu_layers", str(config.local.n_gpu_layers),
            # Its default cuts the answer in progress (a bare [DONE]) whenever another request
            # arrives, a health probe's GET /v1/models included: requests must wait their turn.
            "--interrupt_requests", "False",
        ]  # fmt: skip
        threads = config.local.n_threads or ggml_cpu.default_threads()
        if threads:
            argv += ["--n_threads", str(threads)]
        name = instance_name(self.name, model.id)
        repack = config.local.repack_weights
        env = {} if repack is None else {ggml_cpu.ENV: "1" if repack else "0"}
        return Launch(name, self.name, argv, host, port, self.health_path, served_model=model.id, env=env)


VLLM_MIN = (0, 8, 0)  # the oldest release whose `vllm serve` flags this spec was written against
VLLM_PIP_SPEC = "vllm>=0.8.0"
_MIN = ".".join(map(str, VLLM_MIN))


class VllmSpec(RuntimeSpec):
    name = "vllm"
    kind = "vllm"
    repeat_penalty_field = "repetition_penalty"
    health_path = "/health"
    install_hint = "put `vllm` on PATH, set $CAR_VLLM_BIN, or run `car runtimes install vllm`"

    def __init__(self, home: Path | None = None) -> None:
        self.home = home

    def managed_root(self, home: Path) -> Path:
        return home / "runtimes" / "vllm"

    def candidates(self, home: Path | None) -> list[Path]:
        """Where an installed ``vllm`` may be, in order: PATH, then the managed environment."""
        # Every PATH entry, not just the first hit: an old vllm early on PATH must not hide a newer one.
        found = [Path(d) / "vllm" for d in os.environ.get("PATH", "").split(os.pathsep) if d]
        if home is not None:
            found.append(self.managed_root(home) / "bin" / "vllm")
        return [p for p in dict.fromkeys(found) if p.is_file() and os.access(p, os.X_OK)]

    def locate(self, home: Path | None) -> Path | None:
        """``$CAR_VLLM_BIN`` as given (the user's responsibility, no version gate), else the first
        candidate at least ``VLLM_MIN``."""
        override = os.environ.get("CAR_VLLM_BIN")
        if override and Path(override).is_file():
            return Path(override)
        for candidate in self.candidates(home):
            found = binary_version(candidate)
            if found is not None and found >= VLLM_MIN:
                return candidate
        return None

    def command(self) -> list[str] | None:
        found = self.locate(self.home)
        return [str(found), "serve"] if found else None

    def installed(self) -> bool:
        """A ``vllm`` is there, its version unasked (``vllm --version`` imports torch: seconds)."""
        override = os.environ.get("CAR_VLLM_BIN")
        return bool(override and Path(override).is_file()) or bool(self.candidates(self.home))

    def version(self) -> str | None:
        found = self.locate(self.home)
        parsed = binary_version(found) if found else None
        return ".".join(map(str, parsed)) if parsed else None

    def problem(self) -> str | None:
        """Not "not installed" when a vllm was found and skipped: which, and why."""
        if self.command() is not None:
            return None
        skipped = []
        for candidate in self.candidates(self.home):
            found = binary_version(candidate)
            if found is None:
                skipped.append(f"{candidate} does not tell its version (`vllm --version` failed)")
            elif found < VLLM_MIN:
                skipped.append(f"vllm {'.'.join(map(str, found))} at {candidate} is older than {_MIN}")
        if not skipped:
            return super().problem()
        return (
            f"{'; '.join(skipped)}: upgrade it (`pip install -U '{VLLM_PIP_SPEC}'`), set $CAR_VLLM_BIN "
            "to it to use it anyway, or run `car runtimes install vllm`"
        )

    def serve_args(self, model: ModelSchema) -> list[str]:
        """What follows ``vllm serve``: the weights, where to listen, the name to serve them as."""
        source: Any = model.source
        host, port = _host_port(source.endpoint, 8000)
        args = [source.hf_repo or source.model_name, "--host", host, "--port", str(port),
                "--served-model-name", source.model_name]  # fmt: skip
        if model.context_length:
            args += ["--max-model-len", str(model.context_length)]
        return args

    def launch(self, model: ModelSchema, config: CarConfig) -> Launch:
        source: Any = model.source
        argv = [*self.require(model.id), *self.serve_args(model)]
        host, port = _host_port(source.endpoint, 8000)
        env = {}
        if source.api_key_env and (key := os.environ.get(source.api_key_env)):
            env["VLLM_API_KEY"] = key  # the server then wants the key the backend sends
        name = instance_name(self.name, model.id)
        return Launch(
            name, self.name, argv, host, port, self.health_path, served_model=source.model_name, env=env
        )

    def provision_steps(
        self, home: Path, *, uv: str | None = None, python: str = "python3"
    ) -> list[list[str]]:
        """The commands that install vLLM into ``$CAR_HOME/runtimes/vllm``: ``uv`` when it is on
        PATH (fast, and the same venv layout), else ``venv`` + pip."""
        root = self.managed_root(home)
        uv = uv if uv is not None else shutil.which("uv")
        if uv:
            return [
                [uv, "venv", "--python", python, str(root)],
                [uv, "pip", "install", "--python", str(root / "bin" / "python"), VLLM_PIP_SPEC],
            ]
        return [
            [python, "-m", "venv", str(root)],
            [str(root / "bin" / "python"), "-m", "pip", "install", VLLM_PIP_SPEC],
        ]

    def provision(self, home: Path, steps: list[list[str]] | None = None, log: Path | None = None) -> Path:
        """Run the provisioning steps (output appended to ``log``); the installed ``vllm``.
        ``RuntimeFailed`` names the step that failed and ends with its output."""
        for argv in steps if steps is not None else self.provision_steps(home):
            run_step(argv, "vllm", log)
        found = self.managed_root(home) / "bin" / "vllm"
        if not found.is_file():
            raise RuntimeFailed(f"provisioned, but {found} is missing", runtime="vllm", model=None)
        return found


def run_step(argv: list[str], runtime: str, log: Path | None = None) -> None:
    """One provisioning command; its output goes to ``log`` and, on failure, into the error."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RuntimeFailed(f"cannot run {argv[0]}: {exc}", runtime=runtime, model=None) from None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"--- car: {' '.join(argv)}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise RuntimeFailed(
            f"`{' '.join(argv)}` exited with status {done.returncode}",
            runtime=runtime,
            model=None,
            log=(done.stdout + done.stderr).splitlines(),
        )


def binary_version(binary: Path) -> tuple[int, int, int] | None:
    """``vllm --version``, parsed; None when it does not run or prints no version. Asked once per
    file version: vLLM imports torch to answer, which takes seconds."""
    try:
        stat = binary.stat()
    except OSError:
        return None
    return _version_of(str(binary), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _version_of(binary: str, mtime_ns: int, size: int) -> tuple[int, int, int] | None:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return parse_version(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")


class OllamaSpec(RuntimeSpec):
    name = "ollama"
    kind = "ollama"
    health_path = "/api/version"
    install_hint = "install Ollama (https://ollama.com/download) so `ollama` is on PATH"
    per_model = False

    def wire_name(self, model: ModelSchema) -> str:
        return str(getattr(model.source, "model_tag", model.id))

    def command(self) -> list[str] | None:
        found = os.environ.get("CAR_OLLAMA_BIN") or shutil.which("ollama")
        return [found, "serve"] if found and Path(found).is_file() else None

    def launch(self, model: ModelSchema, config: CarConfig) -> Launch:
        source: Any = model.source
        argv = self.require(model.id)
        host, port = _host_port(source.host, 11434)
        # One server for every Ollama model: the instance is the runtime, not the model.
        return Launch(
            self.name, self.name, argv, host, port, self.health_path, env={"OLLAMA_HOST": f"{host}:{port}"}
        )

    def served(self, base_url: str, timeout_s: float = 2.0) -> list[str]:
        """Ollama's native list (``GET /api/tags``): every pulled model, by tag."""
        response = httpx.get(base_url + "/api/tags", timeout=timeout_s)
        response.raise_for_status()
        return [str(item["name"]) for item in response.json().get("models", [])]

    def served_source(self, base_url: str, wire_name: str) -> dict[str, Any] | None:
        return {"kind": "ollama", "host": base_url, "model_tag": wire_name, "managed": True}

    def serves_as(self, model: ModelSchema, base_url: str) -> str | None:
        source: Any = model.source
        if model.kind != self.kind or _host_port(source.host, 11434) != _host_port(base_url, 11434):
            return None
        return str(source.model_tag)


def runtime_specs(home: Path | None) -> dict[str, RuntimeSpec]:
    """Every runtime by name; ``home`` is where managed environments live."""
    return {s.name: s for s in (LlamaCppServerSpec(), VllmSpec(home), OllamaSpec())}


# Which runtime serves a managed model, by its source kind.
RUNTIME_FOR_KIND: dict[str, str] = {
    spec.kind: spec.name for spec in (LlamaCppServerSpec, VllmSpec, OllamaSpec)
}


def is_managed(model: ModelSchema) -> bool:
    """The model's source says we start its server."""
    return bool(getattr(model.source, "managed", False)) and model.kind in RUNTIME_FOR_KIND


def runtime_problem(specs: dict[str, RuntimeSpec], model: ModelSchema) -> str | None:
    """Why a managed model cannot run here: its runtime is not installed (it was listed as
    available and routed to, then failed with exactly this). None for other models."""
    if not is_managed(model):
        return None
    spec = specs[RUNTIME_FOR_KIND[model.kind]]
    return None if spec.installed() else f"the {spec.name} runtime is not installed: {spec.install_hint}"
