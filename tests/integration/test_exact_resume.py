"""Exact resume: a seeded CPU run, interrupted and resumed in fresh processes, ends bitwise equal to an unbroken one.

Every run is a real subprocess (resume_worker.py) on the real Checkpointer with a file:// store. The model (an
MLP with dropout), Adam, a OneCycle schedule, the data position (ResumableLoader shuffled from the global RNG,
with numpy/python augmentation in the dataset) and the python/numpy/torch RNGs must all come back exactly.

One run is interrupted three times, the way a spot job is preempted again and again: it stops mid-epoch, is
resumed by a fresh process that stops exactly at an epoch boundary, is resumed again and stops late, and a
fourth process finishes it. Each attempt is a new process that loads only what the previous one saved. The
uninterrupted reference runs alongside and never checkpoints, so saving must not disturb training either.
Every segment's losses are compared with the reference's, which names the resume that went wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS = 240
PER_EPOCH = 13  # resume_worker: 200 samples in batches of 16
STOPS = {"mid_epoch": 50, "epoch_boundary": 4 * PER_EPOCH, "late": 201}


def _run(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTRAIN_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--steps", str(STEPS), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"resume_worker {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")


def _interrupted_run(tmp_path: Path) -> list[dict[str, Any]]:
    """Attempt 1 stops at the first stop, each next attempt resumes and stops at the next; the last finishes."""
    url = (tmp_path / "ckpt").as_uri()
    segments = []
    for attempt, stop in enumerate([*STOPS.values(), None], start=1):
        out = tmp_path / f"attempt-{attempt}.pt"
        stop_args = ["--stop-at", str(stop)] if stop is not None else []
        _run("--ckpt", url, "--out", str(out), "--every", "20", "--attempt", str(attempt), *stop_args)
        segments.append(torch.load(out, weights_only=True))
    return segments


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted reference and the four attempts of the interrupted run, side by side."""
    tmp_path = tmp_path_factory.mktemp("exact-resume")
    reference = tmp_path / "reference.pt"
    with ThreadPoolExecutor(max_workers=2) as pool:
        ref_job = pool.submit(_run, "--ckpt", (tmp_path / "ckpt-ref").as_uri(), "--out", str(reference))
        segments_job = pool.submit(_interrupted_run, tmp_path)
        ref_job.result()
        segments = segments_job.result()
    return {"reference": torch.load(reference, weights_only=True), "segments": segments}


@pytest.mark.parametrize("index", range(len(STOPS)), ids=list(STOPS))
def test_each_resume_continues_exactly_where_the_run_stopped(runs: dict[str, Any], index: int) -> None:
    """The process started after each stop resumes at that step and loses exactly what the reference lost."""
    stop = list(STOPS.values())[index]
    before, after = runs["segments"][index], runs["segments"][index + 1]
    ref_losses = runs["reference"]["losses"]
    assert before["end"] == stop
    assert not before["finished"]
    assert after["start"] == stop, "the next process must resume from the interruption, not start over"
    assert after["losses"], "the resumed process ran no step"
    earlier = [s for s in sorted(before["losses"]) if before["losses"][s] != ref_losses[s]]
    diverged = [s for s in sorted(after["losses"]) if after["losses"][s] != ref_losses[s]]
    assert not diverged, f"resumed after step {stop}, losses diverge from step {diverged[0]} on" + (
        f" (the run had already diverged at step {earlier[0]}, before this stop)" if earlier else ""
    )


def test_interrupted_run_ends_bitwise_equal_to_uninterrupted(runs: dict[str, Any]) -> None:
    """After three interruptions the final weights and Adam state are torch.equal to the uninterrupted run's."""
    ref, last = runs["reference"], runs["segments"][-1]
    assert ref["finished"]
    assert last["finished"]
    assert last["start"] == STOPS["late"]
    assert last["epoch"] == ref["epoch"]
    assert ref["model"].keys() == last["model"].keys()
    for key, tensor in ref["model"].items():
        assert torch.equal(tensor, last["model"][key]), key
    assert ref["optimizer"]["state"].keys() == last["optimizer"]["state"].keys()
    for param, param_state in ref["optimizer"]["state"].items():
        for key, value in param_state.items():
            assert torch.equal(value, last["optimizer"]["state"][param][key]), (param, key)


def test_stops_cover_mid_epoch_boundary_and_late() -> None:
    """The interruption points are what the test claims: inside an epoch, exactly on a boundary, and late."""
    assert STOPS["mid_epoch"] % PER_EPOCH != 0
    assert STOPS["epoch_boundary"] % PER_EPOCH == 0
    assert STOPS["late"] > STEPS * 3 // 4
    assert STOPS["late"] % PER_EPOCH != 0
