"""vLLM under the supervisor, end to end, on a machine with an NVIDIA GPU.

Finds `vllm` (``$CAR_VLLM_BIN``, PATH, or ``$CAR_HOME/runtimes/vllm``; ``--provision`` installs it
there first), registers a managed vLLM model, and then through the engine: the first request
starts `vllm serve` and waits for ``/health``, one generate and one stream go through the router and
the OpenAI-compatible backend, a ``kill -9`` of the server is restarted by the supervisor, and
closing the engine stops it. Prints a table of the times and the answers; exits 1 on a failure and
2 when there is no GPU or no vLLM (nothing was measured).

    .venv/bin/python benchmarks/vllm_gpu.py [--model Qwen/Qwen2.5-0.5B-Instruct] [--provision]
    .venv/bin/python benchmarks/vllm_gpu.py --dry-run      # the command line only, no GPU needed

The model's weights come from Hugging Face (vLLM downloads them into the HF cache) unless they are
there already; on an offline machine pre-fill the cache or pass a local folder as ``--model``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from car_inference.engine import InferenceEngine
from car_inference.requests import GenerateParams, GenerateRequest
from car_inference.runtimes.specs import VllmSpec, free_port
from car_inference.runtimes.state import pid_alive
from car_inference.runtimes.supervisor import RuntimeSettings, RuntimeState
from car_inference.schema import ModelSchema
from car_inference.stream import Done

PROMPT = "What is the capital of France? Answer in one word."


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return (
        [line for line in done.stdout.splitlines() if line.startswith("GPU")] if done.returncode == 0 else []
    )


def _model(repo: str, port: int, context: int) -> ModelSchema:
    return ModelSchema.model_validate({
        "id": "bench/vllm-model", "name": "vllm-model", "provider": "bench", "capabilities": ["generate"],
        "context_length": context,
        "source": {"kind": "vllm", "endpoint": f"http://127.0.0.1:{port}", "model_name": repo,
                   "hf_repo": repo, "managed": True},
    })  # fmt: skip


def _request() -> GenerateRequest:
    return GenerateRequest(
        model="bench/vllm-model", prompt=PROMPT, params=GenerateParams(max_tokens=16, temperature=0)
    )


async def _run(engine: InferenceEngine, rows: list[tuple[str, str]]) -> None:
    runtime = engine.runtimes.find("bench/vllm-model")
    start = time.perf_counter()
    result = await engine.generate(_request())
    rows.append(
        ("first generate (starts vllm serve, waits for /health)", f"{time.perf_counter() - start:.1f} s")
    )
    rows.append(("answer", repr(result.text)))
    rows.append(("served", ", ".join(runtime.served)))
    start = time.perf_counter()
    warm = await engine.generate(_request())
    rows.append(("warm generate", f"{(time.perf_counter() - start) * 1000:.0f} ms"))
    events = [e async for e in engine.stream(_request())]
    done = events[-1]
    assert isinstance(done, Done), f"stream ended with {done!r}"
    rows.append(("stream", f"{len(events)} events, same text: {done.text == warm.text}"))

    pid = runtime.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    start = time.perf_counter()
    while not (runtime.restarts and runtime.state is RuntimeState.RUNNING):
        if runtime.state is RuntimeState.FAILED:
            raise SystemExit(f"restart failed: {runtime.error}")
        await asyncio.sleep(0.5)
    rows.append(("restart after kill -9", f"{time.perf_counter() - start:.1f} s"))
    again = await engine.generate(_request())
    rows.append(("after restart, same answer", str(again.text == warm.text)))

    engine.runtimes.close()
    rows.append(("stopped with the engine", str(runtime.pid is None and not pid_alive(pid))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--context", type=int, default=2048, help="--max-model-len")
    parser.add_argument("--provision", action="store_true", help="install vLLM when none is found")
    parser.add_argument("--dry-run", action="store_true", help="print the command line and stop")
    args = parser.parse_args()

    home = Path(os.environ.get("CAR_HOME") or tempfile.mkdtemp(prefix="car-vllm-"))
    spec = VllmSpec(home)
    model = _model(args.model, free_port(), args.context)
    if args.dry_run:
        found = spec.locate(home)
        argv = [str(found) if found else "vllm", "serve"]
        print(shlex.join([*argv, *spec.serve_args(model)]))
        return 0
    gpus = _gpus()
    if not gpus:
        print("no NVIDIA GPU here (nvidia-smi -L lists none): nothing measured")
        return 2
    if spec.locate(home) is None:
        if not args.provision:
            print(f"vllm not found: {spec.install_hint} (or pass --provision)")
            return 2
        start = time.perf_counter()
        spec.provision(home, log=home / "logs" / "vllm-install.log")
        print(f"provisioned vLLM into {spec.managed_root(home)} in {time.perf_counter() - start:.0f} s")

    engine = InferenceEngine(home=home)
    engine.runtimes.settings = RuntimeSettings(idle_timeout_s=None, backoff_s=1.0)
    engine.register_model(model)
    rows: list[tuple[str, str]] = [("GPU", gpus[0]), ("vllm", spec.version() or "?"), ("model", args.model)]
    try:
        asyncio.run(_run(engine, rows))
    finally:
        engine.close()
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        print(f"log: {home / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
