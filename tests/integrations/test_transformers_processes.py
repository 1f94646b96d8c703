"""podtrain_hf.train as a pod runs it: `podtrain run`, a real SIGTERM, fresh processes, and two ranks under torchrun.

Every attempt is a new process tree started the way the pod starts it (``python -m entrypoint run -- …``) on a
file:// store, in its own session so the signal never reaches pytest. The worker (hf_worker.py) is a user's
script: their Trainer, ``podtrain_hf.train(run, trainer)`` inside ``sdk.init()``, one sleep per step so that the
signal lands mid-run. The references are the same Trainer run by Transformers alone (``--plain``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file

from sdk.checkpoints.checkpointer import Checkpointer
from tests.integrations._processes import REPO, STEPS, Worker, assert_equal, reports

WORKER = Worker("hf_worker.py", run_id="hf", framework="Transformers")
_env, _worker, _reference, _preempted, _resumed = (
    WORKER.env,
    WORKER.argv,
    WORKER.reference,
    WORKER.preempted,
    WORKER.resumed,
)
_reports, _assert_equal = reports, assert_equal


def test_sigterm_under_podtrain_run_exits_75_and_a_fresh_process_ends_bitwise_equal(tmp_path: Path) -> None:
    """A real SIGTERM to `podtrain run`: the Trainer stops after the step it was in, that step is committed (its
    manifest marked as the stop's), exit 75 with the termination message naming it; `podtrain checkpoints verify`
    passes on it; attempt 2, a fresh process, resumes there and exports weights torch.equal to the uninterrupted
    run's."""
    reference = _reference(tmp_path, 1)
    proc, stderr = _preempted(tmp_path, 1)
    assert proc.returncode == 75, stderr[-3000:]
    (report,) = _reports(tmp_path / "attempt-1", 1)
    stop = report["done"]
    assert report["stopped"] and isinstance(stop, int) and 5 < stop < STEPS, report
    newest = Checkpointer((tmp_path / "ckpt").as_uri(), attempt=99).list()[0]
    assert newest.step == stop and newest.manifest.meta.get("emergency") is True
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["outcome"] == "preempted" and message["step"] == stop, message
    verify = subprocess.run(
        [sys.executable, "-m", "entrypoint", "checkpoints", "verify", (tmp_path / "ckpt").as_uri()],
        env=_env(tmp_path, "hf"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and f"step {stop}" in verify.stdout, verify.stdout + verify.stderr

    second = _resumed(tmp_path, 1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _reports(tmp_path / "attempt-2", 1) == [{"start": stop, "done": STEPS, "stopped": False}]
    _assert_equal(load_file(tmp_path / "output" / "export" / "model.safetensors"), reference)


def test_two_ranks_stop_at_one_step_commit_it_once_and_resume_exactly(tmp_path: Path) -> None:
    """torchrun, 2 ranks on gloo, SIGTERM to `podtrain run`: both ranks' Trainers stop at the same step, rank 0
    commits it once with both ranks' files in one writer folder, exit 75; attempt 2 resumes both ranks there and
    ends torch.equal to the uninterrupted 2-rank run; a single process is refused that checkpoint."""
    reference = _reference(tmp_path, 2)
    proc, stderr = _preempted(tmp_path, 2)
    assert proc.returncode == 75, stderr[-3000:]
    reports = _reports(tmp_path / "attempt-1", 2)
    assert reports[0]["stopped"] and reports[1]["stopped"], reports
    assert reports[0]["done"] == reports[1]["done"], reports
    stop = reports[0]["done"]
    assert isinstance(stop, int) and stop < STEPS

    uri = (tmp_path / "ckpt").as_uri()
    newest = Checkpointer(uri, attempt=99, world_size=2).list()[0]
    assert newest.step == stop and newest.manifest.world_size == 2
    (writer,) = {name.split("/", 1)[0] for name in newest.manifest.files}
    assert re.fullmatch(r"attempt-1-[0-9a-f]{12}", writer), writer
    for rank in (0, 1):
        assert {f"{writer}/rank-{rank}/{n}.pt" for n in ("trainer", "optimizer", "rng")} <= set(newest.manifest.files)
    assert len(list((tmp_path / "ckpt" / f"step-{stop:010d}").glob("MANIFEST.json"))) == 1

    second = _resumed(tmp_path, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["start"] for r in _reports(tmp_path / "attempt-2", 2)] == [stop, stop]
    _assert_equal(load_file(tmp_path / "output" / "export" / "model.safetensors"), reference)

    # One process cannot continue 2 ranks' run exactly (the Trainer counts consumed data in steps of both ranks'
    # batches): exit 2, never retried, one line with the WORLD_SIZE to use.
    single = _resumed(tmp_path, 1)
    assert single.returncode == 2, single.stderr[-3000:]
    line = single.stderr.strip().splitlines()[-1]
    assert line.startswith("podtrain: ") and "resume with WORLD_SIZE=2" in line, line


def test_the_example_trains_checkpoints_and_exports_a_folder_from_pretrained_loads(tmp_path: Path) -> None:
    """examples/train_hf.py as its docstring runs it (a local corpus, a few steps): exit 0, the Trainer's cadence
    committed, and an export that GPT2LMHeadModel.from_pretrained loads."""
    from transformers import GPT2LMHeadModel

    env = _env(tmp_path, "example")
    data = tmp_path / "data"
    made = subprocess.run(
        [sys.executable, str(REPO / "examples" / "dataset.py"), "--out", str(data), "--mib", "0.0625"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    script = [str(REPO / "examples" / "train_hf.py"), "--data", str(data), "--steps", "6", "--save-steps", "3"]
    proc = subprocess.run(
        [sys.executable, *script, "--batch-size", "4", "--context", "32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 6
    assert [c.step for c in Checkpointer((tmp_path / "ckpt").as_uri(), attempt=99).list()] == [6, 3]
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "output" / "export")
    assert model.config.n_positions == 32
