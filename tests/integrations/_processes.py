"""A framework worker script run as a user runs it: alone (the uninterrupted reference), under ``podtrain run`` and
stopped by a real SIGTERM a few steps after its first commit, and resumed in a fresh process; one or several ranks
(``torch.distributed.run``). The workers (``hf_worker.py``, ``pl_worker.py``) take ``--out DIR --steps N``,
``--plain`` (the framework alone) and ``--sleep S`` (seconds per step, so a SIGTERM lands mid-run), write
``rank-<r>.json`` reports (``start``, ``done``, ``stopped``) and, with ``--plain``, ``final.pt``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file

from sdk.checkpoints.checkpointer import Checkpointer

__all__ = ["REPO", "STEPS", "ProcessContract", "Worker", "assert_equal", "reports"]

REPO = Path(__file__).resolve().parents[2]
STEPS = 60


class Worker:
    """``script`` (a worker file beside this one) run for ``run_id``; ``framework`` names it in messages."""

    def __init__(self, script: str, *, run_id: str, framework: str) -> None:
        self.script = str(Path(__file__).with_name(script))
        self.run_id, self.framework = run_id, framework

    def env(self, tmp: Path, run_id: str | None = None) -> dict[str, str]:
        """The environment contract for a run under ``tmp`` (file:// checkpoints and artifacts), no other
        ``PODTRAIN_*`` of the caller's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PODTRAIN_")}
        return {
            **env,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
            "PODTRAIN_RUN_ID": run_id or self.run_id,
            "PODTRAIN_CHECKPOINT_URI": (tmp / "ckpt").as_uri(),
            "PODTRAIN_OUTPUT_DIR": str(tmp / "output"),
            "PODTRAIN_ARTIFACT_URI": (tmp / "artifacts").as_uri(),
            "PODTRAIN_GRACE_SECONDS": "30",
            "PODTRAIN_TERMINATION_LOG": str(tmp / "termination-log"),
            "PODTRAIN_LOG_LEVEL": "warning",
        }

    def argv(self, ranks: int, out: Path, *extra: str) -> list[str]:
        head = [sys.executable]
        if ranks > 1:
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        return [*head, self.script, "--out", str(out), "--steps", str(STEPS), *extra]

    def reference(self, tmp: Path, ranks: int) -> dict[str, torch.Tensor]:
        """The final weights of the same Trainer, uninterrupted, the framework alone, on ``ranks`` processes."""
        out = tmp / "plain"
        proc = subprocess.run(
            self.argv(ranks, out, "--plain"), env=self.env(tmp, "plain"), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"{self.framework} alone failed: {proc.stderr[-3000:]}"
        return dict(torch.load(out / "final.pt", weights_only=True))

    def preempted(self, tmp: Path, ranks: int) -> tuple[subprocess.Popen[str], str]:
        """Attempt 1 under `podtrain run`, SIGTERM a few steps after its first commit: (process, stderr)."""
        cmd = [sys.executable, "-m", "entrypoint", "run", "--", *self.argv(ranks, tmp / "attempt-1", "--sleep", "0.05")]
        proc = subprocess.Popen(
            cmd, env=self.env(tmp), cwd=tmp, start_new_session=True, stderr=subprocess.PIPE, text=True
        )
        give_up = time.monotonic() + 240
        while not list((tmp / "ckpt").glob("step-*/MANIFEST.json")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < give_up, "no checkpoint within 240 s"
            time.sleep(0.1)
        time.sleep(0.4)  # a few steps past the first save (step 5)
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        assert time.monotonic() - sent < 30, "the stop took longer than the grace period"
        return proc, stderr

    def resumed(self, tmp: Path, ranks: int) -> subprocess.CompletedProcess[str]:
        """Attempt 2 under `podtrain run`, a fresh process, to the end."""
        cmd = [sys.executable, "-m", "entrypoint", "run", "--", *self.argv(ranks, tmp / "attempt-2")]
        return subprocess.run(cmd, env=self.env(tmp), cwd=tmp, capture_output=True, text=True, timeout=300)


def reports(out: Path, ranks: int) -> list[dict[str, object]]:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(ranks)]


def assert_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    diverged = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diverged, f"{len(diverged)} tensors differ from the uninterrupted run, e.g. {diverged[0]}"


class ProcessContract:
    """The process tests every framework integration passes, subclassed per framework (``Test…Processes`` in
    ``test_*_processes.py``) with its worker, the per-rank files its 2-rank checkpoint holds, the entries it saves
    sharded, its example script and how that example's export is checked."""

    worker: ClassVar[Worker]
    rank_files: ClassVar[tuple[str, ...]]
    sharded: ClassVar[frozenset[str]] = frozenset()
    example: ClassVar[str]  # a script in examples/

    def check_stderr(self, stderr: str) -> None:
        """What the framework must not have printed when podtrain stopped it (default: nothing to check)."""

    def check_export(self, export: Path) -> None:
        """The example's export folder is what the framework's users load."""
        raise NotImplementedError

    def test_sigterm_under_podtrain_run_exits_75_and_a_fresh_process_ends_bitwise_equal(self, tmp_path: Path) -> None:
        """A real SIGTERM to `podtrain run`: the framework stops after the step it was in, that step is committed
        (its manifest marked as the stop's), exit 75 with the termination message naming it; `podtrain checkpoints
        verify` passes on it; attempt 2, a fresh process, resumes there and exports weights torch.equal to the
        uninterrupted run's."""
        reference = self.worker.reference(tmp_path, 1)
        proc, stderr = self.worker.preempted(tmp_path, 1)
        assert proc.returncode == 75, stderr[-3000:]
        self.check_stderr(stderr)
        (report,) = reports(tmp_path / "attempt-1", 1)
        stop = report["done"]
        assert report["stopped"] and isinstance(stop, int) and 5 < stop < STEPS, report
        newest = Checkpointer((tmp_path / "ckpt").as_uri(), attempt=99).list()[0]
        assert newest.step == stop and newest.manifest.meta.get("emergency") is True
        message = json.loads((tmp_path / "termination-log").read_text())
        assert message["outcome"] == "preempted" and message["step"] == stop, message
        verify = subprocess.run(
            [sys.executable, "-m", "entrypoint", "checkpoints", "verify", (tmp_path / "ckpt").as_uri()],
            env=self.worker.env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verify.returncode == 0 and f"step {stop}" in verify.stdout, verify.stdout + verify.stderr

        second = self.worker.resumed(tmp_path, 1)
        assert second.returncode == 0, second.stderr[-3000:]
        assert reports(tmp_path / "attempt-2", 1) == [{"start": stop, "done": STEPS, "stopped": False}]
        assert_equal(load_file(tmp_path / "output" / "export" / "model.safetensors"), reference)

    def test_two_ranks_stop_at_one_step_commit_it_once_and_resume_exactly(self, tmp_path: Path) -> None:
        """torchrun, 2 ranks on gloo, SIGTERM to `podtrain run`: both ranks stop at the same step, rank 0 commits it
        once with both ranks' files in one writer folder (what the framework shards, saved sharded once), exit 75;
        attempt 2 resumes both ranks there and ends torch.equal to the uninterrupted 2-rank run; a single process is
        refused that checkpoint: exit 2, never retried, one line with the WORLD_SIZE to use."""
        reference = self.worker.reference(tmp_path, 2)
        proc, stderr = self.worker.preempted(tmp_path, 2)
        assert proc.returncode == 75, stderr[-3000:]
        first = reports(tmp_path / "attempt-1", 2)
        assert first[0]["stopped"] and first[1]["stopped"], first
        assert first[0]["done"] == first[1]["done"], first
        stop = first[0]["done"]
        assert isinstance(stop, int) and stop < STEPS

        newest = Checkpointer((tmp_path / "ckpt").as_uri(), attempt=99, world_size=2).list()[0]
        assert newest.step == stop and newest.manifest.world_size == 2
        assert self.sharded <= set(newest.manifest.sharded)
        (writer,) = {name.split("/", 1)[0] for name in newest.manifest.files}
        assert re.fullmatch(r"attempt-1-[0-9a-f]{12}", writer), writer
        for rank in (0, 1):
            assert {f"{writer}/rank-{rank}/{n}.pt" for n in self.rank_files} <= set(newest.manifest.files)
        assert len(list((tmp_path / "ckpt" / f"step-{stop:010d}").glob("MANIFEST.json"))) == 1

        second = self.worker.resumed(tmp_path, 2)
        assert second.returncode == 0, second.stderr[-3000:]
        assert [r["start"] for r in reports(tmp_path / "attempt-2", 2)] == [stop, stop]
        assert_equal(load_file(tmp_path / "output" / "export" / "model.safetensors"), reference)

        single = self.worker.resumed(tmp_path, 1)
        assert single.returncode == 2, single.stderr[-3000:]
        line = single.stderr.strip().splitlines()[-1]
        assert line.startswith("podtrain: ") and "resume with WORLD_SIZE=2" in line, line

    def test_the_example_trains_checkpoints_and_exports(self, tmp_path: Path) -> None:
        """The example as its docstring runs it (a local corpus, a few steps): exit 0, the framework's save cadence
        committed through podtrain, and an export its users load (``check_export``)."""
        env = self.worker.env(tmp_path, "example")
        data = tmp_path / "data"
        made = subprocess.run(
            [sys.executable, str(REPO / "examples" / "dataset.py"), "--out", str(data), "--mib", "0.0625"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert made.returncode == 0, made.stderr[-2000:]
        script = [str(REPO / "examples" / self.example), "--data", str(data), "--steps", "6", "--save-steps", "3"]
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
        self.check_export(tmp_path / "output" / "export")
