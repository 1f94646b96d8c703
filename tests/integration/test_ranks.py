"""Several ranks under `podtrain run`: torchrun with gloo on CPU, 2 ranks, real SIGTERM, exact resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.stores.store import open_store

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
STEPS = 160


def _torchrun(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        WORKER,
        "--steps",
        str(STEPS),
        "--every",
        "20",
        "--out",
        str(out),
        *extra,
    ]


def _env(tmp: Path, attempt: int, uri: str, run_id: str = "ddp") -> dict[str, str]:
    """The environment of one attempt of a job of several ranks (test_sharded's jobs use it too)."""
    return {
        **os.environ,
        "PODTRAIN_RUN_ID": run_id,
        "PODTRAIN_ATTEMPT": str(attempt),
        "PODTRAIN_CHECKPOINT_URI": uri,
        "PODTRAIN_OUTPUT_DIR": str(tmp / "output"),
        "PODTRAIN_ARTIFACT_URI": str(tmp / "artifacts"),
        "PODTRAIN_GRACE_SECONDS": "20",
        "PODTRAIN_TERMINATION_LOG": str(tmp / f"termination-{attempt}"),
        "PODTRAIN_LOG_LEVEL": "warning",
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("reference")
    subprocess.run(_torchrun(tmp), env=_env(tmp, 1, (tmp / "ckpt").as_uri()), check=True, timeout=240)
    return torch.load(tmp / "final.pt", weights_only=True)


def test_two_ranks_stop_on_the_same_step_commit_it_once_and_resume_exactly(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """SIGTERM mid-training: both ranks stop at one step, rank 0 commits it once with both ranks' files, exit 75;
    the next attempt resumes every rank from it and ends bitwise equal to an uninterrupted run."""
    uri = (tmp_path / "ckpt").as_uri()
    out1 = tmp_path / "attempt-1"
    out1.mkdir()
    cmd = [sys.executable, "-m", "entrypoint", "run", "--", *_torchrun(out1, "--sleep", "0.03")]
    proc = subprocess.Popen(cmd, env=_env(tmp_path, 1, uri), start_new_session=True, stderr=subprocess.PIPE, text=True)
    give_up = time.monotonic() + 180
    while not list((tmp_path / "ckpt").glob("step-*/MANIFEST.json")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < give_up, "no checkpoint within 180 s"
        time.sleep(0.1)
    time.sleep(0.4)  # a few steps past the first policy save
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr[-3000:]
    assert time.monotonic() - sent < 20

    reports = [json.loads((out1 / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["stopped"] and reports[1]["stopped"]
    assert reports[0]["done"] == reports[1]["done"], reports
    stop_step = reports[0]["done"]
    assert stop_step < STEPS

    newest = Checkpointer(uri, attempt=9, world_size=2).list()[0]
    assert newest.step == stop_step, "the step both ranks stopped on is the committed one"
    assert newest.manifest.world_size == 2
    names = set(newest.manifest.files)
    (writer,) = {n.split("/", 1)[0] for n in names}  # both ranks' files in one writer folder, the job's own
    assert re.fullmatch(r"attempt-1-[0-9a-f]{12}", writer), writer
    # The DDP model and its optimizer are sharded state, written once between the ranks and indexed by rank 0;
    # the data position and the RNG streams stay per rank.
    assert newest.manifest.sharded == ("model", "optimizer")
    assert f"{writer}/sharded.json" in names
    for rank in (0, 1):
        assert {f"{writer}/rank-{rank}/{n}" for n in ("loader.pt", "rng.pt")} <= names
        assert any(n.startswith(f"{writer}/rank-{rank}/sharded.") for n in names), "each rank writes its share"
    folder = f"step-{stop_step:010d}"
    assert {"rank-0.json", "rank-1.json"} <= set(open_store(uri).list(f"{folder}/{writer}"))
    message = json.loads((tmp_path / "termination-1").read_text())
    assert message["outcome"] == "preempted" and message["step"] == stop_step

    out2 = tmp_path / "attempt-2"
    out2.mkdir()
    subprocess.run(_torchrun(out2), env=_env(tmp_path, 2, uri), check=True, timeout=240)
    resumed = [json.loads((out2 / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert resumed[0]["start"] == resumed[1]["start"] == stop_step
    final = torch.load(out2 / "final.pt", weights_only=True)
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_an_entry_every_rank_saved_alike_loads_on_another_number_of_ranks(tmp_path: Path) -> None:
    """Per-rank files that are the same on every saving rank (a replica) load on any number of ranks."""
    uri = (tmp_path / "ckpt").as_uri()
    model = torch.nn.Linear(2, 2)
    for rank in (1, 0):  # rank 1's record first, then rank 0 gathers both and commits
        Checkpointer(uri, attempt=1, world_size=2, rank=rank).save(5, {"model": model})
    for world_size, rank in ((1, 0), (3, 2)):
        restored = torch.nn.Linear(2, 2)
        assert Checkpointer(uri, attempt=2, world_size=world_size, rank=rank).load({"model": restored}) == 5
        assert torch.equal(restored.weight, model.weight)


def test_an_entry_that_differs_across_ranks_is_refused_on_another_number_with_what_to_fix(tmp_path: Path) -> None:
    """An entry each rank saved differently, whose object cannot merge the ranks' states, is an error naming
    the entry and the saving WORLD_SIZE — not a fallback, and not one rank's state silently taken for all."""
    from sdk.errors import CheckpointError

    uri = (tmp_path / "ckpt").as_uri()
    for rank in (1, 0):
        Checkpointer(uri, attempt=1, world_size=2, rank=rank).save(5, {"counter": {"rank": rank}})
    with pytest.raises(CheckpointError, match=r"'counter' differs across the 2 ranks.*WORLD_SIZE=2"):
        Checkpointer(uri, attempt=2).load({"counter": {}})
    restored: dict[str, int] = {}
    assert Checkpointer(uri, attempt=2, world_size=2, rank=1).load({"counter": restored}) == 5
    assert restored == {"rank": 1}


def test_a_resume_that_cannot_fit_the_state_exits_2_with_one_line(tmp_path: Path) -> None:
    """Under `sdk.init()`, a checkpoint whose per-rank entry cannot be resumed on this number of ranks is a
    setting to fix, not a crash: exit 2 (never retried) and one line naming the entry — no traceback."""
    uri = (tmp_path / "ckpt").as_uri()
    for rank in (1, 0):
        Checkpointer(uri, attempt=1, world_size=2, rank=rank).save(5, {"counter": {"rank": rank}})
    script = "import sdk\nwith sdk.init() as run:\n    run.resume({'counter': {}})\n"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PODTRAIN_")},
        "PODTRAIN_CHECKPOINT_URI": uri,
        "PODTRAIN_RUN_ID": "mismatch",
        "PODTRAIN_ATTEMPT": "2",
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "output"),
        "PODTRAIN_LOG_LEVEL": "error",
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("podtrain: ")]
    assert "state 'counter' differs across the 2 ranks" in line and "WORLD_SIZE=2" in line
