"""Edge cases of a sharded save, run under torchrun (2 ranks, gloo): the subject of test_sharded_edges.

    torchrun --standalone --nproc_per_node=2 sharded_edge_worker.py DIR

Each rank writes ``DIR/rank-<r>.json`` with what it saw:

* ``owner``: rank 1's optimizer steps a model that is not in the state, so rank 1 cannot plan its save. Both ranks
  must raise the same one-line CheckpointError (no rank left waiting in a collective).
* ``unstepped``: a save before the optimizer's first step must not step it (no state appears, Adam's step count
  stays 0), and the optimizer is then saved per rank.
"""

from __future__ import annotations

import json
import sys
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

    (out / f"rank-{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
