"""Exact resume: a seeded CPU run interrupted and continued in a fresh process ends bitwise equal to one that never stopped.

Each run is a real subprocess (resume_worker.py) using the real Checkpointer on a file:// store: the model
(MLP with dropout), Adam, a OneCycle schedule, the data position (ResumableLoader, shuffled from the global RNG)
and the python/numpy/torch RNGs all have to come back exactly for the final weights to be equal.
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
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"resume_worker {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")


def _interrupted_then_resumed(tmp_path: Path, name: str, stop: int) -> Path:
    url = (tmp_path / f"ckpt-{name}").as_uri()
    out = tmp_path / f"{name}.pt"
    _run("--ckpt", url, "--out", str(out), "--stop-at", str(stop), "--every", "20", "--attempt", "1")
    assert not out.exists(), "the interrupted run must stop before the end"
    _run("--ckpt", url, "--out", str(out), "--every", "20", "--attempt", "2")
    return out


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The uninterrupted run (never checkpointing) and the three interrupted-and-resumed runs, in parallel."""
    tmp_path = tmp_path_factory.mktemp("exact-resume")
    reference = tmp_path / "reference.pt"
    with ThreadPoolExecutor(max_workers=4) as pool:
        ref_job = pool.submit(_run, "--ckpt", (tmp_path / "ckpt-ref").as_uri(), "--out", str(reference))
        jobs = {name: pool.submit(_interrupted_then_resumed, tmp_path, name, stop) for name, stop in STOPS.items()}
        ref_job.result()
        results = {name: _load(job.result()) for name, job in jobs.items()}
    return {"reference": _load(reference), **results}


@pytest.mark.parametrize("name", list(STOPS))
def test_resumed_run_ends_bitwise_equal_to_uninterrupted(runs: dict[str, dict[str, Any]], name: str) -> None:
    """Interrupted mid-epoch, at an epoch boundary or late, a fresh process ends with torch.equal weights and Adam state."""
    ref, got = runs["reference"], runs[name]
    stop = STOPS[name]
    assert got["start"] == stop, "the second process must resume from the interruption, not start over"
    diverged = [s for s in range(stop + 1, STEPS + 1) if got["losses"][s] != ref["losses"][s]]
    assert not diverged, f"losses diverge from step {diverged[0]} on"
    assert got["epoch"] == ref["epoch"]
    assert ref["model"].keys() == got["model"].keys()
    for key, tensor in ref["model"].items():
        assert torch.equal(tensor, got["model"][key]), key
    for param, param_state in ref["optimizer"]["state"].items():
        for key, value in param_state.items():
            assert torch.equal(value, got["optimizer"]["state"][param][key]), (param, key)


def test_stops_cover_mid_epoch_boundary_and_late() -> None:
    """The interruption points are what the test claims: inside an epoch, exactly on a boundary, and late."""
    assert STOPS["mid_epoch"] % PER_EPOCH != 0
    assert STOPS["epoch_boundary"] % PER_EPOCH == 0
    assert STOPS["late"] > STEPS * 3 // 4
    assert STOPS["late"] % PER_EPOCH != 0
