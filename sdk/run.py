"""``sdk.init()``: the one context ``train.py`` opens; it ties config, logs and checkpoints together.

Off the cluster it needs nothing: with no ``PODTRAIN_*`` variables set, checkpoints go to ``./.podtrain``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sdk import log as _log
from sdk.checkpoint import Checkpointer, CheckpointInfo
from sdk.config import Config

__all__ = ["Run", "init"]


class Run:
    """A training run's handle: resume from the newest valid checkpoint, checkpoint by policy."""

    def __init__(self, config: Config, checkpointer: Checkpointer) -> None:
        self.config = config
        self.checkpointer = checkpointer
        self.log = _log.get_logger("podtrain.run")
        self.last_checkpoint: CheckpointInfo | None = None

    def resume(self, state: Mapping[str, Any]) -> int:
        """Load the newest valid checkpoint into ``state``; return its step (0 when there is none)."""
        step = self.checkpointer.load(state)
        if step is None:
            self.log.info("run.fresh_start", checkpoint_uri=self.checkpointer.url)
            return 0
        return step

    def should_checkpoint(self, step: int) -> bool:
        """Whether the policy (``PODTRAIN_CHECKPOINT_EVERY_STEPS``) asks for a checkpoint at ``step``."""
        every = self.config.checkpoint_every_steps
        return every is None or step % every == 0

    def checkpoint(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        force: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Save ``state`` as the checkpoint after ``step`` steps when the policy says so (or ``force``)."""
        if not (force or self.should_checkpoint(step)):
            return None
        self.last_checkpoint = self.checkpointer.save(step, state, meta=meta)
        return self.last_checkpoint


@contextmanager
def init(config: Config | None = None, **overrides: Any) -> Iterator[Run]:
    """Open a run: config from ``overrides`` then ``PODTRAIN_*``; logs set up with run_id/attempt/rank."""
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
    run = Run(config, checkpointer)
    run.log.info("run.start", checkpoint_uri=checkpointer.url, world_size=config.world_size)
    yield run
    run.log.info("run.end", last_checkpoint=run.last_checkpoint.url if run.last_checkpoint else None)
