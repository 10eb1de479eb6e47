"""The files processes share a runtime through: the lock, the record, use and stop marks, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from car_inference.runtimes.state import RunFiles, die_with_parent, pid_alive


def test_lock_excludes_other_holders_until_released(tmp_path: Path) -> None:
    mine, theirs = RunFiles(tmp_path, "x"), RunFiles(tmp_path, "x")
    assert not theirs.locked_elsewhere()
    assert mine.try_lock() and mine.holds_lock and mine.try_lock(), "taking it again is a no-op"
    assert not theirs.try_lock() and theirs.locked_elsewhere()
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError: sys.exit(3)"
    )
    assert subprocess.run([sys.executable, "-c", code, str(mine.lock_path)], check=False).returncode == 3
    mine.unlock()
    assert theirs.try_lock() and not mine.try_lock()
    theirs.unlock()


def test_record_use_and_stop_marks(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, "x")
    assert files.read_state() is None and files.used_at() is None and not files.stop_requested()
    files.write_state({"pid": 7, "base_url": "http://127.0.0.1:1"})
    assert files.read_state() == {"pid": 7, "base_url": "http://127.0.0.1:1"}
    files.state_path.write_text("{half")
    assert files.read_state() is None, "a damaged record reads as none"
    files.clear_state()
    files.touch_used()
    assert files.used_at() is not None
    files.request_stop()
    assert files.stop_requested()
    files.clear_stop()
    assert not files.stop_requested()


def test_log_tail_and_rotation(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, "x")
    assert files.log_tail() == []
    with files.open_log() as log:
        log.write(b"".join(b"line %d\n" % i for i in range(100)))
    assert files.log_tail(3) == ["line 97", "line 98", "line 99"]
    assert files.log_tail(0) == []  # `car runtimes logs -n 0` printed every line it read
    assert files.log_tail(3, this_run=True) == ["line 97", "line 98", "line 99"]  # no start line: all
    with files.open_log() as log:
        log.write(b"--- car: start 2026-12-07 10:00:00: llama-server\nready\n")
    assert files.log_tail(3) == ["line 99", "--- car: start 2026-12-07 10:00:00: llama-server", "ready"]
    assert files.log_tail(3, this_run=True) == ["--- car: start 2026-12-07 10:00:00: llama-server", "ready"]
    with open(files.log_path, "ab") as log:
        log.truncate(21 * 1024 * 1024)
    files.open_log().close()
    assert files.log_path.stat().st_size == 0 and files.log_path.with_name("x.log.1").is_file()


def test_pid_alive_sees_zombies_as_dead() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while True:  # exited but not reaped: a zombie
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            break
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)


def test_a_server_is_started_behind_a_wrapper_that_execs_it_in_its_place(tmp_path: Path) -> None:
    """Parent-death signalling ran as Popen's preexec_fn, Python code between fork and exec that
    at times hung the child on a lock another thread held when it forked. The wrapper is a
    program of its own: the server then runs under the pid Popen gave, and its signal is set."""
    asks = "import ctypes; s = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(s)); print(s.value)"
    argv = die_with_parent([sys.executable, "-c", asks])  # PR_GET_PDEATHSIG
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0 and int(proc.stdout) == signal.SIGTERM
    child = subprocess.Popen(die_with_parent([sys.executable, "-c", "import os; print(os.getpid())"]),
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = child.communicate(timeout=30)
    assert int(out) == child.pid, "the wrapper execs the server: one process, one pid"
    missing = tmp_path / "no-such-server"
    with pytest.raises(FileNotFoundError):
        die_with_parent([str(missing)])
    with pytest.raises(FileNotFoundError):
        die_with_parent(["no-such-server-on-path"])
    script = tmp_path / "server"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        die_with_parent([str(script)])
