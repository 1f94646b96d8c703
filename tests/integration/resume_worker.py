"""A seeded CPU training run that checkpoints, stops on request, and resumes: the subject of test_exact_resume.

Run as a script (one fresh process per run). Everything a step draws from is random: the loader's shuffle
(from the global torch RNG: the DataLoader has no generator of its own), dropout (global torch RNG), and
augmentation in ``__getitem__`` from numpy's and python's global RNGs. The model is trained with Adam and a
OneCycle schedule, checkpointed through :class:`sdk.checkpoints.checkpointer.Checkpointer`.

    python resume_worker.py --ckpt file:///tmp/c --out final.pt [--stop-at 50] [--every 20]

With ``--stop-at N`` it saves a checkpoint after step N and exits (an interruption); started again on the same
checkpoint URL it resumes from the newest checkpoint. When it exits it writes where it started and ended, the
loss of every step it ran, and the model and optimizer state to ``--out``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.data.loader import ResumableLoader

SAMPLES = 200
BATCH = 16  # 13 batches an epoch, the last one of 8
FEATURES = 16
CLASSES = 4


class NoisyDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed points and labels, augmented on every fetch with numpy noise and a python-random sign flip."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, FEATURES, generator=g)
        self.y = (self.x[:, :CLASSES].argmax(dim=1) + (self.x[:, -1] > 1).long()) % CLASSES

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, FEATURES).astype(np.float32))
        sign = -1.0 if random.random() < 0.1 else 1.0
        return sign * self.x[index] + noise, self.y[index]


def build(total_steps: int) -> dict[str, Any]:
    """Model, optimizer, scheduler and loader, created the same way in every process."""
    model = nn.Sequential(
        nn.Linear(FEATURES, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, CLASSES),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=total_steps)
    loader = ResumableLoader(DataLoader(NoisyDataset(), batch_size=BATCH, shuffle=True))
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoint URL (file://...)")
    parser.add_argument("--out", required=True, type=Path, help="where the final state and losses go")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--stop-at", type=int, default=None, help="save after this step and exit")
    parser.add_argument("--every", type=int, default=0, help="also checkpoint every N steps (0: never)")
    parser.add_argument("--attempt", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    state = build(args.steps)
    model, optimizer, scheduler, loader = (state[k] for k in ("model", "optimizer", "scheduler", "loader"))
    ckpt = Checkpointer(args.ckpt, run_id="exact-resume", attempt=args.attempt, keep_last=2)
    start = ckpt.load(state) or 0
    print(f"resume_worker: starting at step {start}", file=sys.stderr)

    losses: dict[int, float] = {}
    batches = loader.batches()
    model.train()
    step = start
    while step < args.steps:
        x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        losses[step] = loss.item()
        if step == args.stop_at or (args.every and step % args.every == 0):
            ckpt.save(step, state)
        if step == args.stop_at:
            print(f"resume_worker: stopped after step {step} (epoch {loader.epoch})", file=sys.stderr)
            break

    torch.save(
        {
            "start": start,
            "end": step,
            "finished": step == args.steps,
            "losses": losses,
            "epoch": loader.epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
