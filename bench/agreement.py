"""The per-step cost of agreeing on a stop across ranks, as a fraction of a small model's step time.

Launched through torchrun with 2 ranks on gloo (CPU). Each rank trains a small DistributedDataParallel MLP (the
shape of ``tests/integration/ddp_worker.py``) and times blocks of steps in three variants, interleaved so that
drift on a noisy machine hits them alike:

* **none** — the training step alone;
* **podtrain** — plus ``Run.should_stop()``: a blocking all-reduce every ``K`` steps, ``K`` itself agreed from
  the measured cost and step time (:mod:`sdk.lifecycle.agreement`);
* **every step** — plus a blocking all-reduce of the stop flag every step, for comparison.

Rank 0 prints the median per-step time of each, the overheads as a share of the step, and the ``K`` podtrain
settled on. Goal: podtrain's agreement adds under 1 % to the step.

    python -m bench.agreement [--steps-per-block 50] [--blocks 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL = 0.01


def worker(steps_per_block: int, blocks: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sdk.config import Config
    from sdk.lifecycle.preemption import Preemption
    from sdk.run import Run

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(checkpoint_uri=tmp, attempt=1, world_size=dist.get_world_size(), rank=dist.get_rank())
        run = Run(config, _NoCheckpoints(), Preemption(30))  # type: ignore[arg-type]
        flag = torch.zeros(1, dtype=torch.int32)

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        variants: dict[str, Any] = {
            "none": lambda: None,
            "podtrain": run.should_stop,
            "every step": lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX),
        }
        for _ in range(steps_per_block):  # warm-up
            step()
            run.should_stop()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for block in range(blocks):
            order = list(variants) if block % 2 == 0 else list(reversed(variants))
            for name in order:
                extra = variants[name]
                dist.barrier()
                started = time.perf_counter()
                for _ in range(steps_per_block):
                    step()
                    extra()
                times[name].append((time.perf_counter() - started) / steps_per_block)
        if dist.get_rank() == 0:
            assert run.agreement is not None
            out.write_text(json.dumps({"times": times, "every": run.agreement.every}))
        run.close()
    dist.destroy_process_group()


class _NoCheckpoints:
    """Stands in for a Checkpointer: this benchmark saves nothing."""

    url = "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-block", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_out is not None:
        worker(args.steps_per_block, args.blocks, args.worker_out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
        cmd += ["bench.agreement", "--steps-per-block", str(args.steps_per_block), "--blocks", str(args.blocks)]
        cmd += ["--worker-out", str(out)]
        env = {**os.environ, "PODTRAIN_LOG_LEVEL": "warning", "PYTHONPATH": str(Path(__file__).parents[1])}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    print(report(result["times"], result["every"]))
    return 0


def report(times: dict[str, list[float]], every: int) -> str:
    """The table: median per-step time of each variant and the agreement's share of the step."""
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["none"]
    lines = [
        "stop agreement across 2 ranks (gloo, CPU), per training step of a small DDP MLP",
        f"{'variant':<11} {'step (ms)':>10} {'overhead':>10}",
    ]
    for name in ("none", "podtrain", "every step"):
        share = (median[name] - base) / base
        lines.append(f"{name:<11} {median[name] * 1e3:>10.3f} {share:>+10.2%}")
    ok = (median["podtrain"] - base) / base <= GOAL
    lines.append(f"podtrain agreed every {every} steps (K, from the measured cost and step time)")
    lines.append(f"goal: podtrain's overhead <= {GOAL:.0%} of the step: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
