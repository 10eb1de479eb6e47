"""Ctrl-C while a command starts (``cli.interrupts``): remembered, not raised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from car_inference.cli.interrupts import EXIT_INTERRUPTED, Interrupts


def test_a_ctrl_c_while_starting_is_remembered_not_raised() -> None:
    """Raised, it could land in a weakref callback and be dropped; remembered, the next step acts
    on it (exit 130), and the previous handler is back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    assert before is signal.default_int_handler
    with Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode; nothing is raised here
        assert interrupts.seen
        with pytest.raises(SystemExit) as stopped:
            interrupts.check()
        assert stopped.value.code == EXIT_INTERRUPTED == 130
    assert signal.getsignal(signal.SIGINT) is before


def test_nothing_seen_means_nothing_happens() -> None:
    with Interrupts() as interrupts:
        interrupts.check()
    assert not interrupts.seen


def test_a_handler_of_the_program_s_own_is_left_alone() -> None:
    """Only Python's default handler is replaced: a program that installed its own keeps it."""
    calls: list[int] = []

    def own(signum: int, frame: object) -> None:
        calls.append(signum)

    before = signal.signal(signal.SIGINT, own)
    try:
        with Interrupts() as interrupts:
            assert signal.getsignal(signal.SIGINT) is own
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert calls == [signal.SIGINT] and not interrupts.seen
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_while_the_first_is_acted_on_leaves_at_once(isolated_home: Path) -> None:
    """The exit after a Ctrl-C waits for the model's worker, inside llama.cpp for up to seconds: a
    second Ctrl-C then printed a threading traceback ("Exception ignored ... _shutdown") and often
    ended in a segfault (10 of 14 runs), or killed the process by the signal (status -2)."""
    import pty

    for gap_s in (0.0, 0.02):
        screen, terminal = pty.openpty()  # a terminal: the answer is printed as it comes
        child = subprocess.Popen(
            [sys.executable, "-m", "car_inference", "generate", "Tell me a very long story about dragons",
             "-m", "smollm2", "-n", "4000"],
            stdout=terminal, stderr=subprocess.PIPE, env={**os.environ, "CAR_HOME": str(isolated_home)},
        )  # fmt: skip
        os.close(terminal)
        try:
            seen = b""
            while len(seen) < 40:  # the answer is coming: the model's worker is busy
                seen += os.read(screen, 1024)
            child.send_signal(signal.SIGINT)
            time.sleep(gap_s)
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=30)
        finally:
            child.kill()
            os.close(screen)
        text = err.decode(errors="replace")
        assert child.returncode == EXIT_INTERRUPTED, (child.returncode, text)
        assert "Traceback" not in text and "Exception ignored" not in text, text
