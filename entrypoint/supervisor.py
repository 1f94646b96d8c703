"""The child process of ``podtrain run``: its own process group, forwarded signals, the deadline, reaping.

The child (the user's command) runs in a new session, so it leads its own process group; every signal the
pod gets (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) is passed on to that whole group, so ``torchrun`` and
its workers, or a shell and what it started, all hear it.

The supervisor owns the deadline. The first SIGTERM's arrival starts the grace period
(``PODTRAIN_GRACE_SECONDS``, equal to the pod's ``terminationGracePeriodSeconds``); at
``arrival + grace - margin``, with ``margin = min(5 s, 20 % of grace)``, the child's group is SIGKILLed, so the
supervisor still has ``margin`` seconds to read the newest checkpoint, write the termination message and exit
before the kubelet's own SIGKILL.

The child never outlives the supervisor, even a SIGKILLed one: the kernel SIGKILLs it when the supervisor's thread
that started it ends (``PR_SET_PDEATHSIG``, Linux), and a watchdog SIGKILLs its process group when the supervisor
dies without releasing it (:mod:`entrypoint._lifeline`). At a normal end, what the child left running in its group
is left alone (as PID 1 of a pod, the container's end takes it).

As PID 1 (no tini in front) the supervisor also reaps orphans re-parented to it: on SIGCHLD, and on every poll,
``waitpid(-1, WNOHANG)`` until nothing is left; the child's own status is taken from that loop.

Clock, sleep, process creation, ``killpg``, ``waitpid``, ``getpid`` and the signal source are injected, so the
logic is unit-tested without sleeping or real signals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from entrypoint._lifeline import Lifeline, parent_death_signal
from entrypoint.termination import Outcome, classify
from sdk.lifecycle.preemption import safety_margin
from sdk.outcomes import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, EXIT_UNAVAILABLE

__all__ = ["FORWARDED", "Supervisor", "SupervisorResult", "outcome_of", "safety_margin"]

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
POLL_SECONDS = 0.05


def _spawn(argv: Sequence[str], env: Mapping[str, str] | None) -> Any:
    """The child, in its own session, dying with this process; its group guarded by a watchdog (:mod:`._lifeline`)."""
    proc = subprocess.Popen(
        list(argv),
        env=None if env is None else dict(env),
        start_new_session=True,
        preexec_fn=parent_death_signal(),  # noqa: PLW1509 - only a prctl call between fork and exec
    )
    proc.lifeline = Lifeline(proc.pid)  # type: ignore[attr-defined]
    return proc


@dataclass
class SupervisorResult:
    """How the child ended. ``returncode`` is ``-N`` for signal N, ``None`` when it never ran."""

    returncode: int | None
    preempted: bool = False
    killed_by_us: bool = False
    forwarded: frozenset[int] = frozenset()
    start_error: str | None = None
    seconds: float = 0.0
    exit_by: float | None = None  # clock time by which the supervisor must have exited (arrival + grace)
    reaped: list[int] = field(default_factory=list)  # orphans reaped as PID 1


def outcome_of(
    result: SupervisorResult, *, completed: bool | None = None, stopped: str | None = None, push_problem: str = ""
) -> Outcome:
    """The exit code and sentence for ``result`` (see :func:`entrypoint.termination.classify`).

    ``completed``, ``stopped``: the child's report (:mod:`sdk.lifecycle.childreport`). ``push_problem``: why
    the outputs
    were not pushed, if so; a success then becomes 69, so the retry resumes at the final checkpoint and pushes.
    """
    if result.returncode is None:
        if result.preempted:
            return Outcome(EXIT_PREEMPTED, "preempted: SIGTERM arrived before the child started")
        return Outcome(EXIT_CONFIG, f"the command could not be started: {result.start_error}")
    outcome = classify(
        result.returncode,
        preempted=result.preempted,
        killed_by_us=result.killed_by_us,
        forwarded=result.forwarded,
        completed=completed,
        stopped=stopped,
    )
    if outcome.exit_code == EXIT_OK and push_problem:
        return Outcome(
            EXIT_UNAVAILABLE,
            f"{outcome.message}, but {push_problem}; a retry resumes at the final checkpoint and pushes them",
        )
    return outcome


class Supervisor:
    """Run ``argv`` as a child in its own process group until it exits; see the module docstring."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        grace_seconds: float,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        spawn: Callable[[Sequence[str], Mapping[str, str] | None], Any] = _spawn,
        killpg: Callable[[int, int], None] = os.killpg,
        waitpid: Callable[[int, int], tuple[int, int]] = os.waitpid,
        getpid: Callable[[], int] = os.getpid,
        install: Callable[[int, Any], Any] = signal.signal,
        poll_seconds: float = POLL_SECONDS,
        log: Any = None,
        early: Sequence[tuple[int, float]] = (),
    ) -> None:
        if not argv:
            raise ValueError("no command to run")
        self.argv = list(argv)
        self.grace = grace_seconds
        self.margin = safety_margin(grace_seconds)
        self.env = env
        self._clock, self._sleep, self._spawn = clock, sleep, spawn
        self._killpg, self._waitpid, self._getpid, self._install = killpg, waitpid, getpid, install
        self.poll_seconds = poll_seconds
        self._log = log
        self.pid: int | None = None
        self.status: int | None = None
        self.arrival: float | None = None
        self.deadline: float | None = None
        self.killed = False
        self.forwarded: set[int] = set()
        self.reaped: list[int] = []
        self._pending: list[int] = []  # signals that came before the child existed
        self._events: list[tuple[str, dict[str, Any]]] = []  # logged from the loop, never inside a handler
        self._proc: Any = None
        self._early = early  # (signum, arrival) recorded before this supervisor's handlers were installed

    @property
    def is_pid1(self) -> bool:
        return self._getpid() == 1

    # -- signals -----------------------------------------------------------------------------------------
    def handle(self, signum: int, frame: object = None, *, at: float | None = None) -> None:
        """The signal handler: record SIGTERM's arrival (the deadline), forward to the child's group.

        ``at``: when a signal recorded earlier (:mod:`entrypoint.early`) really arrived.
        """
        if signum == signal.SIGCHLD:
            if self.is_pid1:
                self.reap()
            return
        if signum == signal.SIGTERM and self.arrival is None:
            self.arrival = self._clock() if at is None else at
            self.deadline = self.arrival + self.grace - self.margin
            self._events.append(("supervisor.sigterm", {"deadline_in": round(self.grace - self.margin, 3)}))
        if self.pid is None:
            self._pending.append(signum)
            return
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        if self.pid is None or self.status is not None:
            return
        try:
            self._killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            return  # the group is gone already
        self.forwarded.add(signum)
        self._events.append(("supervisor.forwarded", {"signal": signal.Signals(signum).name, "pgid": self.pid}))

    # -- reaping -----------------------------------------------------------------------------------------
    def reap(self) -> None:
        """Collect exited children without blocking: every child as PID 1 (orphans too), else only ours."""
        if self.pid is None:
            return
        target = -1 if self.is_pid1 else self.pid
        while True:
            try:
                pid, status = self._waitpid(target, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid:
                self.status = os.waitstatus_to_exitcode(status)
                if self._proc is not None and hasattr(self._proc, "returncode"):
                    self._proc.returncode = self.status  # so Popen never waits for it again
            else:
                self.reaped.append(pid)
            if target != -1:
                return

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> SupervisorResult:
        """Start the child, forward signals, enforce the deadline; return once the child is gone."""
        start = self._clock()
        signals = list(FORWARDED) + ([signal.SIGCHLD] if self.is_pid1 else [])
        previous = {signum: self._install(signum, self.handle) for signum in signals}
        for signum, at in list(self._early):  # replayed after ours are in, so nothing falls between
            self.handle(signum, at=at)
        try:
            return self._run(start)
        finally:
            for signum, handler in previous.items():
                self._install(signum, handler if handler is not None else signal.SIG_DFL)
            self._flush()

    def _run(self, start: float) -> SupervisorResult:
        if self.arrival is not None:
            return self._result(start, None)
        try:
            self._proc = self._spawn(self.argv, self.env)
        except OSError as exc:
            return self._result(start, None, start_error=f"{self.argv[0]}: {exc.strerror or exc}")
        self.pid = int(self._proc.pid)
        self._events.append(("supervisor.started", {"pid": self.pid, "argv": self.argv}))
        for signum in self._pending:
            self._forward(signum)
        self._pending.clear()
        while True:
            self.reap()
            self._flush()
            if self.status is not None:
                break
            now = self._clock()
            if self.deadline is not None and now >= self.deadline:
                if not self.killed:
                    self.killed = True
                    self._events.append(("supervisor.deadline", {"action": "SIGKILL", "pgid": self.pid}))
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        self._killpg(self.pid, signal.SIGKILL)
                elif self.arrival is not None and now >= self.arrival + self.grace - self.margin / 2:
                    # SIGKILLed but still not reaped (stuck in the kernel): exit anyway, in time.
                    self._events.append(("supervisor.unreaped", {"pid": self.pid}))
                    self.status = -signal.SIGKILL
                    break
            self._sleep(self.poll_seconds)
        lifeline = getattr(self._proc, "lifeline", None)
        if lifeline is not None:  # a normal end: the watchdog must not kill what the child left in its group
            lifeline.release()
        if self.is_pid1:
            self.reap_orphans()
        return self._result(start, self.status)

    def reap_orphans(self) -> None:
        """As PID 1: collect whatever else has exited by now (never blocks)."""
        try:
            while True:
                pid, _ = self._waitpid(-1, os.WNOHANG)
                if pid == 0:
                    return
                if pid != self.pid:
                    self.reaped.append(pid)
        except ChildProcessError:
            return

    def _result(self, start: float, returncode: int | None, start_error: str | None = None) -> SupervisorResult:
        # A child killed at our deadline counts as killed by us only if it died of that SIGKILL.
        killed_by_us = self.killed and returncode == -signal.SIGKILL
        return SupervisorResult(
            returncode=returncode,
            preempted=self.arrival is not None,
            killed_by_us=killed_by_us,
            forwarded=frozenset(self.forwarded),
            start_error=start_error,
            seconds=self._clock() - start,
            exit_by=None if self.arrival is None else self.arrival + self.grace,
            reaped=list(self.reaped),
        )

    def _flush(self) -> None:
        if self._log is None:
            self._events.clear()
            return
        while self._events:
            event, fields = self._events.pop(0)
            self._log.info(event, **fields)
