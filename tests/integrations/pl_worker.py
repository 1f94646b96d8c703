"""A tiny PyTorch Lightning run for the tests of sdk.integrations.lightning: the subject of test_lightning*.

    python pl_worker.py --out DIR [--steps 60] [--save-steps 5] [--sleep 0.05] [--plain]
    torchrun --standalone --nproc_per_node=2 pl_worker.py --out DIR ...

A small MLP LightningModule (dropout on, so the RNG matters; saved hyperparameters), AdamW with a cosine LR schedule
stepped every step, 96 fixed samples in shuffled batches of 4 from a LightningDataModule (24 steps an epoch on one
rank, 12 on two: a run of 60 crosses epoch ends). With ``--plain`` the user's Trainer runs as Lightning alone runs
it, no podtrain: the uninterrupted reference. Else it runs through ``podtrain_pl.fit`` inside ``sdk.init()``; each
rank writes ``DIR/rank-<r>.json`` (the step it resumed from, the step it ended at, whether it stopped on request)
before leaving the block. Final weights: the export (``PODTRAIN_OUTPUT_DIR/export/model.safetensors``), or
``DIR/final.pt`` with ``--plain``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.integrations import _worker

SAMPLES, FEATURES = 96, 8


class Tiny(L.LightningModule):
    """Regression with dropout; the loss is logged so that podtrain's metrics get it."""

    def __init__(self, width: int = 16, lr: float = 0.05, steps: int = 60) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Data(L.LightningDataModule):
    """96 fixed samples, shuffled by the global torch RNG (no generator of its own: the harder case)."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(SAMPLES, FEATURES, generator=g)
        self.dataset = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


class ValidatedTiny(Tiny):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))


class ValidatedData(Data):
    """With a validation DataLoader that has its own generator: its iterator draws its seed from that generator,
    not from the global RNG the training run draws from (see test_lightning's validation test for why it matters)."""

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.dataset, batch_size=8, generator=torch.Generator().manual_seed(0))


class Slow(Callback):
    """Sleeps after each batch, so that a signal sent from a test lands mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


def build(
    out: Path,
    *,
    steps: int = 60,
    save_steps: int = 5,
    sleep: float = 0.0,
    callbacks: tuple[Callback, ...] = (),
    validate: bool = False,
    **options: Any,
) -> tuple[L.Trainer, Tiny, Data]:
    """The user's Trainer, model and data: ``save_steps`` 0 is no ModelCheckpoint, ``validate`` adds a validation
    DataLoader; ``options`` override the Trainer's arguments."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = (ValidatedTiny if validate else Tiny)(steps=steps)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoints = [ModelCheckpoint(dirpath=out / "lightning", every_n_train_steps=save_steps, save_last=True)]
    trainer = L.Trainer(
        **{
            "max_steps": steps,
            "accelerator": "cpu",
            "devices": ranks,
            "strategy": "ddp" if ranks > 1 else "auto",
            "logger": False,
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": bool(save_steps),
            "num_sanity_val_steps": 0,
            "default_root_dir": str(out),
            "callbacks": [*(checkpoints if save_steps else []), *([Slow(sleep)] if sleep else []), *callbacks],
            **options,
        }
    )
    return trainer, model, ValidatedData() if validate else Data()


def main() -> None:
    parser = _worker.parser("Lightning", "no ModelCheckpoint")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer, model, data = build(args.out, steps=args.steps, save_steps=args.save_steps, sleep=args.sleep)
    if args.plain:
        trainer.fit(model, datamodule=data)
        _worker.save_final(args.out, model.state_dict(), trainer.global_rank)
        return

    import sdk
    from sdk.integrations import lightning as podtrain_pl

    with sdk.init() as run:
        fitted = podtrain_pl.fit(run, trainer, model, datamodule=data)
        report = {"start": fitted.start, "done": fitted.step, "stopped": fitted.stopped}
        _worker.write_report(args.out, run.config.rank, report)


if __name__ == "__main__":
    main()
