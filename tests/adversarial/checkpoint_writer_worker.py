"""One of several processes that save the same steps to one checkpoint store at once: the subject of
test_checkpoint_writers.

    python checkpoint_writer_worker.py --index I --peers N --trials T --sync DIR --out FILE [--derive] [--race R]

The store is ``PODTRAIN_CHECKPOINT_URI``; the attempt is ``PODTRAIN_ATTEMPT`` (set by the test, or exported by
``podtrain run``), or with ``--derive`` derived by a new ``Checkpointer`` in every trial. Peers meet at barriers
of marker files in ``DIR``: all derive, then all save step ``10 * trial`` (each its own state: another seed).

In the first ``R`` trials (``--race``) the interleaving that breaks a shared folder is forced, with the real store
and real processes:
one peer (the winner, ``trial % peers``) commits only after the others checked that the step is not committed
yet, and the others upload their state files only after the winner committed — a slow writer's uploads landing
after a fast one's commit. Each peer appends what happened in each trial (its attempt, whether it committed, the
manifest's files when it did, the error when not) to ``FILE`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository's sdk

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.checkpoints.manifest import MANIFEST_NAME
from sdk.config import Config
from sdk.errors import CheckpointError

WAIT = 60.0  # seconds a peer waits at a barrier before giving up (the test then fails with the reason)


def _wait_for(paths: list[Path], what: str, limit: float = WAIT) -> bool:
    give_up = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        if time.monotonic() > give_up:
            return False
        time.sleep(0.002)
    return True


def _barrier(sync: Path, name: str, index: int, peers: int) -> None:
    (sync / f"{name}-{index}").touch()
    if not _wait_for([sync / f"{name}-{j}" for j in range(peers)], name):
        raise SystemExit(f"peer {index}: barrier {name} not reached by every peer within {WAIT:.0f} s")


def _state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "extra": {"seed": seed}}


def _race(ckpt: Checkpointer, sync: Path, trial: int, index: int, peers: int) -> None:
    """Force the interleaving described in the module's docstring (markers in ``sync``)."""
    winner = trial % peers
    store = ckpt.store
    exists, put = store.exists, store.put

    def checked_exists(rel: str) -> bool:
        found = exists(rel)
        if rel.endswith(MANIFEST_NAME) and not found:
            (sync / f"checked-{trial}-{index}").touch()
        return found

    def ordered_put(rel: str, data: bytes, **kw: Any) -> bool:
        if index == winner and rel.endswith(MANIFEST_NAME):  # commit once the others found no manifest
            _wait_for([sync / f"checked-{trial}-{j}" for j in range(peers) if j != winner], "checked", 10.0)
        elif index != winner and not rel.endswith(MANIFEST_NAME):  # upload once the winner committed
            _wait_for([sync / f"committed-{trial}"], "committed", 10.0)
        done = put(rel, data, **kw)
        if index == winner and rel.endswith(MANIFEST_NAME):
            (sync / f"committed-{trial}").touch()
        return done

    store.exists = checked_exists  # type: ignore[method-assign]
    store.put = ordered_put  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--first-trial", type=int, default=0)
    parser.add_argument("--sync", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--derive", action="store_true", help="derive the attempt anew in every trial")
    parser.add_argument(
        "--race", type=int, default=0, help="trials that force a slow writer's uploads after the commit"
    )
    args = parser.parse_args()
    config = Config.from_env()
    if args.derive:
        config = config.with_changes(attempt=None)
    torch.set_num_threads(1)
    results = []
    for trial in range(args.first_trial, args.first_trial + args.trials):
        state = _state(1000 * trial + args.index)
        _barrier(args.sync, f"start-{trial}", args.index, args.peers)
        ckpt = Checkpointer.from_config(config)
        attempt = ckpt.attempt  # derived here with --derive: every peer derives before any peer saves
        _barrier(args.sync, f"derived-{trial}", args.index, args.peers)
        if trial < args.first_trial + args.race:
            _race(ckpt, args.sync, trial, args.index, args.peers)
        result: dict[str, Any] = {"trial": trial, "index": args.index, "attempt": attempt, "step": 10 * trial}
        try:
            info = ckpt.save(10 * trial, state)
            files = {name: [e.size, e.crc32c] for name, e in info.manifest.files.items()}
            result.update(committed=True, files=files)
        except CheckpointError as exc:
            result.update(committed=False, error=f"{type(exc).__name__}: {exc}")
        results.append(result)
        _barrier(args.sync, f"saved-{trial}", args.index, args.peers)
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("PODTRAIN_LOG_LEVEL", "warning")
    main()
