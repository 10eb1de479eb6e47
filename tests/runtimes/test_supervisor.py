"""The supervisor, for real: llama-cpp-python's server on the embedded SmolLM2 GGUF, on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from car_inference.runtimes.managed import RuntimeSupervisor, stop_elsewhere
from car_inference.runtimes.specs import Launch, LlamaCppServerSpec, RuntimeFailed, free_port
from car_inference.runtimes.state import RunFiles, pid_alive
from car_inference.runtimes.supervisor import NEVER_ANSWERED_TRIES, ManagedRuntime, RuntimeState
from car_inference.schema import ModelSchema

from .helpers import FAST, MANAGED_ID, managed_smollm2, small_config, wait_for


def _models(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]]


def test_starts_waits_for_health_and_records_it(supervisor: RuntimeSupervisor) -> None:
    runtime = supervisor.runtime_for(managed_smollm2())
    assert runtime.state is RuntimeState.STOPPED and runtime.pid is None, "nothing starts before use"
    url = runtime.ensure()
    assert url.startswith("http://127.0.0.1:")
    assert _models(url) == [MANAGED_ID], "the server answers and serves the model under its id"
    status = runtime.status()
    assert status.state is RuntimeState.RUNNING and status.served == [MANAGED_ID]
    assert status.pid == runtime.pid and pid_alive(runtime.pid or -1)
    record = runtime.files.read_state()
    assert record is not None and record["pid"] == runtime.pid and record["base_url"] == url
    assert record["owner_pid"] == os.getpid() and record["state"] == "running"
    log = runtime.files.log_path
    text = log.read_text()
    assert log.parent.name == "logs" and "--- car:" in text and "runtimes.llamacpp_server" in text
    assert "llama_model_loader" not in text, "the model's metadata (2,100 info lines) stays out"
    assert len(text.splitlines()) < 100
    assert runtime.ensure() == url, "a second use finds it running"


def test_crash_is_restarted_with_backoff(supervisor: RuntimeSupervisor) -> None:
    runtime = supervisor.runtime_for(managed_smollm2())
    url = runtime.ensure()
    first = runtime.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: runtime.restarts == 1 and runtime.state is RuntimeState.RUNNING, what="the restart")
    assert runtime.pid != first and not pid_alive(first)
    assert runtime.ensure() == url, "same port after a restart: clients keep their URL"
    assert _models(url) == [MANAGED_ID]
    text = runtime.files.log_path.read_text()
    assert text.count("--- car: start ") == 2
    assert "exited with status -9; restart 1 in 0.2 s" in text, "a restart is said, not silent"


def test_a_server_that_takes_the_port_while_ours_is_down_is_never_used(supervisor: RuntimeSupervisor) -> None:
    """Ours crashed and another server took its port: the restart answered the health check
    through that one, so car went on sending our model's requests to another model ("I AM THE
    IMPOSTOR"), and restarted for ever, each restart failing to bind. Now the restart sees the
    port serve another model, counts it a failure, and gives up."""

    class Impostor(_Serving):
        served: ClassVar[list[str]] = ["evil-model"]

    supervisor.settings.max_restarts = 2
    supervisor.settings.backoff_s = 2.0  # the other server takes the port before our restart
    runtime = supervisor.runtime_for(managed_smollm2())
    url = runtime.ensure()
    first = runtime.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    port = int(url.rsplit(":", 1)[1])
    impostor: ThreadingHTTPServer | None = None
    deadline = time.monotonic() + 1.5
    while impostor is None:  # the port is free once the killed server is gone
        try:
            impostor = ThreadingHTTPServer(("127.0.0.1", port), Impostor)
        except OSError:
            assert time.monotonic() < deadline, "the port was not let go"
            time.sleep(0.02)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        states: list[tuple[RuntimeState, list[str]]] = []

        def given_up() -> bool:
            states.append((runtime.state, list(runtime.served)))
            return runtime.state is RuntimeState.FAILED

        wait_for(given_up, timeout_s=60, what="giving up")
        assert (RuntimeState.RUNNING, ["evil-model"]) not in states, "the other model was taken for ours"
        assert "taken by a server that serves ['evil-model'], not test/smollm2-served" in (
            runtime.error or ""
        )
        with pytest.raises(RuntimeFailed):
            runtime.ensure()
    finally:
        impostor.shutdown()
        impostor.server_close()


def _broken_model(tmp_path: Path) -> ModelSchema:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\xff\xff\xff\xff a GGUF magic, then nothing a loader reads")
    model = managed_smollm2("test/broken")
    return model.model_copy(
        update={"source": model.source.model_copy(update={"package": None, "path": str(broken)})}
    )


def test_gives_up_after_repeated_failures(supervisor: RuntimeSupervisor, tmp_path: Path) -> None:
    supervisor.settings.max_restarts = 1
    runtime = supervisor.runtime_for(_broken_model(tmp_path))
    with pytest.raises(RuntimeFailed) as info:
        runtime.ensure()
    message = str(info.value)
    assert "gave up after 2 failures in a row" in message and "last log lines" in message
    assert info.value.retryable and runtime.state is RuntimeState.FAILED and runtime.restarts == 1
    with pytest.raises(RuntimeFailed):  # right after, callers get the failure without a new start
        runtime.ensure()
    assert runtime.files.log_path.read_text().count("--- car: start ") == 2
    assert not runtime.files.locked_elsewhere()


def test_a_server_that_never_answered_gives_up_soon_and_says_so_to_other_processes(
    supervisor: RuntimeSupervisor, tmp_path: Path
) -> None:
    """A corrupt GGUF waited through every restart's backoff (5 by default, about 38 s) before its
    error, and afterwards `car runtimes list` (another process) showed it `stopped`, not why."""
    assert supervisor.settings.max_restarts == 5
    runtime = supervisor.runtime_for(_broken_model(tmp_path))
    with pytest.raises(RuntimeFailed) as info:
        runtime.ensure()
    assert f"gave up after {NEVER_ANSWERED_TRIES + 1} failures in a row" in str(info.value)
    text = runtime.files.log_path.read_text()
    assert text.count("--- car: start ") == NEVER_ANSWERED_TRIES + 1
    assert "llama_model_load: error loading model" in text, "llama.cpp's reason stays in the log"
    other = RuntimeSupervisor(small_config(supervisor.home), settings=FAST.model_copy())
    [status] = [s for s in other.statuses() if s.name == runtime.name]
    assert status.state is RuntimeState.FAILED and status.base_url is None
    assert status.error is not None and "gave up after 3 failures" in status.error
    time.sleep(runtime.settings.backoff_max_s + 0.1)  # past the failure's hold: a use starts afresh
    with pytest.raises(RuntimeFailed):
        runtime.ensure()
    assert runtime.files.log_path.read_text().count("--- car: start ") == 2 * (NEVER_ANSWERED_TRIES + 1)
    assert stop_elsewhere(supervisor.home, runtime.name, timeout_s=1) is False
    assert runtime.name not in [s.name for s in other.statuses()], "stop clears the failed record"


def test_a_port_held_by_a_server_of_another_model_is_refused(supervisor: RuntimeSupervisor) -> None:
    url = supervisor.runtime_for(managed_smollm2()).ensure()
    port = int(url.rsplit(":", 1)[1])
    argv = [sys.executable, "-c", "raise SystemExit('must not start')"]
    mine = Launch("other", "llamacpp", argv, "127.0.0.1", port, "/v1/models", served_model="test/other")
    other = ManagedRuntime(LlamaCppServerSpec(), "other", supervisor.home, lambda: mine, FAST.model_copy())
    with pytest.raises(
        RuntimeFailed, match=r"taken by a server that serves \['test/smollm2-served'\], not test/other"
    ):
        other.ensure()
    same = Launch("same", "llamacpp", argv, "127.0.0.1", port, "/v1/models", served_model=MANAGED_ID)
    external = ManagedRuntime(LlamaCppServerSpec(), "same", supervisor.home, lambda: same, FAST.model_copy())
    assert (
        external.ensure() == url
        and external.state is RuntimeState.EXTERNAL
        and external.served == [MANAGED_ID]
    )


def test_a_command_that_cannot_run_fails_at_once(isolated_home: Path) -> None:
    missing = isolated_home / "no-such-server"
    launch = Launch("broken", "llamacpp", [str(missing)], "127.0.0.1", free_port(), "/v1/models")
    runtime = ManagedRuntime(LlamaCppServerSpec(), "broken", isolated_home, lambda: launch, FAST.model_copy())
    started = time.monotonic()
    with pytest.raises(RuntimeFailed, match=r"cannot run .*no-such-server"):
        runtime.ensure()
    assert time.monotonic() - started < 5 and runtime.restarts == 0 and runtime.state is RuntimeState.FAILED


def test_a_server_that_never_answers_is_replaced_not_doubled(isolated_home: Path) -> None:
    """A process that runs but never passes the health check is stopped before the next try."""
    code = "import time; print('loading forever', flush=True); time.sleep(600)"
    launch = Launch("mute", "llamacpp", [sys.executable, "-c", code], "127.0.0.1", free_port(), "/v1/models")
    settings = FAST.model_copy(update={"start_timeout_s": 1.0, "max_restarts": 1})
    runtime = ManagedRuntime(LlamaCppServerSpec(), "mute", isolated_home, lambda: launch, settings)
    pids: list[int] = []
    watcher = threading.Thread(target=lambda: _collect_pids(runtime, pids), daemon=True)
    watcher.start()
    with runtime.files.open_log() as earlier:  # a run of another day: its lines are not this failure's
        earlier.write(b"--- car: start 2026-01-01 00:00:00: old-server\nerror: out of memory\n")
    with pytest.raises(
        RuntimeFailed, match=r"not ready within 1 s; last log lines: .* loading forever"
    ) as caught:
        runtime.ensure()  # the caller's deadline covers one try; the monitor goes on trying
    assert "out of memory" not in str(caught.value) and "old-server" not in str(caught.value)
    wait_for(lambda: runtime.state is RuntimeState.FAILED, timeout_s=10, what="the monitor to give up")
    watcher.join(5)
    assert runtime.error is not None and "no answer from" in runtime.error
    assert len(pids) == 2 and not any(pid_alive(p) for p in pids), "each try stopped, none left behind"


def test_a_caller_that_stops_waiting_ends_the_wait_within_a_tick(isolated_home: Path) -> None:
    """Ctrl-C during a start: the waiting thread held the process until the start deadline (the
    executor is joined on exit), 28 s in the audit; with ``stop`` set it gives up at once."""
    code = "import time; time.sleep(600)"
    launch = Launch("slow", "llamacpp", [sys.executable, "-c", code], "127.0.0.1", free_port(), "/v1/models")
    settings = FAST.model_copy(update={"start_timeout_s": 30.0})
    runtime = ManagedRuntime(LlamaCppServerSpec(), "slow", isolated_home, lambda: launch, settings)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeFailed, match="start abandoned"):
            runtime.ensure(stop)
        assert time.monotonic() - started < 2
    finally:
        runtime.stop()


def _collect_pids(runtime: ManagedRuntime, pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and runtime.state is not RuntimeState.FAILED:
        if runtime.pid is not None and runtime.pid not in pids:
            pids.append(runtime.pid)
        time.sleep(0.02)


def test_idle_server_is_stopped_and_starts_again_on_use(supervisor: RuntimeSupervisor) -> None:
    supervisor.settings.idle_timeout_s = 1.0
    runtime = supervisor.runtime_for(managed_smollm2())
    runtime.ensure()
    pid = runtime.pid
    assert pid is not None
    with runtime.busy():  # a request in flight is never cut by the idle timer
        time.sleep(1.6)
        assert runtime.state is RuntimeState.RUNNING
    wait_for(lambda: runtime.state is RuntimeState.STOPPED, timeout_s=15, what="the idle stop")
    assert not pid_alive(pid) and runtime.files.read_state() is None
    assert not runtime.files.locked_elsewhere(), "the lock is released with the server"
    url = runtime.ensure()
    assert runtime.pid != pid and _models(url) == [MANAGED_ID]


def test_stop_request_from_another_process_stops_it(supervisor: RuntimeSupervisor) -> None:
    runtime = supervisor.runtime_for(managed_smollm2())
    runtime.ensure()
    pid = runtime.pid
    assert stop_elsewhere(supervisor.home, runtime.name, timeout_s=20) is True
    assert runtime.state is RuntimeState.STOPPED and pid is not None and not pid_alive(pid)
    assert stop_elsewhere(supervisor.home, runtime.name, timeout_s=1) is False, "nothing left to stop"


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from car_inference.runtimes.managed import RuntimeSupervisor
    from runtimes.helpers import FAST, managed_smollm2, small_config
    from pathlib import Path
    sup = RuntimeSupervisor(small_config(Path({home!r})), settings=FAST)
    runtime = sup.runtime_for(managed_smollm2())
    url = runtime.ensure()
    status = runtime.status()
    print(json.dumps({{"url": url, "state": status.state, "pid": status.pid}}), flush=True)
    if {hold}:
        time.sleep(60)
    """
)


