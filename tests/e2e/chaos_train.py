"""A tiny, fast, deterministic CPU training script for the chaos tests; it uses only the public ``import sdk`` API.

    python tests/e2e/chaos_train.py --steps 200 --every 20 --progress P --weights W [--sleep S] [--fail-at N]

Configured by ``PODTRAIN_*`` like any ``train.py``. It appends to the ``--progress`` file, one line each:
``pid P`` first thing (before torch's import), ``start N`` once the run has resumed (N: the step it resumed
from, 0 on a fresh start), then the number of every completed step (written after ``run.checkpoint`` recorded
it). At a normal end it writes the model's final ``state_dict()`` to ``--weights`` (``torch.save``, renamed
into place). ``--fail-at N`` raises before step N as a user bug would; ``--sleep`` pauses after each step,
so a signal can land mid-training reliably. The optimizer is ``torch.optim.Adam``, so that the ``overlap``
checkpoint mode (which hooks the optimizer's step) is exercised too.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each step")
    parser.add_argument("--fail-at", type=int, default=None, help="raise RuntimeError before this step")
    parser.add_argument("--checkpoint-mode", default=None, help="async, overlap or sync (default: PODTRAIN_*)")
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    args = parser.parse_args()

    with args.progress.open("a", encoding="utf-8") as progress:
        progress.write(f"pid {os.getpid()}\n")
        progress.flush()
        train(args, progress)
    return 0


def train(args: argparse.Namespace, progress) -> None:  # type: ignore[no-untyped-def]
    import time

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import sdk

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(1234)
    features = torch.randn(512, 8, generator=data)
    labels = (features @ torch.randn(8, 3, generator=data)).argmax(dim=1)
    loader = sdk.ResumableLoader(
        DataLoader(
            TensorDataset(features, labels),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(args.seed),
        )
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": optimizer, "loader": loader}

    def write(line: str) -> None:
        progress.write(line + "\n")
        progress.flush()

    with sdk.init(checkpoint_every_steps=args.every, checkpoint_mode=args.checkpoint_mode) as run:
        start = run.resume(state)
        write(f"start {start}")
        batches = _forever(loader)
        for step in range(start, args.steps):
            if args.fail_at is not None and step + 1 == args.fail_at:
                raise RuntimeError(f"chaos_train: injected failure before step {step + 1}")
            x, y = next(batches)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.checkpoint(step + 1, state)
            if (step + 1) % args.every == 0:
                run.log_metrics(step + 1, loss=loss.detach())  # pushed with the outputs, preempted or not
            write(str(step + 1))
            if run.should_stop():  # leaving the block commits this step if it fits, then exits 75
                break
            if args.sleep:
                time.sleep(args.sleep)
    tmp = args.weights.with_name(args.weights.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, args.weights)


def _forever(loader):  # type: ignore[no-untyped-def]
    """Batches across epochs; after a resume the first epoch is the rest of the interrupted one."""
    while True:
        yield from loader


if __name__ == "__main__":
    raise SystemExit(main())
