"""Helpers for your own tests of ``train.py``: a run on a temporary store, and a preemption at a chosen step.

A test of a training loop wants to know what a pod's SIGTERM would do to it: is the step it stopped at
committed, and does the next attempt resume from it, bit for bit? These helpers answer that in a pytest test,
on one machine, without sending a signal and without touching any real bucket::

    import pytest
    from sdk import testing

    def test_resumes_where_it_was_preempted(tmp_path):
        with pytest.raises(SystemExit) as stopped, testing.init(tmp_path, preempt_at=5) as run:
            train(run, steps=10)                 # your loop: it takes the run sdk.init() gave it
        assert stopped.value.code == testing.EXIT_PREEMPTED
        assert testing.committed_steps(run)[-1] == 5
        with testing.init(tmp_path) as run:      # the next attempt: same store, resumes at step 5
            train(run, steps=10)

* :func:`init` is ``sdk.init()`` itself, with every location under one folder, the ``PODTRAIN_*`` environment
  ignored, and a :class:`SimulatedPreemption` in place of the signal handlers.
* :class:`SimulatedPreemption` turns into a stop request when the loop reaches a step; the run then ends as on
  a real SIGTERM: the emergency checkpoint, then ``SystemExit(75)`` out of the ``with`` block.
* :func:`committed_steps`, :func:`metrics` and :func:`capture_logs` read back what the run did.

Importing this module does not import torch; opening a run does, as ``sdk.init()`` does.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from sdk.config import Config
from sdk.lifecycle.preemption import Preemption
from sdk.outcomes import EXIT_PREEMPTED

if TYPE_CHECKING:
    from sdk.run import Run

__all__ = ["EXIT_PREEMPTED", "SimulatedPreemption", "capture_logs", "committed_steps", "init", "metrics"]

STEP_METHODS = ("checkpoint", "should_checkpoint", "log_metrics")  # the Run calls that tell which step the loop is at
_captures: list[list[dict[str, Any]]] = []  # the lists of the capture_logs() blocks now open


class SimulatedPreemption(Preemption):
    """A :class:`~sdk.lifecycle.preemption.Preemption` that no signal drives: it is requested when the training
    loop reaches ``at_step`` (or when the test calls :meth:`request`).

    It installs no signal handler, so a real SIGTERM or Ctrl-C during a test does what it would do without
    podtrain, and a test on any thread can use it. Its clock stands still: the grace period never runs out
    during a test, so the emergency checkpoint is always tried (unless the newest step is already committed),
    and ``sdk.init()`` always ends the block with ``SystemExit(75)`` — never with the immediate ``os._exit``
    it uses when a real deadline is close, which would end the test process.

    The loop's step is learned from the calls a loop makes anyway, once :meth:`watch` is given the run
    (:func:`init` does it): ``run.checkpoint(step, …)``, ``run.should_checkpoint(step)`` and
    ``run.log_metrics(step, …)``. The first step at or past ``at_step`` requests the stop (the call itself does
    its work as usual); the loop's next ``run.should_stop()`` is then True, as after a SIGTERM during that step.
    """

    def __init__(self, at_step: int | None = None, *, grace_seconds: float = 30.0) -> None:
        super().__init__(grace_seconds, clock=lambda: 0.0)
        from sdk.run import TEARDOWN_RESERVE

        left = _allowance(grace_seconds)
        if left < TEARDOWN_RESERVE:
            raise ValueError(
                f"grace_seconds={grace_seconds:g} leaves {left:.2f} s before the deadline, under the "
                f"{TEARDOWN_RESERVE:g} s sdk.init() needs to exit with SystemExit rather than os._exit (which "
                "would end the test process): use a longer grace (the default, 30, leaves 20 s)"
            )
        if at_step is not None and at_step < 0:
            raise ValueError(f"at_step={at_step} is negative: name the step the loop should be stopped at")
        self.at_step = at_step
        self.stopped_at: int | None = None  # the step the loop had reached when the stop was requested

    def reached(self, step: int) -> None:
        """The loop reached ``step``: request the stop when it is ``at_step`` or later.

        :meth:`watch` calls this; call it yourself from a loop that makes none of the calls it watches.
        """
        if self.at_step is not None and step >= self.at_step and not self.requested:
            self.stopped_at = step
            self.request(signal.SIGTERM)

    def watch(self, run: Run) -> Run:
        """Learn the loop's step from ``run``'s step calls (for a run opened with ``sdk.init(preemption=self)``).

        Wraps those methods on this one ``Run`` object; what they do and return is unchanged.
        """
        for name in STEP_METHODS:
            setattr(run, name, self._reporting(getattr(run, name)))
        return run

    def _reporting(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            self.reached(kwargs["step"] if "step" in kwargs else args[0])
            return result

        return call

    def install(self) -> SimulatedPreemption:
        """Install no handler. ``sdk.init()`` calls this once it has set up its logs: :func:`capture_logs` hooks
        in here, so that it sees the run's events although ``sdk.init()`` configures structlog anew."""
        _hook_capture()
        return self

    def uninstall(self) -> None:
        """Nothing to put back: no handler was installed."""


