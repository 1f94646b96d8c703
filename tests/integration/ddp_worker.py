"""A data-parallel CPU training script for torchrun (gloo): the subject of test_ranks.

    torchrun --standalone --nproc_per_node=2 ddp_worker.py --steps 200 --every 20 --out DIR

Each rank trains a DistributedDataParallel MLP on its own shuffled shard, through the public ``import sdk`` API
only: resume, policy checkpoints, ``should_stop()`` every step. Each rank writes ``DIR/rank-<r>.json`` (where it
started, the last step it completed, whether it stopped on request) whenever it leaves the loop, and rank 0
writes the final weights to ``DIR/final.pt`` when the run completes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import sdk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to give a signal time to land")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    features = torch.randn(1024, 16, generator=torch.Generator().manual_seed(1234))
    labels = (features @ torch.randn(16, 4, generator=torch.Generator().manual_seed(5))).argmax(dim=1)
    shard = TensorDataset(features[rank::2], labels[rank::2])
    loader = sdk.ResumableLoader(
        DataLoader(shard, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(10 + rank))
    )
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    state = {"model": model, "optimizer": optimizer, "loader": loader}

    start = done = 0
    stopped = False
    with sdk.init(checkpoint_every_steps=args.every) as run:
        start = done = run.resume(state)
        batches = iter(())
        for step in range(start, args.steps):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done = step + 1
            run.checkpoint(done, state)
            if args.sleep:
                time.sleep(args.sleep)
            if run.should_stop():
                stopped = True
                break
            _report(args.out, rank, start, done, stopped)
        _report(args.out, rank, start, done, stopped)
    if rank == 0:
        torch.save(model.state_dict(), args.out / "final.pt")
    dist.destroy_process_group()


def _report(out: Path, rank: int, start: int, done: int, stopped: bool) -> None:
    path = out / f"rank-{rank}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"start": start, "done": done, "stopped": stopped}))
    tmp.replace(path)


if __name__ == "__main__":
    main()
