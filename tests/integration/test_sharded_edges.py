"""Edge cases of sharded saves with real ranks: torchrun, gloo, CPU (the worker says what each rank checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKER = str(Path(__file__).with_name("sharded_edge_worker.py"))


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The worker's folder and what each of its 2 ranks saw (one torchrun for every case of the worker)."""
    root = tmp_path_factory.mktemp("edges")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, str(root)],
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return root, [json.loads((root / f"rank-{r}.json").read_text()) for r in (0, 1)]


def test_a_rank_that_cannot_plan_makes_every_rank_fail_alike_and_an_unstepped_optimizer_is_not_stepped(
    edges: tuple[Path, list[dict[str, Any]]],
) -> None:
    """A planning failure on one rank is every rank's one-line CheckpointError, never a hang in a collective;
    saving before the optimizer's first step leaves it without state and saves it per rank."""
    root, seen = edges
    assert seen[0]["owner"] == seen[1]["owner"]
    assert seen[0]["owner"].startswith("the sharded save could not be planned (rank 1): optimizer 'optimizer'")
    assert not (root / "owner").exists() or not list((root / "owner").rglob("MANIFEST.json"))
    for rank_seen in seen:
        assert rank_seen["unstepped_state"] == 0, "a save must not step the optimizer"
        assert rank_seen["unstepped_sharded"] == ["model"]


def test_damage_one_rank_finds_while_the_other_copies_its_shards_in_stops_both_and_the_next_load_skips_it(
    edges: tuple[Path, list[dict[str, Any]]],
) -> None:
    """The only checkpoint, damaged where only rank 1 reads: both ranks raise PartlyLoadedError (none starts fresh
    from a half-written model, none hangs), the range is marked, and the next load skips it on both before
    writing."""
    root, seen = edges
    for rank_seen in seen:
        first, second = rank_seen["midload"]
        assert first.startswith("PartlyLoadedError: a checkpoint under"), rank_seen["midload"]
        assert second == "loaded None", rank_seen["midload"]
    assert list((root / "midload").rglob("INVALID.json")), "the damaged range was not marked"


OVERLAP_WORKER = str(Path(__file__).with_name("sharded_overlap_worker.py"))


def test_overlap_mode_saves_the_sharded_state_of_the_checkpointed_step_though_the_next_steps_follow_at_once(
    tmp_path: Path,
) -> None:
    """Overlap mode defers the copies of FSDP2's sharded parameters and Adam's moments to the background and the
    next step's pre-hook: stepping twice right after checkpoint(3) must not leak steps 4 and 5 into step 3."""
    import torch

    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            OVERLAP_WORKER,
            str(tmp_path),
        ],
        check=True,
        timeout=240,
        capture_output=True,
    )
    saved = torch.load(tmp_path / "at-3.pt", weights_only=True)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert loaded["step"] == 3
    assert saved["model"].keys() == loaded["model"].keys() and saved["optimizer"]
    assert all(torch.equal(saved["model"][k], loaded["model"][k]) for k in saved["model"])
    assert all(
        torch.equal(moments[name], loaded["optimizer"][param][name])
        for param, moments in saved["optimizer"].items()
        for name in moments
    )
