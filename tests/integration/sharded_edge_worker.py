"""Edge cases of a sharded save, run under torchrun (2 ranks, gloo): the subject of test_sharded_edges.

    torchrun --standalone --nproc_per_node=2 sharded_edge_worker.py DIR

Each rank writes ``DIR/rank-<r>.json`` with what it saw:

* ``owner``: rank 1's optimizer steps a model that is not in the state, so rank 1 cannot plan its save. Both ranks
  must raise the same one-line CheckpointError (no rank left waiting in a collective).
* ``unstepped``: a save before the optimizer's first step must not step it (no state appears, Adam's step count
  stays 0), and the optimizer is then saved per rank.
* ``midload``: an FSDP2 model's only checkpoint, one bit of the last tensor of rank 1's payload flipped on disk (a
  local folder keeps no checksum: nothing finds it before the load). Loading on 2 ranks, rank 0 copies its shards
  in while rank 1 finds the damage: both must raise PartlyLoadedError (neither starts fresh from a half-written
  model, neither hangs), and a second load must skip the checkpoint on both ranks before writing anything.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.errors import CheckpointError


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seen: dict[str, object] = {}

    model, stray = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    optimizer = torch.optim.Adam((stray if rank == 1 else model).parameters())
    (model(torch.randn(2, 4)).sum() + stray(torch.randn(2, 4)).sum()).backward()
    optimizer.step()
    try:
        Checkpointer((out / "owner").as_uri(), attempt=1, world_size=world, rank=rank, writer="a").save(
            1, {"model": model, "optimizer": optimizer}
        )
        seen["owner"] = "saved"
    except CheckpointError as exc:
        seen["owner"] = str(exc)

    fresh = torch.nn.Linear(4, 4)
    unstepped = torch.optim.Adam(fresh.parameters())
    info = Checkpointer((out / "unstepped").as_uri(), attempt=1, world_size=world, rank=rank, writer="b").save(
        0, {"model": fresh, "optimizer": unstepped}
    )
    seen["unstepped_state"] = len(unstepped.state)
    seen["unstepped_sharded"] = list(info.manifest.sharded)
    seen["midload"] = midload(out / "midload", rank, world)

    (out / f"rank-{rank}.json").write_text(json.dumps(seen))
    # No destroy_process_group(): see the end of the file.


def midload(root: Path, rank: int, world: int) -> list[str]:
    """Save an FSDP2 model once, damage rank 1's last tensor, load twice: each load's outcome on this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sdk.checkpoints import _statefile as statefile
    from sdk.errors import PartlyLoadedError

    def fsdp() -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    torch.manual_seed(0)
    Checkpointer(root.as_uri(), attempt=1, world_size=world, rank=rank, writer="c").save(1, {"model": fsdp()})
    dist.barrier()
    if rank == 0:
        (payload,) = root.rglob("rank-1/sharded*.safetensors")
        data = bytearray(payload.read_bytes())
        last = statefile.safetensors_header(payload.name, bytes(data), location="here")[-1]
        data[last.end - 1] ^= 0x01
        payload.write_bytes(bytes(data))
    dist.barrier()
    outcomes = []
    for _ in range(2):
        torch.manual_seed(1)
        try:
            step = Checkpointer(root.as_uri(), attempt=2, world_size=world, rank=rank).load({"model": fsdp()})
            outcomes.append(f"loaded {step}")
        except PartlyLoadedError as exc:
            outcomes.append(f"PartlyLoadedError: {exc}")
    return outcomes


if __name__ == "__main__":
    # Ended without the interpreter's teardown, as sharded_worker.py is: destroying the process group and the
    # FSDP models in it aborted a rank now and then on a loaded machine ("terminate called without an active
    # exception"), after everything checked here was written.
    try:
        main()
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
