"""PyTorch Lightning's ``Trainer`` under podtrain: verified checkpoints, exact resume, agreed preemption.

    import lightning as L
    import sdk
    from sdk.integrations import lightning as podtrain_pl

    with sdk.init() as run:
        trainer = L.Trainer(max_steps=1000, ...)                  # the user's own Trainer
        podtrain_pl.fit(run, trainer, model, datamodule=dm)      # resumes, trains, stops on SIGTERM

What :func:`fit` changes, on this one Trainer and for the duration of the call only:

* **Where checkpoints go.** A callback (:class:`_Callback`, a Lightning ``Checkpoint``, so it runs after the user's
  ``ModelCheckpoint``) gives the state to ``run.checkpoint()`` at the end of a training batch that stepped the
  optimizer — where ``ModelCheckpoint(every_n_train_steps=…)`` saves: committed manifest, CRC32C, fencing,
  retention, asynchronous. Not through Lightning's ``CheckpointIO``, which its sharded strategies bypass: the
  ``LightningModule`` and the optimizers are podtrain entries (sharded with several ranks), the rest is Lightning's
  own checkpoint dict (:mod:`sdk.integrations._plstate`). *When*: the user's ``ModelCheckpoint`` cadence
  (``every_n_train_steps``, or ``every_n_epochs`` at an epoch's last batch); with
  ``PODTRAIN_CHECKPOINT_EVERY_STEPS``/``_SECONDS`` set, podtrain's policy too (either one due saves); with
  neither, podtrain's default (every step, asynchronous; a save still in flight defers the next). The user's
  ``ModelCheckpoint`` keeps writing its own ``.ckpt`` files; podtrain never reads them.
* **Where a resume comes from.** At ``on_fit_start`` — once the strategy has built the optimizers and wrapped the
  model, where Lightning itself restores a checkpoint's training state — ``run.resume()`` loads the newest
  *verified* podtrain checkpoint (damaged and uncommitted ones skipped), then Lightning's restore methods put the
  loops, schedulers, scaler and callbacks back. ``ckpt_path`` and everything that makes Lightning pick a checkpoint
  itself (``"last"``, ``OnExceptionCheckpoint``, ``trainer.ckpt_path``) are refused.
* **The data position.** The training DataLoader (after Lightning put in its ``DistributedSampler``) is wrapped in
  a :class:`~sdk.data.loader.ResumableLoader`, whose position Lightning saves with its fit loop: a resumed epoch
  has the same order and skips the consumed batches without loading them.
* **How it stops.** Lightning's own SIGTERM handler is not installed (it broadcasts from inside the signal handler
  and deadlocks DDP ranks, lightning#20806); podtrain's stays. The callback asks ``run.should_stop()`` after every
  optimizer step (agreed across ranks: every rank stops at the same step), and on a stop checkpoints that step and
  sets ``trainer.should_stop`` — Lightning ends the fit its own way, skipping the validation it would run for an
  early stop and any ``min_steps``/``min_epochs`` not yet met. Leaving ``with sdk.init()`` then waits for the commit
  (within the grace period) and exits 75.

When training completes, rank 0 exports the model (``run.export``): ``PODTRAIN_OUTPUT_DIR/export/model.safetensors``
with its hyperparameters (``hparams.yaml``, as Lightning writes them, and in ``model.json``).

**Exactness.** On CPU a resumed run ends bitwise equal to an uninterrupted one — and to Lightning alone — with
``max_steps`` or ``max_epochs``, gradient accumulation, and validation during training, with one exception that is
Lightning's: a save at an epoch's last batch, followed by that epoch's validation, resumes *after* the validation
(Lightning's restart logic does not run it again), so when the validation DataLoader draws its iterator's seed from
the global torch RNG (it has no ``generator=``), the resumed run's RNG stream is one draw behind. Give validation
DataLoaders a ``generator`` of their own and that case is exact too. Several ranks resume on the same number of
ranks only (the data position is per rank; another ``WORLD_SIZE`` is refused with the one to use).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from sdk import log as _log
from sdk.errors import ConfigError
from sdk.integrations._plstate import TrainerEntry, entries, resumable
from sdk.run import Run

__all__ = ["Fitted", "fit"]

_SEAMS = (  # the private Lightning members this module relies on, checked before anything runs
    ("_checkpoint_connector", "_get_loops_state_dict"),
    ("_checkpoint_connector", "restore_loops"),
    ("_signal_connector", "register_signal_handlers"),
    ("fit_loop", "epoch_loop"),
)


@dataclasses.dataclass(frozen=True)
class Fitted:
    """How :func:`fit` ended: the global step it resumed from and reached, and whether a stop request ended it."""

    start: int
    step: int
    stopped: bool


def fit(
    run: Run,
    trainer: pl.Trainer,
    model: pl.LightningModule,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    *,
    datamodule: pl.LightningDataModule | None = None,
    ckpt_path: Any = None,
    export: bool = True,
) -> Fitted:
    """``trainer.fit(model, …)`` resumed from the newest verified checkpoint of ``run``, checkpointed by podtrain.

    On a stop signal every rank stops after the same optimizer step, that step is checkpointed, and this returns
    (``stopped``); leaving ``with sdk.init()`` then exits 75. When training completes and ``export`` is true, rank
    0 exports the model. ``ckpt_path`` exists only to be refused with the reason: podtrain decides what to resume.
    """
    _refuse(run, trainer, ckpt_path=ckpt_path)
    callback = _Callback(run)
    with _routed(trainer, callback):
        trainer.fit(model, train_dataloaders, val_dataloaders, datamodule)
    step = trainer.global_step
    if callback.state is not None and step > callback.start and callback.given != step:
        # Lightning ended at a step that was no save point (max_steps between two cadence steps, an early stop):
        # give it to podtrain, so the end of the block commits this step and never the state under an older number.
        run.checkpoint(step, callback.state, force=callback.stopping)
    if not callback.stopping and export and run.config.rank == 0:
        _export(run, model, step=step)
    return Fitted(start=callback.start, step=step, stopped=callback.stopping)


class _Callback(Checkpoint):
    """Resumes at ``on_fit_start``; at each optimizer step's batch end, decides whether to save and whether to stop.

    A ``Checkpoint`` subclass so that Lightning orders it after the user's ``ModelCheckpoint`` callbacks: the state
    it saves includes their bookkeeping for the same step, as an uninterrupted run has it at the next step.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        config = run.config
        self.policy = config.checkpoint_every_steps is not None or config.checkpoint_every_seconds is not None
        self.state: dict[str, Any] | None = None
        self.start = 0
        self.seen = 0  # the global step at the previous batch end: an optimizer step happened when it changed
        self.given: int | None = None  # the last step given to run.checkpoint()
        self.stopping = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:  # chosen by Lightning itself despite _refuse (SLURM's "hpc" files)
            raise ConfigError(
                f"Lightning chose to resume from {trainer.ckpt_path} by itself; remove that file or the setting that "
                "points at it: podtrain_pl.fit() resumes from the newest verified podtrain checkpoint only"
            )
        self.state = entries(trainer)
        self.start = self.seen = self.run.resume(self.state)
        entry = self.state["trainer"]
        assert isinstance(entry, TrainerEntry)
        if self.start and entry.loaded_step != self.start:
            raise ConfigError(
                f"podtrain's checkpoint of step {self.start} holds Lightning's global_step {entry.loaded_step}: it was "
                "not written by podtrain_pl for this run; set a new PODTRAIN_RUN_ID to start another run"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        step = trainer.global_step
        if step == self.seen or self.state is None:  # accumulating gradients: no step to save or stop at
            return
        self.seen = step
        policy_due = self.run.should_checkpoint(step) and self.policy  # asked every step: sdk.testing learns it
        cadence_due = _cadence_due(trainer, step)
        if self.run.should_stop():
            self._stop(trainer)
            self.given = step
            self.run.checkpoint(step, self.state, force=True, meta={"emergency": True})
        elif policy_due or cadence_due or not (self.policy or _has_cadence(trainer)):
            self.given = step
            self.run.checkpoint(step, self.state, force=cadence_due and self.policy and not policy_due)
        if step % max(1, trainer.log_every_n_steps) == 0:  # type: ignore[attr-defined]
            values = {k: v for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
            if values:
                self.run.log_metrics(step, **values)

    def _stop(self, trainer: pl.Trainer) -> None:
        """Stop after this step, Lightning's way, without the extras an early stop would bring within the grace."""
        self.stopping = True
        trainer.should_stop = True
        fit_loop = trainer.fit_loop
        fit_loop.min_epochs = None  # a stop request is not an early stop: min_epochs/min_steps do not hold it back
        fit_loop.epoch_loop.min_steps = None
        fit_loop.epoch_loop._skip_next_val = True  # Lightning validates before an early stop: not in the grace


def _has_cadence(trainer: pl.Trainer) -> bool:
    return any(_every(cb) != (0, 0) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint))


def _every(cb: ModelCheckpoint) -> tuple[int, int]:
    """A ModelCheckpoint's cadence: (every n train steps, every n epochs); 0 is never."""
    return max(0, cb._every_n_train_steps or 0), max(0, cb._every_n_epochs or 0)


def _cadence_due(trainer: pl.Trainer, step: int) -> bool:
    """Whether a user's ModelCheckpoint saves at this step: every n train steps, or every n epochs (at the epoch's
    last batch, where the run's position is the next epoch's start)."""
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            steps, epochs = _every(cb)
            if steps and step % steps == 0:
                return True
            if epochs and not steps and last_batch and (trainer.current_epoch + 1) % epochs == 0:
                return True
    return False


def _export(run: Run, model: pl.LightningModule, *, step: int) -> None:
    """``PODTRAIN_OUTPUT_DIR/export/``: ``model.safetensors``, ``hparams.yaml`` (Lightning's own format) when the
    model saved hyperparameters, and podtrain's ``model.json`` sidecar with them; pushed and verified."""
    hparams = dict(model.hparams) if model.hparams else {}
    meta: dict[str, Any] = {"framework": f"lightning {pl.__version__}", "model_class": type(model).__qualname__}
    if hparams:
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        folder = Path(run.config.output_dir) / "export"
        folder.mkdir(parents=True, exist_ok=True)
        save_hparams_to_yaml(folder / "hparams.yaml", hparams)
        meta["hparams"] = json.loads(json.dumps(hparams, default=repr))  # the sidecar is JSON: the rest as text
    run.export(model, step=step, **meta)


@contextmanager
def _routed(trainer: pl.Trainer, callback: _Callback) -> Iterator[None]:
    """On this Trainer, for one fit: the callback in, Lightning's SIGTERM handler out, the training DataLoader made
    resumable where the strategy processes it; all undone on the way out."""
    log = _log.get_logger("podtrain.lightning")
    strategy = trainer.strategy
    process = strategy.process_dataloader
    warned: set[str] = set()

    def warn(message: str) -> None:
        if message not in warned:
            warned.add(message)
            log.warning("lightning.data_position", message=message)

    def process_dataloader(dataloader: object) -> object:
        dataloader = process(dataloader)
        if trainer.training:  # the fit loop's train DataLoader (validation's are processed as they are)
            return resumable(dataloader, rank=trainer.global_rank, warn=warn)
        return dataloader

    connector = trainer._signal_connector
    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]
    connector.register_signal_handlers = _no_handlers  # type: ignore[method-assign]
    trainer.callbacks.append(callback)  # type: ignore[attr-defined]  # set by Lightning's callback connector
    try:
        yield
    finally:
        # Lightning may have replaced the list (a model's configure_callbacks): take it out of the current one
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not callback]  # type: ignore[attr-defined]
        connector.__dict__.pop("register_signal_handlers", None)
        strategy.__dict__.pop("process_dataloader", None)


