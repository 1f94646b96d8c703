"""A framework worker script run as a user runs it: alone (the uninterrupted reference), under ``podtrain run`` and
stopped by a real SIGTERM a few steps after its first commit, and resumed in a fresh process; one or several ranks
(``torch.distributed.run``). The workers (``hf_worker.py``, ``pl_worker.py``) take ``--out DIR --steps N``,
``--plain`` (the framework alone) and ``--sleep S`` (seconds per step, so a SIGTERM lands mid-run), write
``rank-<r>.json`` reports (``start``, ``done``, ``stopped``) and, with ``--plain``, ``final.pt``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["REPO", "STEPS", "Worker", "assert_equal", "reports"]

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
