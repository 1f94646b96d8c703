"""What a podtrain checkpoint of a Lightning ``Trainer`` holds, and how a resume hands it back to Lightning.

The entries given to ``run.checkpoint()``/``run.resume()`` (:func:`entries`) are the ``LightningModule`` itself,
each optimizer itself, and one :class:`TrainerEntry`:

* **Model and optimizers as podtrain state.** With several ranks podtrain saves them sharded through
  ``torch.distributed.checkpoint`` (each piece once: a DDP replica once, not once per rank) and checks every byte
  on load. Taking them from Lightning's ``dump_checkpoint()`` instead would gather them whole on every rank of a
  sharded strategy (a collective and a full copy per save) and write one copy per rank.
* **Everything else as Lightning's own checkpoint dict** (the keys ``dump_checkpoint()`` writes, minus
  ``state_dict`` and ``optimizer_states``): the loops' progress (``global_step``, epoch, batch progress, and the
  training DataLoader's position: see :func:`resumable`), LR schedulers, the precision plugin (grad scaler),
  callbacks' states, the datamodule's state, and whatever the user's ``on_save_checkpoint`` hooks add. A resume
  feeds it back through Lightning's own restore methods (``_CheckpointConnector.restore_loops`` and the rest), in
  Lightning's order, so Lightning's restart logic (mid-epoch, end of epoch) is what continues the run. Building
  the dict from Lightning's pieces rather than re-deriving counters keeps the format Lightning's, version to
  version. The ``hyper_parameters`` are left out: the model is already built with them (they go with the export),
  and arbitrary objects in them could not be read back without running pickled code.

The RNG streams are podtrain's own (every checkpoint has them). Nothing here reads a Lightning ``.ckpt`` file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.data import _auto_add_worker_init_fn
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.trainer import call
from torch.utils.data import DataLoader, IterableDataset

from sdk.data.loader import ResumableLoader

__all__ = ["TrainerEntry", "entries", "resumable"]

WEIGHT_KEYS = ("state_dict", "optimizer_states")  # what podtrain saves as its own entries


def entries(trainer: pl.Trainer) -> dict[str, Any]:
    """The state given to podtrain: ``model``, ``optimizer`` (``optimizer-<i>`` for several), ``trainer``.

    Call it once Lightning has built the optimizers (``on_fit_start``): the names are the checkpoint's file stems.
    """
    optimizers = list(trainer.optimizers)
    names = ["optimizer"] if len(optimizers) == 1 else [f"optimizer-{i}" for i in range(len(optimizers))]
    return {
        "model": trainer.lightning_module,
        **dict(zip(names, optimizers, strict=True)),
        "trainer": TrainerEntry(trainer),
    }


class TrainerEntry:
    """The Trainer's state but the weights, as Lightning's own checkpoint dict (see the module docstring)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.loaded_step: int | None = None  # the global step of the checkpoint resumed from

    def state_dict(self) -> dict[str, Any]:
        """What ``_CheckpointConnector.dump_checkpoint()`` writes, without ``state_dict``/``optimizer_states``,
        with the same hooks called (callbacks', the precision plugin's, the module's ``on_save_checkpoint``)."""
        trainer = self.trainer
        checkpoint: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "pytorch-lightning_version": pl.__version__,
            "loops": trainer._checkpoint_connector._get_loops_state_dict(),
            "callbacks": call._call_callbacks_state_dict(trainer),
            "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        }
        precision = trainer.precision_plugin
        precision_state = precision.state_dict()
        if precision_state:
            checkpoint[type(precision).__qualname__] = precision_state
        precision.on_save_checkpoint(checkpoint)
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        if datamodule is not None:
            datamodule_state = call._call_lightning_datamodule_hook(trainer, "state_dict")
            if datamodule_state:
                checkpoint[type(datamodule).__qualname__] = datamodule_state
        call._call_callbacks_on_save_checkpoint(trainer, checkpoint)
        call._call_lightning_module_hook(trainer, "on_save_checkpoint", checkpoint)
        for key in WEIGHT_KEYS:  # a user hook that added them: podtrain has them already
            checkpoint.pop(key, None)
        return checkpoint

    def load_state_dict(self, value: dict[str, Any]) -> None:
        """Put the state back through Lightning's own restore path, in its order (datamodule, the module's
        ``on_load_checkpoint``, callbacks, precision plugin, loops, LR schedulers). The model and optimizers are
        podtrain entries, already loaded when this runs."""
        loops = value.get("loops") if isinstance(value, dict) else None
        if not isinstance(loops, dict) or not isinstance(loops.get("fit_loop"), dict):
            raise ValueError("it is not a Lightning trainer state (no loops.fit_loop)")
        schedulers = value.get("lr_schedulers")
        configs = self.trainer.lr_scheduler_configs
        if not isinstance(schedulers, list) or len(schedulers) != len(configs):
            count = len(schedulers) if isinstance(schedulers, list) else "no"
            raise ValueError(
                f"it holds {count} LR scheduler states and configure_optimizers() returned {len(configs)}: resume "
                "with the optimizers and schedulers the run was started with"
            )
        trainer = self.trainer
        connector = trainer._checkpoint_connector
        connector._loaded_checkpoint = value
        try:
            connector.restore_datamodule()
            call._call_lightning_module_hook(trainer, "on_load_checkpoint", value)
            connector.restore_callbacks()
            connector.restore_precision_plugin_state()
            connector.restore_loops()
            connector.restore_lr_schedulers()
        finally:
            connector._loaded_checkpoint = {}
        self.loaded_step = trainer.global_step

    def reshard_state_dict(self, states: list[dict[str, Any]], *, rank: int, world_size: int) -> dict[str, Any]:
        """Refused: Lightning's loop counts batches of ``WORLD_SIZE`` ranks, and each rank's DataLoader position is
        its own share of the data, so another number of ranks would see other samples."""
        raise ValueError(
            f"Lightning's data position is per rank of {len(states)}; resume with WORLD_SIZE={len(states)} for an "
            "exact continuation"
        )


def resumable(dataloader: object, *, rank: int, warn: Callable[[str], None]) -> object:
    """The training DataLoader as Lightning will iterate it, with a position that survives a restart.

    A map-style ``DataLoader`` (after Lightning has put its ``DistributedSampler`` in) becomes a
    :class:`~sdk.data.loader.ResumableLoader`: Lightning sees a stateful loader, saves its position with the fit
    loop's state and loads it back when the fit loop restarts, and the loader replays the interrupted epoch's order
    and skips the consumed batches without fetching them. A loader that is already stateful (a ``StatefulDataLoader``,
    LitData's) is Lightning's to save as it is. Anything else (an ``IterableDataset`` without a state) cannot be
    positioned: it starts again from its beginning after a resume, and ``warn`` says so.
    """
    if isinstance(dataloader, _Stateful):
        return dataloader
    if isinstance(dataloader, DataLoader) and not isinstance(dataloader.dataset, IterableDataset):
        if dataloader.persistent_workers:
            warn("a DataLoader with persistent_workers=True cannot be positioned exactly; it restarts its epoch")
            return dataloader
        _auto_add_worker_init_fn(dataloader, rank)  # what Lightning does next, done before the loader is rebuilt
        return ResumableLoader(dataloader)
    warn(
        f"the training {type(dataloader).__name__} has no state_dict(): after a resume it starts from its beginning, "
        "not where the run stopped (use a map-style dataset, or a stateful loader)"
    )
    return dataloader
