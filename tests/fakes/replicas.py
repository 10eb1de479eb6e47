"""Several real ``car serve`` replicas (subprocesses, real uvicorn, ports of their own) sharing one
configuration, and a round-robin client in front of them, as a load balancer would be.

Each replica has a ``$CAR_HOME`` of its own holding the same ``config.toml`` and ``models.toml``;
what they share is whatever that configuration points at (a PostgreSQL state store, a Redis). A
replica's log goes to ``serve.log`` in its home (a pipe nobody reads could fill and stall it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .redis_service import closed_port

__all__ = ["Replica", "ReplicaFleet", "RoundRobin", "wait_for"]

_SERVE = (sys.executable, "-m", "car_inference", "serve")
_START_TIMEOUT_S = 90.0  # three interpreters importing the engine at once on a busy 2-core machine


class Replica:
    """One ``car serve`` process on its own port and home."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        path = self.home / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        with open(self.home / "serve.log", "ab") as log:
            self.process = subprocess.Popen(
                [*_SERVE, "--port", str(self.port), "--log-level", "warning"],
                env={**self._env, "CAR_HOME": str(self.home)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_healthy(self, deadline: float) -> None:
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"replica on {self.port} exited before serving:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on {self.port} did not serve in time:\n{self.log[-3000:]}")
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """``kill -9``: no shutdown handler runs, nothing queued is written."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class ReplicaFleet:
    """``count`` replicas of one configuration; ``start()`` starts them all at once."""

    def __init__(
        self,
        root: Path,
        count: int,
        config_toml: str,
        models_toml: str,
        env: dict[str, str],
        env_of: Callable[[int], dict[str, str]] = lambda index: {},
    ) -> None:
        """``env`` is every replica's environment (over this process's, less ``CAR_*`` and API
        keys), ``env_of(index)`` what one replica has of its own (an API key, say)."""
        clean = {
            k: v for k, v in os.environ.items() if not k.startswith("CAR_") and not k.endswith("_API_KEY")
        }
        self.replicas: list[Replica] = []
        for index in range(count):
            home = root / f"replica-{index}"
            home.mkdir(parents=True)
            (home / "config.toml").write_text(config_toml)
            (home / "models.toml").write_text(models_toml)
            self.replicas.append(Replica(home, {**clean, "CAR_NO_SPINNER": "1", **env, **env_of(index)}))

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __len__(self) -> int:
        return len(self.replicas)

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        for replica in self.replicas:
            replica.wait_healthy(deadline)

    def restart(self, index: int) -> None:
        replica = self.replicas[index]
        replica.stop()
        replica.start()
        replica.wait_healthy(time.monotonic() + _START_TIMEOUT_S)

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.alive and replica.process is not None:
                replica.process.terminate()
        for replica in self.replicas:
            replica.stop()

    def logs(self) -> str:
        return "\n".join(f"--- replica {i} ---\n{r.log[-4000:]}" for i, r in enumerate(self.replicas))


class RoundRobin:
    """A load balancer's view of the fleet: each request goes to the next replica; a replica that
    refuses the connection is skipped (passive health check) and the request goes to the next one.
    Thread-safe: several threads may send at once."""

    def __init__(self, fleet: ReplicaFleet, timeout_s: float = 30.0) -> None:
        self.fleet = fleet
        self._client = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=64))
        self._next = 0
        self._lock = threading.Lock()
        self.skipped = 0  # requests that found a replica down and went on to the next

    def _pick(self) -> int:
        with self._lock:
            index = self._next % len(self.fleet)
            self._next += 1
            return index

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, httpx.Response]:
        """(replica index, response) for ``body`` sent to the next replica that answers."""
        start = self._pick()
        last: Exception | None = None
        for step in range(len(self.fleet)):
            index = (start + step) % len(self.fleet)
            try:
                return index, self._client.post(self.fleet[index].url + path, json=body)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                last = exc
                with self._lock:
                    self.skipped += 1
        raise RuntimeError(f"no replica answered: {last}")

    def to(self, index: int, path: str, body: dict[str, Any]) -> httpx.Response:
        """``body`` sent to one replica (no balancing)."""
        return self._client.post(self.fleet[index].url + path, json=body)

    def get(self, index: int, path: str) -> httpx.Response:
        return self._client.get(self.fleet[index].url + path)

    def close(self) -> None:
        self._client.close()


def wait_for(check: Callable[[], bool], limit_s: float, what: str, poll_s: float = 0.01) -> float:
    """Seconds until ``check()`` holds; an AssertionError naming ``what`` past ``limit_s``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"{what}: not within {limit_s} s")
        time.sleep(poll_s)
    return time.monotonic() - started
