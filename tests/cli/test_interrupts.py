"""Ctrl-C while a command starts (``cli.interrupts``): remembered, not raised."""

from __future__ import annotations

import os
import signal
import time

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