def _child(home: Path, hold: bool) -> subprocess.Popen[str]:
    code = _CHILD.format(tests=str(Path(__file__).parents[1]), home=str(home), hold=hold)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_second_process_attaches_instead_of_starting_another(supervisor: RuntimeSupervisor) -> None:
    runtime = supervisor.runtime_for(managed_smollm2())
    url = runtime.ensure()
    child = _child(supervisor.home, hold=False)
    out, _ = child.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["url"] == url and seen["state"] == "attached"
    assert seen["pid"] == runtime.pid, "the child reports our server, not one of its own"
    assert runtime.state is RuntimeState.RUNNING and runtime.restarts == 0
    assert runtime.files.used_at() is not None, "the attached process's use reaches the owner's idle clock"


def test_owner_gone_means_server_gone_and_the_next_one_takes_over(isolated_home: Path) -> None:
    child = _child(isolated_home, hold=True)
    assert child.stdout is not None
    seen = json.loads(child.stdout.readline())
    assert seen["state"] == "running"
    os.kill(child.pid, signal.SIGKILL)  # no atexit: the kernel's parent-death signal does it
    child.wait(10)
    wait_for(lambda: not pid_alive(seen["pid"]), timeout_s=15, what="the orphaned server to exit")
    sup = RuntimeSupervisor(small_config(isolated_home), settings=FAST.model_copy())
    try:
        runtime = sup.runtime_for(managed_smollm2())
        url = runtime.ensure()
        assert runtime.state is RuntimeState.RUNNING and runtime.pid != seen["pid"]
        assert _models(url) == [MANAGED_ID]
    finally:
        sup.close()


