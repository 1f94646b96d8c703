"""podtrain_pl.fit as a pod runs it: `podtrain run`, a real SIGTERM, fresh processes, and two ranks under torchrun.

Every attempt is a new process tree started the way the pod starts it (``python -m entrypoint run -- …``) on a
file:// store, in its own session so the signal never reaches pytest. The worker (pl_worker.py) is a user's
script: their Trainer, ``podtrain_pl.fit(run, trainer, model, datamodule=dm)`` inside ``sdk.init()``, one sleep per
batch so that the signal lands mid-run. The references are the same Trainer run by Lightning alone (``--plain``).

Two ranks are started by torchrun, under ``podtrain run``, with the Trainer's DDP strategy (gloo on CPU): that is
the way a user runs Lightning in a pod, since podtrain's ``sdk.init()`` needs every rank's ``RANK``/``WORLD_SIZE``
before the Trainer exists, and Lightning's own launcher would start the other ranks only inside ``fit()``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from safetensors.torch import load_file

from sdk.checkpoints.checkpointer import Checkpointer
from tests.integrations._processes import REPO, STEPS, Worker, assert_equal, reports

WORKER = Worker("pl_worker.py", run_id="pl", framework="Lightning")
_env, _worker, _reference, _preempted, _resumed = (
    WORKER.env,
    WORKER.argv,
    WORKER.reference,
    WORKER.preempted,
    WORKER.resumed,
)
_reports, _assert_equal = reports, assert_equal


def test_sigterm_under_podtrain_run_exits_75_and_a_fresh_process_ends_bitwise_equal(tmp_path: Path) -> None:
    """A real SIGTERM to `podtrain run`: Lightning stops after the step it was in, that step is committed (its
    manifest marked as the stop's), exit 75 with the termination message naming it; `podtrain checkpoints verify`
    passes on it; attempt 2, a fresh process, resumes there and exports weights torch.equal to the uninterrupted
    run's."""
    reference = _reference(tmp_path, 1)
    proc, stderr = _preempted(tmp_path, 1)
    assert proc.returncode == 75, stderr[-3000:]
    assert "SIGTERMException" not in stderr and "Received SIGTERM" not in stderr  # Lightning's handler never ran
    (report,) = _reports(tmp_path / "attempt-1", 1)
    stop = report["done"]
    assert report["stopped"] and isinstance(stop, int) and 5 < stop < STEPS, report
    newest = Checkpointer((tmp_path / "ckpt").as_uri(), attempt=99).list()[0]
    assert newest.step == stop and newest.manifest.meta.get("emergency") is True
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["outcome"] == "preempted" and message["step"] == stop, message
    verify = subprocess.run(
        [sys.executable, "-m", "entrypoint", "checkpoints", "verify", (tmp_path / "ckpt").as_uri()],
        env=_env(tmp_path, "pl"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and f"step {stop}" in verify.stdout, verify.stdout + verify.stderr

    second = _resumed(tmp_path, 1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _reports(tmp_path / "attempt-2", 1) == [{"start": stop, "done": STEPS, "stopped": False}]
    _assert_equal(load_file(tmp_path / "output" / "export" / "model.safetensors"), reference)


@pytest.mark.slow  # ~60 s on 2 loaded cores: four runs of two ranks and one of one
def test_two_ranks_stop_at_one_step_commit_it_once_and_resume_exactly(tmp_path: Path) -> None:
    """torchrun, 2 ranks, Lightning's DDP on gloo, SIGTERM to `podtrain run`: both ranks stop at the same step,
    rank 0 commits it once with both ranks' files in one writer folder (the DDP model and AdamW saved sharded, once),
    exit 75; attempt 2 resumes both ranks there and ends torch.equal to the uninterrupted 2-rank run; a single
    process is refused that checkpoint."""
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
    assert {"model", "optimizer"} <= set(newest.manifest.sharded)
    (writer,) = {name.split("/", 1)[0] for name in newest.manifest.files}
    assert re.fullmatch(r"attempt-1-[0-9a-f]{12}", writer), writer
    for rank in (0, 1):
        assert {f"{writer}/rank-{rank}/{n}.pt" for n in ("trainer", "rng")} <= set(newest.manifest.files)
    assert len(list((tmp_path / "ckpt" / f"step-{stop:010d}").glob("MANIFEST.json"))) == 1

    second = _resumed(tmp_path, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["start"] for r in _reports(tmp_path / "attempt-2", 2)] == [stop, stop]
    _assert_equal(load_file(tmp_path / "output" / "export" / "model.safetensors"), reference)

    # One process cannot continue 2 ranks' run exactly (each rank's DataLoader position is its share of the data):
    # exit 2, never retried, one line with the WORLD_SIZE to use.
    single = _resumed(tmp_path, 1)
    assert single.returncode == 2, single.stderr[-3000:]
    line = single.stderr.strip().splitlines()[-1]
    assert line.startswith("podtrain: ") and "resume with WORLD_SIZE=2" in line, line


def test_the_example_trains_checkpoints_and_exports(tmp_path: Path) -> None:
    """examples/train_lightning.py as its docstring runs it (a local corpus, a few steps): exit 0, the
    ModelCheckpoint cadence committed through podtrain, and an export with the model's hyperparameters."""
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
    script = [str(REPO / "examples" / "train_lightning.py"), "--data", str(data), "--steps", "6", "--save-steps", "3"]
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
    sidecar = json.loads((tmp_path / "output" / "export" / "model.json").read_text())
    assert sidecar["step"] == 6 and sidecar["hparams"]["context"] == 32
    assert (tmp_path / "output" / "export" / "model.safetensors").stat().st_size > 0
