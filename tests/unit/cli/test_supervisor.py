"""The supervisor's logic with an injected clock, sleep, process table and signal source: no real waiting."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from entrypoint.supervisor import Supervisor, outcome_of, safety_margin

CHILD = 100


class World:
    """A fake clock, process table and signal source; ``sleep`` advances time and fires scheduled events."""

    def __init__(self, *, pid1: bool = False) -> None:
        self.now = 0.0
        self.pid1 = pid1
        self.events: list[tuple[float, Callable[[], None]]] = []
        self.exited: dict[int, int] = {}  # pid -> raw wait status, not yet collected
        self.killpg_calls: list[tuple[int, int]] = []
        self.handlers: dict[int, Any] = {}
        self.spawned: list[Sequence[str]] = []
        self.on_signal: dict[int, Callable[[], None]] = {}  # what the child does when its group gets a signal
        self.waitpid_targets: list[int] = []

    # injected functions
    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for when, fn in [e for e in self.events if e[0] <= self.now]:
            self.events.remove((when, fn))
            fn()

    def spawn(self, argv: Sequence[str], env: Any) -> Any:
        self.spawned.append(argv)
        return SimpleNamespace(pid=CHILD, returncode=None)

    def killpg(self, pgid: int, signum: int) -> None:
        self.killpg_calls.append((pgid, signum))
        if signum == signal.SIGKILL:
            self.exit(CHILD, signal=signal.SIGKILL)
        elif signum in self.on_signal:
            self.on_signal[signum]()

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        assert options == os.WNOHANG
        self.waitpid_targets.append(pid)
        if not self.exited:
            return 0, 0
        if pid == -1:
            found = next(iter(self.exited))
            return found, self.exited.pop(found)
        if pid in self.exited:
            return pid, self.exited.pop(pid)
        return 0, 0

    def getpid(self) -> int:
        return 1 if self.pid1 else 4242

    def install(self, signum: int, handler: Any) -> Any:
        previous = self.handlers.get(signum, signal.SIG_DFL)
        self.handlers[signum] = handler
        return previous

    # helpers
    def exit(self, pid: int, *, code: int = 0, signal: int = 0) -> None:
        self.exited[pid] = signal if signal else code << 8

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self.events.append((when, fn))

    def deliver(self, signum: int) -> None:
        self.handlers[signum](signum, None)

    def supervisor(self, grace: float = 10.0) -> Supervisor:
        return Supervisor(
            ["python", "train.py"],
            grace_seconds=grace,
            clock=self.clock,
            sleep=self.sleep,
            spawn=self.spawn,
            killpg=self.killpg,
            waitpid=self.waitpid,
            getpid=self.getpid,
            install=self.install,
        )


def test_safety_margin_is_min_of_five_seconds_and_a_fifth() -> None:
    """The margin kept before the grace period ends is min(5 s, 20 % of grace)."""
    assert safety_margin(3) == pytest.approx(0.6)
    assert safety_margin(25) == pytest.approx(5.0)
    assert safety_margin(60) == pytest.approx(5.0)


def test_child_exit_zero_is_success() -> None:
    """A child that exits 0 ends the run with exit 0 and outcome succeeded."""
    w = World()
    w.at(1.0, lambda: w.exit(CHILD, code=0))
    result = w.supervisor().run()
    assert result.returncode == 0 and not result.preempted
    assert outcome_of(result).exit_code == 0
    assert w.spawned == [["python", "train.py"]]
    assert result.seconds == pytest.approx(1.0, abs=0.06)


def test_handlers_are_installed_and_restored() -> None:
    """All five forwarded signals get the supervisor's handler during the run and their old one after."""
    w = World()
    seen: dict[int, Any] = {}
    w.at(0.1, lambda: (seen.update(w.handlers), w.exit(CHILD)))
    sup = w.supervisor()
    sup.run()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        assert seen[signum] == sup.handle
        assert w.handlers[signum] == signal.SIG_DFL
    assert signal.SIGCHLD not in seen  # not PID 1: no reaper


def test_sigterm_is_forwarded_and_child_exit_75_is_preempted() -> None:
    """SIGTERM goes to the child's process group; the child's 75 gives 75 preempted."""
    w = World()
    w.on_signal[signal.SIGTERM] = lambda: w.at(w.now + 0.5, lambda: w.exit(CHILD, code=75))
    w.at(2.0, lambda: w.deliver(signal.SIGTERM))
    result = w.supervisor().run()
    assert (CHILD, signal.SIGTERM) in w.killpg_calls
    assert (CHILD, signal.SIGKILL) not in w.killpg_calls
    assert result.preempted and result.exit_by == pytest.approx(12.0, abs=0.06)
    assert outcome_of(result).exit_code == 75


def test_child_ignoring_sigterm_is_killed_at_the_deadline() -> None:
    """With grace 10 s the group is SIGKILLed 8 s after SIGTERM (margin 2 s) and the run is preempted (75)."""
    w = World()
    w.at(1.0, lambda: w.deliver(signal.SIGTERM))
    result = w.supervisor(grace=10.0).run()
    kill_time = result.seconds
    assert w.killpg_calls == [(CHILD, signal.SIGTERM), (CHILD, signal.SIGKILL)]
    assert kill_time == pytest.approx(9.0, abs=0.11)
    assert result.killed_by_us and result.returncode == -signal.SIGKILL
    outcome = outcome_of(result)
    assert outcome.exit_code == 75 and "deadline" in outcome.message