def test_server_stops_when_the_owning_process_exits(isolated_home: Path) -> None:
    child = _child(isolated_home, hold=False)
    out, _ = child.communicate(timeout=60)
    seen = json.loads(out)
    assert child.returncode == 0 and seen["state"] == "running"
    assert not pid_alive(seen["pid"]), "stopped at exit, before the process ended"
    sup = RuntimeSupervisor(small_config(isolated_home), settings=FAST)
    assert [s.state for s in sup.statuses()] == [], "no record left behind"


def test_an_attached_processs_request_in_flight_keeps_the_owners_server(
    supervisor: RuntimeSupervisor,
) -> None:
    """The owner idle-stopped the server in the middle of an attached process's answer: that use
    reached its idle clock only when the request began and ended. Two supervisors on one home
    stand for two processes (each takes the owner's lock through a file of its own)."""
    supervisor.settings.idle_timeout_s = 1.0
    owner = supervisor.runtime_for(managed_smollm2())
    url = owner.ensure()
    other = RuntimeSupervisor(small_config(supervisor.home), settings=FAST.model_copy())
    try:
        attached = other.runtime_for(managed_smollm2())
        assert attached.ensure() == url and attached.state is RuntimeState.ATTACHED
        with attached.busy():  # a long answer streams in the attached process
            time.sleep(2.5)
            assert owner.state is RuntimeState.RUNNING, "stopped under the attached process's request"
        wait_for(lambda: owner.state is RuntimeState.STOPPED, timeout_s=15, what="the idle stop after it")
    finally:
        other.close()


