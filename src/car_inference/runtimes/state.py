"""The files through which processes share a runtime instance, under ``$CAR_HOME/runtimes/run/``:

- ``NAME.lock``: held (``fcntl.flock``) by the process that started the server, for as long as it
  runs; a second process that cannot take it attaches to the running server instead of starting one;
- ``NAME.json``: the owner's record (pid, URL, state), read by attachers and `car runtimes list`;
- ``NAME.used``: touched by every process that sends it a request, so the owner's idle clock
  counts other processes' use too;
- ``NAME.stop``: `car runtimes stop` asks the owner to stop the server by creating it.

Logs go to ``$CAR_HOME/logs/NAME.log``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["RunFiles", "die_with_parent", "pid_alive", "run_dir", "signal_group", "tree_rss_mb"]

_LOG_KEEP_BYTES = 20 * 1024 * 1024  # a log past this is moved to NAME.log.1 at the next start


def run_dir(home: Path) -> Path:
    return home / "runtimes" / "run"


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (one nobody has reaped yet is dead to us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: existing is all we can tell
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def signal_group(pid: int, sig: signal.Signals) -> None:
    """``sig`` to the process group ``pid`` leads (a server and its workers), if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# The server's argv behind a small Python that asks for SIGTERM when its parent (the thread that
# started it) dies, checks the parent is still there, and execs the server in its own place.
# This ran as Popen's preexec_fn: Python code between fork and exec, which in a process of many
# threads (llama.cpp's, torch's, ours) hung the child at times on a lock another thread held when
# it forked (two hung starts in one CI run, each until the test's 10-minute timeout).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the parent went before prctl: no orphan\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(argv: list[str], path: str | None = None) -> list[str]:
    """``argv`` started so that the server gets SIGTERM when the thread that started it dies
    (Linux; elsewhere ``argv`` as it is). Its pid is the server's: the wrapper execs it. A
    command that cannot run raises here, as Popen would (``path``: the child's PATH)."""
    if not sys.platform.startswith("linux") or not sys.executable:
        return argv
    exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=path)
    if exe is None or not os.path.isfile(exe):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    if not os.access(exe, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), argv[0])
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), exe, *argv[1:]]


def tree_rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and its descendants (a server's workers), in MB, measured from
    /proc; None where there is no /proc or the process is gone."""
    proc = Path("/proc")
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total_kb, todo, found = 0, [pid], False
    while todo:
        current = todo.pop()
        try:
            status = (proc / str(current) / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
                found = True
        todo.extend(children.get(current, []))
    return round(total_kb / 1024, 1) if found else None


START_MARK = "--- car: start "  # the line written to a runtime's log before each start


class RunFiles:
    def __init__(self, home: Path, name: str) -> None:
        self.name = name
        folder = run_dir(home)
        self.lock_path = folder / f"{name}.lock"
        self.state_path = folder / f"{name}.json"
        self.used_path = folder / f"{name}.used"
        self.stop_path = folder / f"{name}.stop"
        self.log_path = home / "logs" / f"{name}.log"
        self._fd: int | None = None

    # --- the lock ------------------------------------------------------------------------------

    def try_lock(self) -> bool:
        """Take the owner's lock without waiting; True when this process now holds it."""
        if self._fd is not None:
            return True
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def unlock(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def holds_lock(self) -> bool:
        return self._fd is not None

    def locked_elsewhere(self) -> bool:
        """Another open of the lock file (another process, or another supervisor) holds it."""
        if self._fd is not None:
            return False
        if not self.try_lock():
            return True
        self.unlock()
        return False

    # --- the record ----------------------------------------------------------------------------

    def write_state(self, record: dict[str, Any]) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.state_path)  # a reader never sees half a record

    def read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def clear_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    # --- use and stop requests -----------------------------------------------------------------

    def touch_used(self) -> None:
        with contextlib.suppress(OSError):
            self.used_path.touch()

    def used_at(self) -> float | None:
        try:
            return self.used_path.stat().st_mtime
        except OSError:
            return None

    def request_stop(self) -> None:
        self.stop_path.parent.mkdir(parents=True, exist_ok=True)
        self.stop_path.touch()

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop(self) -> None:
        self.stop_path.unlink(missing_ok=True)

    # --- logs ----------------------------------------------------------------------------------

    def open_log(self) -> Any:
        """The log, opened for appending (rotated once it is large)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > _LOG_KEEP_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        return open(self.log_path, "ab")  # handed to the child; the caller closes it

    def log_tail(self, lines: int = 20, *, this_run: bool = False) -> list[str]:
        """The log's last ``lines`` lines; ``this_run``: none from before the last start (the
        line ``_spawn`` writes), so a failure does not show an earlier run's lines as its own."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max(64 * 1024, lines * 512)))  # llama.cpp's lines run long
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        found = text.splitlines()
        if this_run:
            starts = [i for i, line in enumerate(found) if line.startswith(START_MARK)]
            found = found[starts[-1] :] if starts else found
        return found[-lines:] if lines > 0 else []  # [-0:] was every line read
