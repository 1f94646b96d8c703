"""Preemption: a stop signal becomes a stop request with a deadline inside the grace period."""

from __future__ import annotations

import os
import signal

import pytest

from sdk.lifecycle.preemption import Preemption, parse_signals, safety_margin


class Clock:
    """A hand-moved clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadline_leaves_the_supervisor_its_margin_and_one_more() -> None:
    """grace 30 s: margin 5 s, so the training process must be done 20 s after the signal."""
    clock = Clock()
    stop = Preemption(30, clock=clock)
    assert not stop.requested and stop.seconds_left() is None
    stop.request(signal.SIGTERM)
    assert stop.requested and stop.signum == signal.SIGTERM
    assert stop.seconds_left() == pytest.approx(20.0)
    clock.now += 7
    assert stop.seconds_left() == pytest.approx(13.0)


def test_a_second_signal_does_not_move_the_deadline() -> None:
    """Only the first request sets the deadline: a repeated SIGTERM cannot buy time."""
    clock = Clock()
    stop = Preemption(10, clock=clock)
    stop.request()
    clock.now += 3
    stop.request(signal.SIGINT)
    assert stop.signum == signal.SIGTERM
    assert stop.seconds_left() == pytest.approx(10 - 2 * safety_margin(10) - 3)


def test_a_real_signal_reaches_the_installed_handler_and_uninstall_restores() -> None:
    """SIGUSR1 sent to this process is recorded; afterwards the previous handler is back."""
    before = signal.getsignal(signal.SIGUSR1)
    stop = Preemption(30, signals=["SIGUSR1"]).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_signal_names_parse_with_or_without_sig_and_unknown_ones_are_named() -> None:
    """'TERM, sigusr1' parses; 'SIGNOPE' raises naming it."""
    assert parse_signals("TERM, sigusr1") == (signal.SIGTERM, signal.SIGUSR1)
    with pytest.raises(ValueError, match="SIGNOPE"):
        parse_signals("SIGTERM,SIGNOPE")


def test_margin_is_five_seconds_or_a_fifth_of_a_short_grace() -> None:
    """min(5 s, 20 % of grace)."""
    assert safety_margin(60) == 5.0
    assert safety_margin(10) == pytest.approx(2.0)


@pytest.mark.parametrize("names", ["SIGTERM,SIGKILL", "STOP", "kill"])
def test_signals_that_cannot_be_caught_are_refused(names: str) -> None:
    """A handler for SIGKILL or SIGSTOP cannot be installed: naming one is an error, not a crash at start."""
    with pytest.raises(ValueError, match="cannot be caught"):
        parse_signals(names)