class _Serving(BaseHTTPRequestHandler):
    served: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        data = [{"id": name, "object": "model"} for name in self.served]
        body = json.dumps({"object": "list", "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_attached_process_uses_only_the_owners_running_server_of_its_model(isolated_home: Path) -> None:
    """An attached process took any server answering at the owner's URL: while the owner restarted
    ours, another server that took the port got the user's prompt ("model not found"). It now
    attaches only when the owner's record says running and the server there serves the model."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Serving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    spec = LlamaCppServerSpec()
    name = spec.instance(managed_smollm2())
    owner = RunFiles(isolated_home, name)
    assert owner.try_lock()  # another process owns it

    def attach(state: str, served: list[str]) -> str:
        _Serving.served = served
        owner.write_state({"state": state, "base_url": url, "served_model": MANAGED_ID, "pid": 1})
        settings = FAST.model_copy(update={"start_timeout_s": 0.5})
        runtime = ManagedRuntime(spec, name, isolated_home, lambda: pytest.fail("not the owner"), settings)
        return runtime.ensure()

    try:
        for state, served in (
            ("restarting", [MANAGED_ID]),
            ("starting", ["evil-model"]),
            ("running", ["evil-model"]),
        ):
            with pytest.raises(RuntimeFailed, match=r"not ready within 0\.5 s"):
                attach(state, served)
        assert attach("running", [MANAGED_ID]) == url
    finally:
        owner.unlock()
        server.shutdown()
        server.server_close()
