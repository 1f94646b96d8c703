"""``sdk.init()``: the one context ``train.py`` opens; it ties config, logs, checkpoints and preemption together.

Off the cluster it needs nothing: with no ``PODTRAIN_*`` variables set, checkpoints go to ``./.podtrain``.

On a stop signal (SIGTERM from the kubelet; ``PODTRAIN_STOP_SIGNALS``) :meth:`Run.should_stop` turns true.
When the block then ends, the run commits the newest step it was given to :meth:`Run.checkpoint` if that can
finish before the deadline (estimated from the measured duration of earlier saves; a half-written checkpoint
is never loaded, so trying costs nothing but time), says why when it cannot, and exits with 75 so the
orchestrator retries from the checkpoint that stands.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sdk import log as _log
from sdk.checkpoint import Checkpointer, CheckpointInfo
from sdk.config import Config
from sdk.preemption import EXIT_PREEMPTED, Preemption

__all__ = ["EXIT_PREEMPTED", "Run", "init"]

SAVE_ESTIMATE_FACTOR = 1.5  # an emergency save is tried when 1.5x the slowest measured save still fits


class Run:
    """A training run's handle: resume, checkpoint by policy, and notice preemption."""

    def __init__(
        self,
        config: Config,
        checkpointer: Checkpointer,
        preemption: Preemption | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.checkpointer = checkpointer
        self.preemption = preemption or Preemption(config.grace_seconds, signals=config.stop_signals)
        self.log = _log.get_logger("podtrain.run")
        self.last_checkpoint: CheckpointInfo | None = None
        self._clock = clock
        self._last_save_at = clock()
        self._slowest_save: float | None = None
        self._latest: tuple[int, Mapping[str, Any]] | None = None

    def resume(self, state: Mapping[str, Any]) -> int:
        """Load the newest valid checkpoint into ``state``; return its step (0 when there is none)."""
        step = self.checkpointer.load(state)
        if step is None:
            self.log.info("run.fresh_start", checkpoint_uri=self.checkpointer.url)
            return 0
        return step

    def should_stop(self) -> bool:
        """True once a stop signal arrived: break out of the loop; the block's end saves what fits, exits 75."""
        return self.preemption.requested

    def should_checkpoint(self, step: int) -> bool:
        """Whether the policy asks for a checkpoint at ``step``.

        ``PODTRAIN_CHECKPOINT_EVERY_STEPS`` and/or ``PODTRAIN_CHECKPOINT_EVERY_SECONDS`` (either one due is
        enough); with neither set, every call saves.
        """
        every_steps, every_seconds = self.config.checkpoint_every_steps, self.config.checkpoint_every_seconds
        if every_steps is None and every_seconds is None:
            return True
        due_by_steps = every_steps is not None and step % every_steps == 0
        due_by_time = every_seconds is not None and self._clock() - self._last_save_at >= every_seconds
        return due_by_steps or due_by_time

    def checkpoint(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        force: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Save ``state`` as the checkpoint after ``step`` steps when the policy says so (or ``force``).

        Every call also records ``(step, state)`` as what an emergency save on preemption would commit.
        """
        self._latest = (step, state)
        if not (force or self.should_checkpoint(step)):
            return None
        return self._save(step, state, meta)

    def _save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> CheckpointInfo:
        started = self._clock()
        self.last_checkpoint = self.checkpointer.save(step, state, meta=meta)
        took = self._clock() - started
        self._slowest_save = max(took, self._slowest_save or 0.0)
        self._last_save_at = self._clock()
        return self.last_checkpoint

    def finish_preempted(self) -> None:
        """Commit the newest step if it fits before the deadline, log the outcome; the caller exits 75."""
        left = self.preemption.seconds_left() or 0.0
        committed = self.last_checkpoint.step if self.last_checkpoint else None
        if self._latest is None or self._latest[0] == committed:
            self.log.warning("run.preempted", checkpoint=committed, seconds_left=round(left, 3), saved_now=False)
            return
        step, state = self._latest
        estimate = None if self._slowest_save is None else self._slowest_save * SAVE_ESTIMATE_FACTOR
        if estimate is not None and estimate > left:
            self.log.warning(
                "run.preempted",
                saved_now=False,
                checkpoint=committed,
                reason=f"saving step {step} takes ~{estimate:.2f}s, {left:.2f}s left before the deadline",
            )
            return
        info = self._save(step, state, {"emergency": True})
        self.log.warning("run.preempted", saved_now=True, checkpoint=info.step, url=info.url)


@contextmanager
def init(config: Config | None = None, *, preemption: Preemption | None = None, **overrides: Any) -> Iterator[Run]:
    """Open a run: config from ``overrides`` then ``PODTRAIN_*``; logs with run_id/attempt/rank; stop signals.

    Leaving the block after a stop request commits what fits and raises ``SystemExit(75)``.
    """
    config = config or Config.from_env(**overrides)
    _log.configure(
        run_id=config.run_id,
        attempt=config.attempt,
        rank=config.rank,
        fmt=config.log_format,
        level=config.log_level,
    )
    checkpointer = Checkpointer.from_config(config)
    _log.bind(attempt=checkpointer.attempt)
    run = Run(config, checkpointer, preemption)
    run.preemption.install()
    run.log.info("run.start", checkpoint_uri=checkpointer.url, world_size=config.world_size)
    try:
        yield run
        if run.preemption.requested:
            run.finish_preempted()
            raise SystemExit(EXIT_PREEMPTED)
    finally:
        run.preemption.uninstall()
    run.log.info("run.end", last_checkpoint=run.last_checkpoint.url if run.last_checkpoint else None)
