"""Real sharded checkpoints for the sharded contract suite (tests/sharded_contract.py): a torchrun script.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/sharded_source.py --out DIR

Two ranks (gloo, CPU) train a small MLP sharded with FSDP2 (``fully_shard`` per Linear, then the root) and Adam,
and save steps 10, 20 and 30 — each after a few more steps, so the weights differ — to ``DIR/ckpt`` through
``Checkpointer(..., world_size=2, rank=r, writer=WRITER)``, with a plain dict entry (``extra``) saved per rank.
After each save rank 0 writes the gathered full model and optimizer state to ``DIR/full-<step>.pt``: what a
load of that step into an unsharded model must give. The suite runs this once per session and copies ``DIR/ckpt``
into each store it tests, since several real ranks are the only way to make a sharded checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sdk.checkpoints.checkpointer import Checkpointer

__all__ = ["LR", "RUN_ID", "STEPS", "WORLD_SIZE", "WRITER", "build", "extra"]

WORLD_SIZE = 2
STEPS = (10, 20, 30)
RUN_ID = "r1"
LR = 0.05  # the job's Adam; a load into an optimizer made with another lr must bring this one back
WRITER = "5eed0000ab12"  # the job's writer id: its files go under attempt-1-<WRITER>/
FEATURES, HIDDEN, OUT = 6, 8, 4  # every dimension sharded (dim 0) is divisible by the world size


def build() -> nn.Sequential:
    """The MLP, the same initial weights wherever it is built (a plain copy loads the sharded checkpoints)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def extra(step: int) -> dict[str, float]:
    """The plain dict entry saved with ``step``: alike on every rank, so one process can load it."""
    return {"step": float(step), "best_loss": 1.0 / step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD_SIZE, world
    torch.set_num_threads(1)
    model = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    ckpt = Checkpointer(
        (args.out / "ckpt").as_uri(), run_id=RUN_ID, attempt=1, world_size=world, rank=rank, writer=WRITER, keep_last=10
    )
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches: the ranks' shards all move
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for step in STEPS:
        for _ in range(3):
            loss = model(torch.randn(4, FEATURES, generator=data)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ckpt.save(step, {"model": model, "optimizer": optimizer, "extra": extra(step)})
        full = {
            "model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
        }
        if rank == 0:
            torch.save(full, args.out / f"full-{step}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
