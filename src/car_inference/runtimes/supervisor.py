"""One supervisor for the OpenAI-compatible servers we start (llama.cpp server, vLLM, Ollama).

A ``ManagedRuntime`` is one server instance. The first process that needs it takes its lock
(``state.RunFiles``) and becomes the owner: a monitor thread starts the server with its output in
``$CAR_HOME/logs/NAME.log``, waits for its health URL within a deadline, restarts it with
exponential backoff when it dies, and stops it after an idle timeout, on `car runtimes stop`, or
when the owning process exits. Another process that finds the lock taken attaches to the running
server. A server that already answers on the port and that nobody here started (an Ollama system
service, a `vllm serve` run by hand) is used as it is and never stopped.

The monitor is a thread, not an asyncio task: the engine may run on short-lived event loops (the
CLI's ``asyncio.run``), and on Linux the server gets SIGTERM if the thread that spawned it dies
(``PR_SET_PDEATHSIG``), so a killed owner leaves no orphan behind.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from ..config import RuntimeSettings
from .specs import Launch, RuntimeFailed, RuntimeSpec
from .state import START_MARK, RunFiles, die_with_parent, signal_group, tree_rss_mb

__all__ = ["ManagedRuntime", "RuntimeFailed", "RuntimeSettings", "RuntimeState", "RuntimeStatus"]

log = logging.getLogger("car_inference.runtimes")


class RuntimeState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    ATTACHED = "attached"  # another process owns it
    EXTERNAL = "external"  # answered before we started anything; never stopped by us


class RuntimeStatus(BaseModel):
    """One runtime instance, for `car runtimes list` and the health report."""

    name: str
    runtime: str
    model_id: str | None = None
    state: RuntimeState
    base_url: str | None = None
    pid: int | None = None
    owner_pid: int | None = None
    restarts: int = 0
    started_at: float | None = None
    idle_s: float | None = None
    served: list[str] = Field(default_factory=list)
    rss_mb: float | None = Field(default=None, description="measured: the server and its workers")
    log_path: str
    error: str | None = None


_START_TIMEOUT_S = {"llamacpp": 60.0, "vllm": 900.0, "ollama": 30.0}  # vLLM may download weights first
# A server that ran this long before it exited restarts as new; a shorter run is one more failure.
STABLE_S = 30.0
# A server that has not answered once since its first start is retried this often, not
# ``max_restarts`` times: what stops it is most likely its files or flags (a corrupt GGUF waited
# through the whole backoff, about 38 s, for the same error), and one retry covers a port taken
# in between or memory a previous server had not yet released.
NEVER_ANSWERED_TRIES = 2


class ManagedRuntime:
    """One server instance: owned (we run it), attached (another process does) or external."""

    def __init__(
        self,
        spec: RuntimeSpec,
        name: str,
        home: Path,
        launch: Callable[[], Launch],
        settings: RuntimeSettings,
        *,
        model_id: str | None = None,
        on_ready: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.name = name
        self.model_id = model_id
        self.settings = settings
        self.files = RunFiles(home, name)
        self._make_launch = launch
        self._on_ready = on_ready
        self._launch: Launch | None = None
        self._cv = threading.Condition()
        self._state = RuntimeState.STOPPED
        self._url: str | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._checked_at = 0.0
        self._failed_at = 0.0
        self._last_used = time.time()
        self._busy = 0
        self._beating = False  # an attached process's heartbeat thread runs (``_heartbeat``)
        self.restarts = 0
        self.started_at: float | None = None
        self.served: list[str] = []
        self.error: str | None = None
        self.stopped_because: str | None = None  # why the owner's last run ended (None: it runs)

    @property
    def state(self) -> RuntimeState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def start_timeout_s(self) -> float:
        return self.settings.start_timeout_s or _START_TIMEOUT_S.get(self.spec.name, 120.0)

    # --- use -----------------------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the server this process started still runs (a crash is seen here at once; the
        monitor notices it a tick later). True for a server another process owns or runs."""
        proc = self._proc
        return proc is None or proc.poll() is None

    def server_pid(self) -> int | None:
        """The server's pid: ours, or the one its owner recorded when another process runs it."""
        if self._state is RuntimeState.ATTACHED:
            pid = (self.files.read_state() or {}).get("pid")
            return pid if isinstance(pid, int) else None
        return self.pid

    def comeback(self) -> bool | None:
        """After the server died under a request: True once a server answers again (ours
        restarted, or the owner's when another process runs it), False when none will (given up,
        stopped, an external server, an owner gone), None while one still may. One probe."""
        state = self._state
        if state is RuntimeState.ATTACHED:
            return self._owner_restarted()
        if state in (RuntimeState.RUNNING, RuntimeState.STARTING, RuntimeState.RESTARTING):
            return True if self.ready_url() is not None and self.answers() else None
        return False

    def _owner_restarted(self) -> bool | None:
        if not self.files.locked_elsewhere():
            return self._take_over()
        record = self.files.read_state() or {}
        url = self._owners_server(record)
        if url is None:
            return None  # still restarting, or the owner has not seen the crash yet
        self._attach(url, RuntimeState.ATTACHED, record.get("served"))
        return True

    def _take_over(self) -> bool | None:
        """The owner went with its server: start one, as after a crash (the call failed, and
        three such failures opened the model's circuit). True when one answers at once (another
        process took over first), None while it starts, False when it cannot be started."""
        with self._cv:
            if self._state is RuntimeState.ATTACHED:
                self._state, self._url, self._checked_at = RuntimeState.STOPPED, None, 0.0
            try:
                return True if self._claim() is not None else None
            except RuntimeFailed:
                return False

    def _owners_server(self, record: dict[str, Any]) -> str | None:
        """The URL of the owner's server when its record says it runs and the server there answers
        for our model. Not while the owner (re)starts it: a server that took the port meanwhile
        answers the health check too, and an attached process sent it our prompts."""
        url = record.get("base_url")
        if record.get("state") != RuntimeState.RUNNING or not isinstance(url, str):
            return None
        if not _healthy(url + self.spec.health_path):
            return None
        wanted = record.get("served_model")
        if wanted is not None:
            try:
                served = self.spec.served(url)
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return None
            if wanted not in served:
                return None  # the owner's monitor sees it too, and restarts or gives up
        return url

    def answers(self) -> bool:
        """Whether the server at the current URL answers its health check now (one GET, 1 s)."""
        url = self._url
        return url is not None and _healthy(url + self.spec.health_path)

    def ready_url(self) -> str | None:
        """The server's URL when it is known to answer now, without blocking (the hot path)."""
        state, url = self._state, self._url
        if state is RuntimeState.RUNNING:
            return url if self.alive() else None
        fresh = time.monotonic() - self._checked_at < self.settings.recheck_s
        if state in (RuntimeState.ATTACHED, RuntimeState.EXTERNAL) and fresh:
            return url
        return None

    def ensure(self, stop: threading.Event | None = None) -> str:
        """Start the server (or attach to it) and wait until it answers; its base URL. Blocking:
        async callers run it in a thread, with ``stop`` set when they stop waiting (Ctrl-C: the
        wait ends within a tick instead of at the start deadline). Raises ``RuntimeFailed`` when
        it cannot be had in time, or was abandoned."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if stop is not None and stop.is_set():
                raise RuntimeFailed(
                    "start abandoned: its caller stopped waiting", runtime=self.name, model=self.model_id
                )
            with self._cv:
                if self._recently_failed():
                    raise RuntimeFailed(
                        self.error or "failed",
                        runtime=self.name,
                        model=self.model_id,
                        log=self.files.log_tail(this_run=True),
                    )
                url = self.ready_url() or self._claim()
                if url is not None:
                    self.touch()
                    return url
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeFailed(
                        f"not ready within {self.start_timeout_s:g} s",
                        runtime=self.name,
                        model=self.model_id,
                        log=self.files.log_tail(this_run=True),
                    )
                self._cv.wait(min(left, self.settings.tick_s))

    def touch(self) -> None:
        self._last_used = time.time()
        self.files.touch_used()  # for the owner's idle clock and for idle times other processes show

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """A request in flight: never idle-stopped under it, by this process (``_busy``) or by the
        owner when another process runs the server (``_heartbeat``)."""
        with self._cv:
            self._busy += 1
            beat = self._state is RuntimeState.ATTACHED and not self._beating
            self._beating = self._beating or beat
        if beat:
            threading.Thread(target=self._heartbeat, name=f"runtime-{self.name}-use", daemon=True).start()
        try:
            yield
        finally:
            with self._cv:
                self._busy -= 1
                self.touch()
                self._cv.notify_all()

    def _heartbeat(self) -> None:
        """While an attached process has requests in flight, its use reaches the owner's idle
        clock (``NAME.used``) every tick: touched only when a request began and ended, a long
        one was idle-stopped under it by the owner."""
        with self._cv:
            try:
                while self._busy:
                    self.files.touch_used()
                    self._cv.wait(self.settings.tick_s)
            finally:
                self._beating = False

    def _recently_failed(self) -> bool:
        """Gave up within the last ``backoff_max_s``: callers get the failure, not a new start."""
        return (
            self._state is RuntimeState.FAILED
            and not self._owner_alive()
            and time.monotonic() - self._failed_at < max(self.settings.backoff_max_s, 1.0)
        )

    def _owner_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _claim(self) -> str | None:
        """Under ``_cv``: become the owner, attach, or wait for the one starting it. The URL when
        an attached or external server answers now; None when it is not ready yet."""
        if self._owner_alive():
            return None
        if self.files.try_lock():
            self._launch = None  # a fresh start may take a fresh port (the old one may be taken now)
            try:
                launch = self._launch_once()
            except BaseException:
                self.files.unlock()
                raise
            if _healthy(launch.base_url + launch.health_path):
                self.files.unlock()  # someone runs it outside our care: use it, never stop it
                self._check_serves(launch)
                return self._attach(  # _check_serves listed what it serves, if we name a model
                    launch.base_url, RuntimeState.EXTERNAL, self.served if launch.served_model else None
                )
            self._start_owner()
            return None
        record = self.files.read_state() or {}
        url = self._owners_server(record)
        if url is not None:
            return self._attach(url, RuntimeState.ATTACHED, record.get("served"))
        return None  # the owner is still starting it (or restarting it)

    def _check_serves(self, launch: Launch) -> None:
        """A server found on our port must serve our model: another model there is never used
        in its place."""
        problem = self._impostor(launch)
        if problem is not None:
            raise RuntimeFailed(
                f"{problem}; give this model another port", runtime=self.name, model=self.model_id
            )

    def _impostor(self, launch: Launch) -> str | None:
        """What is wrong when the server answering on ``launch``'s port does not serve our model
        (None when it does, or when the runtime names no model); ``served`` is what it lists."""
        if launch.served_model is None:
            return None
        try:
            served = self.spec.served(launch.base_url)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            served = []
        if launch.served_model in served:
            self.served = served
            return None
        return (
            f"{launch.base_url} is taken by a server that serves {served or 'nothing we can list'}, "
            f"not {launch.served_model}"
        )

    def _attach(self, url: str, state: RuntimeState, served: Any) -> str:
        """Use a server another process runs: what it serves is registered as when we start one
        (Ollama's tags; ``served`` is its owner's record of them, else it is asked)."""
        self._url, self._state, self._checked_at = url, state, time.monotonic()
        if not isinstance(served, list):
            try:
                served = self.spec.served(url)
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                served = []
        self.served = [str(name) for name in served]
        self._announce(url)
        return url

    def _announce(self, url: str) -> None:
        if self._on_ready is not None:
            try:
                self._on_ready(url, self.served)
            except Exception:  # registering what it serves must not take the server down
                log.exception("runtime %s: on_ready failed", self.name)

    def _launch_once(self) -> Launch:
        if self._launch is None:
            self._launch = self._make_launch()  # the port stays the same across restarts
        return self._launch

    # --- the owner's monitor -------------------------------------------------------------------

    def _start_owner(self) -> None:
        self._stopping = False
        self.error = None
        self.files.clear_stop()
        self._state = RuntimeState.STARTING
        self._url = self._launch_once().base_url
        self._thread = threading.Thread(target=self._monitor, name=f"runtime-{self.name}", daemon=True)
        self._thread.start()
        _live.add(self)

    def _monitor(self) -> None:
        launch = self._launch_once()
        failures, answered = 0, False
        self.stopped_because = None
        try:
            while not self._should_stop():
                try:
                    proc = self._spawn(launch)
                except OSError as exc:  # not a crash to retry: the command itself cannot run
                    self._set(RuntimeState.FAILED, f"cannot run {launch.argv[0]}: {exc}")
                    break
                if self._wait_healthy(proc, launch):
                    self._set_running(launch)
                    ran, answered = time.monotonic(), True
                    ended = self._watch(proc)
                    if ended != "exited":
                        self.stopped_because = ended
                        break
                    self.error = f"exited with status {proc.returncode}"
                    if time.monotonic() - ran >= STABLE_S:  # a crash after a good run starts afresh;
                        failures = 0  # one at every start is a loop: it counts toward giving up
                elif proc.poll() is not None:
                    self.error = f"exited with status {proc.returncode} while starting"
                self._terminate()  # one that never answered goes before the next try takes its port
                if self._should_stop():
                    break
                failures += 1
                tries = (
                    self.settings.max_restarts
                    if answered
                    else min(self.settings.max_restarts, NEVER_ANSWERED_TRIES)
                )
                if failures > tries:
                    self._set(
                        RuntimeState.FAILED, f"{self.error}; gave up after {failures} failures in a row"
                    )
                    break
                self.restarts += 1
                self._set(RuntimeState.RESTARTING)
                delay = min(self.settings.backoff_s * 2 ** (failures - 1), self.settings.backoff_max_s)
                self._say(f"{self.error}; restart {self.restarts} in {delay:g} s")  # they were silent
                self._sleep(delay)
        finally:
            self._terminate()
            if self._state is RuntimeState.FAILED:  # other processes (`car runtimes list`) see why
                self.files.write_state(self._record(launch, RuntimeState.FAILED))
            else:
                self.files.clear_state()
            self.files.clear_stop()
            self.files.unlock()
            if self._state is not RuntimeState.FAILED:
                self.stopped_because = self.stopped_because or "stop"
                self._set(RuntimeState.STOPPED)

    def _say(self, message: str) -> None:
        """``message`` in car's log (a warning) and in the server's log, where its lines are."""
        log.warning("runtime %s: %s", self.name, message)
        with contextlib.suppress(OSError), self.files.open_log() as out:
            out.write(f"--- car: {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n".encode())

    def _spawn(self, launch: Launch) -> subprocess.Popen[bytes]:
        out = self.files.open_log()
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"{START_MARK}{stamp}: {' '.join(launch.argv)}\n".encode())
            out.flush()
            env = {**os.environ, **launch.env}
            proc = subprocess.Popen(
                die_with_parent(launch.argv, env.get("PATH")),  # gone with the thread that started it
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: a stop reaches its workers too
            )
        finally:
            out.close()
        self._proc = proc
        self.started_at = time.time()
        self.files.write_state(self._record(launch, RuntimeState.STARTING))
        return proc

    def _wait_healthy(self, proc: subprocess.Popen[bytes], launch: Launch) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        url = launch.base_url + launch.health_path
        while time.monotonic() < deadline:
            if proc.poll() is not None or self._should_stop():
                return False
            if _healthy(url):
                # The port may answer for another server (one that took it while ours was down):
                # ours cannot bind it, and that one's model must never answer in our model's place.
                self.error = self._impostor(launch)
                return self.error is None
            self._sleep(self.settings.tick_s)
        self.error = f"no answer from {url} within {self.start_timeout_s:g} s"
        return False

    def _set_running(self, launch: Launch) -> None:
        self.touch()  # the idle clock starts now, not at the last use before a stop
        try:
            self.served = self.spec.served(launch.base_url)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.served = []
        self.files.write_state(self._record(launch, RuntimeState.RUNNING))
        self._announce(launch.base_url)
        self._set(RuntimeState.RUNNING)

    def _watch(self, proc: subprocess.Popen[bytes]) -> str:
        """Until the server exits ("exited"), is asked to stop ("stop") or sits idle ("idle")."""
        while True:
            if proc.poll() is not None:
                return "exited"
            if self._should_stop():
                return "stop"
            if self._idle_for() is not None:
                return "idle"
            self._sleep(self.settings.tick_s)

    def _idle_for(self) -> float | None:
        """Seconds idle when past the timeout and nothing is in flight, else None."""
        timeout = self.settings.idle_timeout_s
        if not timeout or self._busy:
            return None
        idle = time.time() - max(self._last_used, self.files.used_at() or 0.0)
        return idle if idle > timeout else None

    def _should_stop(self) -> bool:
        return self._stopping or self.files.stop_requested()

    def _sleep(self, seconds: float) -> None:
        with self._cv:
            if not self._stopping:
                self._cv.wait(seconds)

    def _set(self, state: RuntimeState, error: str | None = None) -> None:
        with self._cv:
            self._state = state
            if state is RuntimeState.FAILED:
                self._failed_at = time.monotonic()
            if error is not None:
                self.error = error
            self._cv.notify_all()

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(self.settings.stop_grace_s)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        signal_group(proc.pid, signal.SIGKILL)  # workers the server left behind
        self._proc = None

    def _record(self, launch: Launch, state: RuntimeState) -> dict[str, Any]:
        return {
            "name": self.name, "runtime": self.spec.name, "model_id": self.model_id,
            "state": str(state), "pid": self.pid, "owner_pid": os.getpid(),
            "base_url": launch.base_url, "started_at": self.started_at, "restarts": self.restarts,
            "served": self.served, "served_model": launch.served_model, "argv": launch.argv,
            "error": self.error if state is RuntimeState.FAILED else None,
        }  # fmt: skip

    # --- control and reports -------------------------------------------------------------------

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the server if we own it (an attached or external one is only forgotten)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        with self._cv:
            if self._state in (RuntimeState.ATTACHED, RuntimeState.EXTERNAL):
                self._state, self._url = RuntimeState.STOPPED, None
        _live.discard(self)

    def status(self) -> RuntimeStatus:
        idle = time.time() - max(self._last_used, self.files.used_at() or 0.0)
        active = self._state not in (RuntimeState.STOPPED, RuntimeState.FAILED)
        record = self.files.read_state() if self._state is RuntimeState.ATTACHED else None
        return RuntimeStatus(
            name=self.name,
            runtime=self.spec.name,
            model_id=self.model_id,
            state=self._state,
            base_url=self._url if active else None,
            pid=self.pid if record is None else record.get("pid"),
            owner_pid=os.getpid() if self._owner_alive() else (record or {}).get("owner_pid"),
            restarts=self.restarts,
            started_at=self.started_at if record is None else record.get("started_at"),
            idle_s=round(idle, 1) if active else None,
            served=self.served if record is None else list(record.get("served") or []),
            rss_mb=tree_rss_mb(pid) if active and (pid := self.pid or (record or {}).get("pid")) else None,
            log_path=str(self.files.log_path),
            error=self.error,
        )


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


# Servers this process owns, stopped when it exits (the server and the CLI alike).
_live: weakref.WeakSet[ManagedRuntime] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for runtime in list(_live):
        runtime.stop(timeout_s=runtime.settings.stop_grace_s + 5)
