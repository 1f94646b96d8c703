"""An FSDP2 job checkpointing in overlap mode, under torchrun (2 ranks, gloo): the subject of test_sharded_edges.

    torchrun --standalone --nproc_per_node=2 sharded_overlap_worker.py DIR

Overlap mode leaves the copies of the optimizer's tensors (the sharded parameters and Adam's moments) to the
background and to the next optimizer step's pre-hook. The job checkpoints step 3 and steps on at once, twice, so a
copy made too late would hold step 4's or 5's values. Rank 0 writes the gathered full state of step 3 to
``DIR/at-3.pt`` and, after the save is committed, the state a fresh model loads from it to ``DIR/loaded.pt``.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

import sdk

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _model(mesh: DeviceMesh) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The gathered state, cloned: a full state dict can share tensors with the live state (Adam's step counts)."""
    gathered: dict[str, Any] = {
        "model": get_model_state_dict(model, options=FULL),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL).get("state", {}),  # rank 0 only
    }
    return copy.deepcopy(gathered)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 32, generator=generator), torch.randint(0, 8, (16,), generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model(mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    os.environ["PODTRAIN_ATTEMPT"] = "1"
    with sdk.init(checkpoint_uri=(out / "ckpt").as_uri(), checkpoint_mode="overlap", run_id="o") as run:
        for step in (1, 2, 3):
            _step(model, optimizer, step)
        at_3 = _full(model, optimizer)
        run.checkpoint(3, {"model": model, "optimizer": optimizer}, force=True)
        _step(model, optimizer, 4)  # at once: the pre-hook must finish step 3's copies first
        _step(model, optimizer, 5)
        run.wait()
    fresh = _model(mesh)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.05)
    os.environ["PODTRAIN_ATTEMPT"] = "2"
    with sdk.init(checkpoint_uri=(out / "ckpt").as_uri(), run_id="o") as run:
        resumed = run.checkpointer.load({"model": fresh, "optimizer": fresh_optimizer}, step=3)
        loaded = _full(fresh, fresh_optimizer)
    if dist.get_rank() == 0:
        torch.save(at_3, out / "at-3.pt")
        torch.save({"step": resumed, **loaded}, out / "loaded.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
