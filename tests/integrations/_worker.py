"""What both framework workers (``hf_worker.py``, ``pl_worker.py``) do the same way: their common flags, the
reference run's final weights, and the per-rank report ``_processes.py`` reads. Imported by the worker scripts
(``PYTHONPATH`` is the repository, ``Worker.env``)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["parser", "save_final", "write_report"]


def parser(framework: str, save_steps_zero: str) -> argparse.ArgumentParser:
    """``--out DIR --steps N --save-steps K --sleep S --plain``; add a worker's own flags to it."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-steps", type=int, default=5, help=f"0: {save_steps_zero}")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--plain", action="store_true", help=f"{framework} alone, no podtrain")
    return p


def save_final(out: Path, state: Mapping[str, torch.Tensor], rank: int) -> None:
    """The reference run's end: rank 0 saves ``final.pt``; then, as a careful script ends, every rank waits past
    the save and the process group is torn down, not left to the interpreter's exit (where gloo's threads may
    abort a rank: "terminate called without an active exception")."""
    if rank == 0:
        torch.save({k: v.clone() for k, v in state.items()}, out / "final.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def write_report(out: Path, rank: int, report: Mapping[str, Any]) -> None:
    """``rank-<rank>.json`` in ``out``, written whole (a temporary file renamed over it)."""
    path = out / f"rank-{rank}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(report)))
    tmp.replace(path)