def test_second_sigterm_does_not_move_the_deadline() -> None:
    """The deadline counts from the first SIGTERM; later ones are only forwarded."""
    w = World()
    w.at(1.0, lambda: w.deliver(signal.SIGTERM))
    w.at(5.0, lambda: w.deliver(signal.SIGTERM))
    result = w.supervisor(grace=10.0).run()
    assert result.seconds == pytest.approx(9.0, abs=0.11)
    assert w.killpg_calls.count((CHILD, signal.SIGTERM)) == 2


def test_other_signals_are_forwarded_without_a_deadline() -> None:
    """SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 reach the group; none of them starts the deadline."""
    w = World()
    for i, signum in enumerate((signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)):
        w.at(1.0 + i, lambda s=signum: w.deliver(s))
    w.at(20.0, lambda: w.exit(CHILD, code=0))
    result = w.supervisor(grace=3.0).run()
    assert [s for _, s in w.killpg_calls] == [signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2]
    assert not result.preempted and outcome_of(result).exit_code == 0


def test_sigterm_before_the_child_starts_is_preempted_without_running_it() -> None:
    """A SIGTERM that lands before the child exists: no child, exit 75."""
    w = World()
    sup = w.supervisor()

    def spawn_after_sigterm(argv: Sequence[str], env: Any) -> Any:
        raise AssertionError("the child must not start")

    original_install = w.install

    def install(signum: int, handler: Any) -> Any:
        previous = original_install(signum, handler)
        if signum == signal.SIGUSR2 and handler == sup.handle:  # the last one installed
            handler(signal.SIGTERM, None)
        return previous

    sup._install = install
    sup._spawn = spawn_after_sigterm
    result = sup.run()
    assert result.returncode is None and result.preempted
    assert outcome_of(result).exit_code == 75


def test_a_sigterm_recorded_before_the_supervisor_ran_is_replayed_with_its_arrival_time() -> None:
    """A SIGTERM caught by the early handler (during imports) ends in 75, no child, deadline from its arrival."""
    w = World()
    w.now = 5.0
    sup = Supervisor(
        ["python", "train.py"],
        grace_seconds=10.0,
        clock=w.clock,
        sleep=w.sleep,
        spawn=lambda argv, env: pytest.fail("the child must not start"),
        killpg=w.killpg,
        waitpid=w.waitpid,
        getpid=w.getpid,
        install=w.install,
        early=[(signal.SIGUSR1, 3.5), (signal.SIGTERM, 4.0)],
    )
    result = sup.run()
    assert result.preempted and outcome_of(result).exit_code == 75
    assert sup.arrival == 4.0 and sup.deadline == pytest.approx(4.0 + 10.0 - 2.0)
    assert sup._pending == [signal.SIGUSR1, signal.SIGTERM]


def test_unknown_signal_death_is_failure_named() -> None:
    """A child killed by a signal podtrain did not send (OOM's SIGKILL) is exit 1, named in the message."""
    w = World()
    w.at(0.5, lambda: w.exit(CHILD, signal=signal.SIGKILL))
    outcome = outcome_of(w.supervisor().run())
    assert outcome.exit_code == 1 and "SIGKILL" in outcome.message


def test_command_that_cannot_start_is_a_usage_error() -> None:
    """A command that does not exist is exit 2 with the reason."""
    w = World()
    sup = w.supervisor()

    def missing(argv: Sequence[str], env: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    sup._spawn = missing
    outcome = outcome_of(sup.run())
    assert outcome.exit_code == 2 and "No such file" in outcome.message


def test_pid1_reaps_orphans_and_takes_the_childs_status_from_the_loop() -> None:
    """As PID 1, waitpid(-1) collects orphans on SIGCHLD and the child's own status is kept."""
    w = World(pid1=True)
    w.at(0.2, lambda: (w.exit(555, code=0), w.exit(556, signal=signal.SIGTERM), w.deliver(signal.SIGCHLD)))
    w.at(1.0, lambda: (w.exit(CHILD, code=3), w.exit(557, code=0), w.deliver(signal.SIGCHLD)))
    result = w.supervisor().run()
    assert sorted(result.reaped) == [555, 556, 557]
    assert result.returncode == 3 and outcome_of(result).exit_code == 1
    assert set(w.waitpid_targets) == {-1}
    assert signal.SIGCHLD in w.handlers


def test_not_pid1_waits_only_for_its_own_child() -> None:
    """Not PID 1: only waitpid(child) is called, so no one else's children are stolen."""
    w = World()
    w.at(0.3, lambda: w.exit(CHILD, code=0))
    w.supervisor().run()
    assert set(w.waitpid_targets) == {CHILD}


def test_empty_command_is_refused() -> None:
    """A supervisor needs a command."""
    with pytest.raises(ValueError, match="no command"):
        Supervisor([], grace_seconds=1.0)


def test_a_success_whose_outputs_were_not_pushed_is_69_and_says_so() -> None:
    """Unpushed outputs turn a success into 69 (the retry pushes); a failure keeps its own code."""
    from entrypoint.supervisor import SupervisorResult

    outcome = outcome_of(SupervisorResult(returncode=0), push_problem="outputs not pushed: bucket missing")
    assert outcome.exit_code == 69 and "outputs not pushed: bucket missing" in outcome.message
    assert "retry" in outcome.message
    assert outcome_of(SupervisorResult(returncode=3), push_problem="outputs not pushed: x").exit_code == 1