def _allowance(grace_seconds: float) -> float:
    """The seconds a stopped run may use before its deadline (``Preemption``'s deadline, measured from 0)."""
    probe = Preemption(grace_seconds, clock=lambda: 0.0)
    probe.request()
    return probe.seconds_left() or 0.0


@contextmanager
def init(root: str | os.PathLike[str], *, preempt_at: int | None = None, **overrides: Any) -> Iterator[Run]:
    """``sdk.init()`` for a test: the store, outputs and data under ``root``; no environment; no signal handlers.

    ``root`` (pytest's ``tmp_path``, say) holds ``checkpoints/``, ``artifacts/``, ``output/``, ``data/`` and
    ``termination-log``. Runs opened on the same ``root`` share the store, so the second resumes from the
    first, with the next attempt number, as a retried pod does. ``overrides`` are :class:`~sdk.config.Config`
    fields (``checkpoint_every_steps=2``, ``checkpoint_mode="sync"``, ``data_uri=…``, even ``checkpoint_uri``
    for a test against an S3 server); the run id is ``"test"`` unless given.

    ``PODTRAIN_*``, ``RANK`` and ``WORLD_SIZE`` are not read: a developer's shell, or a CI job that runs the
    tests inside a pod, may point them at a real run's bucket, and a test run there would claim an attempt
    (fencing the real one), prune its checkpoints and write to its supervisor's report. Pass what the test
    needs as ``overrides`` instead.

    ``preempt_at``: the step at which a :class:`SimulatedPreemption` requests the stop; with None it never
    does by itself (``run.preemption.request()`` still can). Leaving the block then behaves as after a SIGTERM:
    the newest step is committed and ``SystemExit(75)`` is raised. The structlog configuration is put back as
    it was when the block ends (``sdk.init()`` replaces it). Not for two runs at once: logs are process-wide.
    """
    from sdk.run import init as sdk_init

    folder = Path(root)
    locations = {
        "checkpoint_uri": str(folder / "checkpoints"),
        "artifact_uri": str(folder / "artifacts"),
        "output_dir": str(folder / "output"),
        "data_dir": str(folder / "data"),
        "termination_log": str(folder / "termination-log"),
    }
    config = Config(**{"run_id": "test", **locations, **overrides})
    preemption = SimulatedPreemption(preempt_at, grace_seconds=config.grace_seconds)
    was_configured, previous = structlog.is_configured(), structlog.get_config()
    try:
        with sdk_init(config, preemption=preemption) as run:
            yield preemption.watch(run)
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


def committed_steps(run: Run) -> list[int]:
    """The steps of ``run``'s store's committed, verified checkpoints, oldest first (what a resume chooses from:
    the last one). ``run.checkpointer.list()`` has their manifests, e.g. ``meta["emergency"]``."""
    return sorted(info.step for info in run.checkpointer.list())


def metrics(run: Run) -> list[dict[str, Any]]:
    """The records ``run.log_metrics()`` wrote to this rank's ``metrics.jsonl``, in order (empty when none)."""
    rank = run.config.rank
    path = Path(run.config.output_dir) / ("metrics.jsonl" if rank == 0 else f"metrics-rank{rank}.jsonl")
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """Collect podtrain's log events of the runs :func:`init` opens inside the block, as dicts.

    ``structlog.testing.capture_logs()`` does not see them: ``sdk.init()`` configures structlog when the run
    opens, which replaces the capture. Each event here is the dict a log line is rendered from (``event``,
    ``logger_name``, ``run_id``, ``attempt``, ``level``, the event's fields; secrets already masked); the lines
    are still written as usual. A run opened with ``sdk.init(preemption=SimulatedPreemption(...))`` is seen too.
    """
    entries: list[dict[str, Any]] = []
    _captures.append(entries)
    try:
        yield entries
    finally:
        _captures.remove(entries)


def _record(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The structlog processor of :func:`capture_logs`: a copy of each event to every open capture."""
    for entries in _captures:
        entries.append(dict(event))
    return event


def _hook_capture() -> None:
    """Put :func:`_record` just before the renderer (the last processor) of structlog's current configuration."""
    processors = list(structlog.get_config()["processors"])
    if _record not in processors:
        structlog.configure(processors=[*processors[:-1], _record, *processors[-1:]])
