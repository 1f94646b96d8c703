"""Train a small character-level transformer with PyTorch Lightning under podtrain: resume, checkpoint, stop, export.

The Trainer, LightningModule and LightningDataModule are the user's own; podtrain enters through one call,
``podtrain_pl.fit(run, trainer, model, datamodule=dm)`` in place of ``trainer.fit(model, datamodule=dm)``:

    python examples/dataset.py --out /tmp/bucket/data                       # make a small corpus ("the bucket")
    export PODTRAIN_DATA_URI=file:///tmp/bucket/data PODTRAIN_CHECKPOINT_URI=file:///tmp/bucket/ckpt-pl
    podtrain run -- python examples/train_lightning.py                      # pulls, trains, exports
    podtrain run -- torchrun --nproc_per_node=2 examples/train_lightning.py # DDP (gloo on CPU, NCCL on GPU)
    python examples/train_lightning.py --data /tmp/bucket/data --steps 100  # read a local folder, no pull

Needs ``pip install 'podtrain[lightning]'``. Several ranks are started by torchrun (the Trainer gets
``devices=LOCAL_WORLD_SIZE``), not by Lightning's own launcher: ``sdk.init()`` needs every rank before the Trainer
exists. Checkpoints are taken at the ``ModelCheckpoint`` cadence (``--save-steps``) and, when
``PODTRAIN_CHECKPOINT_EVERY_STEPS``/``_SECONDS`` is set, by podtrain's policy too; they go to
``PODTRAIN_CHECKPOINT_URI`` through podtrain (verified, committed, fenced). A SIGTERM stops the Trainer after the
step every rank agreed on, commits that step and exits 75; the next attempt resumes from the newest verified
checkpoint, mid-epoch included. When the run completes, ``PODTRAIN_OUTPUT_DIR/export/`` holds
``model.safetensors`` and ``hparams.yaml``: ``CharModel(**hparams).load_state_dict(load_file(...))`` rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import sdk
from sdk.integrations import lightning as podtrain_pl

VOCAB = 256  # one token per byte


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in the whole run (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step and process (default 16)")
    p.add_argument("--save-steps", type=int, default=50, help="ModelCheckpoint(every_n_train_steps) (default 50)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, default=64, help="bytes per sequence (default 64)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--data", type=Path, default=None, help="read shards from this local folder, pull nothing")
    return p.parse_args(argv)


class CharModel(L.LightningModule):
    """A causal transformer over bytes; its hyperparameters are saved (they go with the export)."""

    def __init__(
        self,
        context: int = 64,
        *,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        lr: float = 3e-3,
        steps: int = 300,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.blocks(self.embed(tokens) + self.position[:length], mask=mask, is_causal=True)
        return self.head(hidden)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.hparams.lr, total_steps=self.hparams.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Windows(Dataset[torch.Tensor]):
    """Sequence ``i``: ``context + 1`` bytes from ``i * context`` (inputs and the next byte to predict)."""

    def __init__(self, tokens: torch.Tensor, context: int) -> None:
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.context : (i + 1) * self.context + 1].long()


class Corpus(L.LightningDataModule):
    """The ``shard-*.txt`` files of the dataset: ``--data``, or ``PODTRAIN_DATA_URI`` pulled once per machine
    (``prepare_data`` runs on each machine's first rank; under ``podtrain run`` the supervisor pulled it already)."""

    def __init__(self, run: sdk.Run, folder: Path | None, context: int, batch_size: int) -> None:
        super().__init__()
        self.run, self.folder, self.context, self.batch_size = run, folder, context, batch_size

    def prepare_data(self) -> None:
        if self.folder is None:
            if not self.run.config.data_uri:
                raise sdk.errors.ConfigError(
                    "PODTRAIN_DATA_URI is unset: set it to the dataset's URL (e.g. file:///tmp/bucket/data, written "
                    "by examples/dataset.py), or pass --data DIR"
                )
            self.run.pull_data()

    def setup(self, stage: str) -> None:
        folder = self.folder or Path(self.run.config.data_dir)
        shards = sorted(Path(folder).glob("shard-*.txt"))
        if not shards:
            raise sdk.errors.ConfigError(f"no shard-*.txt files in {folder}: write them with examples/dataset.py")
        tokens = torch.frombuffer(bytearray(b"".join(s.read_bytes() for s in shards)), dtype=torch.uint8)
        self.dataset = Windows(tokens, self.context)

    def train_dataloader(self) -> DataLoader[torch.Tensor]:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True)


def build(args: argparse.Namespace) -> tuple[L.Trainer, CharModel]:
    """The user's Trainer and model, as they would be without podtrain."""
    torch.manual_seed(args.seed)
    model = CharModel(
        args.context, d_model=args.d_model, heads=args.heads, layers=args.layers, lr=args.lr, steps=args.steps
    )
    cuda = torch.cuda.is_available()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="gpu" if cuda else "cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),  # the ranks torchrun started on this machine
        num_nodes=int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy="ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "auto",
        precision="16-mixed" if cuda else "32-true",  # on a GPU the grad scaler's state is checkpointed too
        callbacks=[ModelCheckpoint(every_n_train_steps=args.save_steps, save_top_k=0)],  # the cadence only
        log_every_n_steps=max(1, args.save_steps // 2),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer, model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with sdk.init() as run:  # leaving the block after a stop signal commits the step and exits 75
        trainer, model = build(args)
        corpus = Corpus(run, args.data, args.context, args.batch_size)
        fitted = podtrain_pl.fit(run, trainer, model, datamodule=corpus)  # resume, train, stop on SIGTERM, export
        if run.config.rank == 0:
            loss = trainer.callback_metrics.get("loss")
            done = {"event": "train.end", "step": fitted.step, "of": args.steps, "resumed_from": fitted.start}
            print(json.dumps({**done, "loss": None if loss is None else round(float(loss), 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