def _verified(strategy: Any) -> bool:
    """The strategies whose resume is tested exactly: one device, and DDP (DeepSpeed derives from DDP: not it)."""
    return isinstance(strategy, SingleDeviceStrategy) or (
        isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
    )


def _no_handlers() -> None:
    """In place of ``_SignalConnector.register_signal_handlers``: podtrain's handlers stay (see the docstring)."""


def _refuse(run: Run, trainer: Any, *, ckpt_path: Any) -> None:
    """One line, what to change, for what would bypass podtrain or could not resume exactly."""
    problem = None
    if not isinstance(trainer, pl.Trainer):
        problem = (
            f"podtrain_pl.fit takes a lightning.pytorch.Trainer (import lightning as L; L.Trainer), got "
            f"{type(trainer).__module__}.{type(trainer).__name__}"
        )
    elif missing := [f"{a}.{b}" for a, b in _SEAMS if not hasattr(getattr(trainer, a, None), b)]:
        problem = (
            f"lightning {pl.__version__} has no Trainer.{missing[0]}: install the version podtrain[lightning] pins"
        )
    elif ckpt_path is not None:
        problem = (
            "drop ckpt_path: podtrain_pl.fit() resumes from the newest verified podtrain checkpoint itself "
            "(Lightning's .ckpt files are not checked for completeness)"
        )
    elif trainer._checkpoint_connector._user_managed:
        problem = "unset trainer.ckpt_path: podtrain_pl.fit() decides what to resume from"
    elif any(isinstance(cb, OnExceptionCheckpoint) for cb in trainer.callbacks):  # type: ignore[attr-defined]
        problem = (
            "remove OnExceptionCheckpoint: it makes Lightning resume from its own last file; podtrain commits the "
            "step a stop signal interrupts"
        )
    elif trainer.reload_dataloaders_every_n_epochs:  # type: ignore[attr-defined]
        problem = "unset reload_dataloaders_every_n_epochs: a reloaded DataLoader's position cannot be resumed exactly"
    elif not _verified(trainer.strategy):
        problem = (
            f"{type(trainer.strategy).__name__} is not supported by podtrain_pl yet (sharded strategies keep optimizer "
            "state podtrain has not been verified against): use strategy='ddp' or a single device"
        )
    elif trainer.world_size != run.config.world_size:
        problem = (
            f"the Trainer runs {trainer.world_size} processes but WORLD_SIZE={run.config.world_size}: start every "
            "rank with torchrun under podtrain run (podtrain run -- torchrun --nproc-per-node=N train.py) and give "
            "the Trainer devices=N; Lightning's own launcher would start ranks after sdk.init()"
        )
    if problem:
        raise ConfigError(problem)
