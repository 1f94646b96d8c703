"""A real preemption: SIGTERM to `podtrain run` mid-training ends in an emergency checkpoint and exit 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdk.checkpoints.checkpointer import Checkpointer

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_mid_training_commits_the_current_step_and_exits_75(tmp_path: Path) -> None:
    """The supervisor forwards SIGTERM; train.py breaks on should_stop(), commits its step, and 75 names it."""
    store, term_log = tmp_path / "ckpt", tmp_path / "termination-log"
    env = {
        **os.environ,
        "PODTRAIN_RUN_ID": "pre",
        "PODTRAIN_ATTEMPT": "1",
        "PODTRAIN_CHECKPOINT_URI": store.as_uri(),
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "output"),
        "PODTRAIN_ARTIFACT_URI": str(tmp_path / "artifacts"),
        "PODTRAIN_GRACE_SECONDS": "30",
        "PODTRAIN_TERMINATION_LOG": str(term_log),
        "PODTRAIN_LOG_LEVEL": "warning",
    }
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(ROOT / "examples" / "dataset.py"), "--out", str(corpus)], check=True)
    train = [sys.executable, str(ROOT / "examples" / "train.py"), "--data", str(corpus), "--steps", "100000"]
    cmd = [sys.executable, "-m", "entrypoint", "run", "--", *train, "--checkpoint-every", "50"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(store.glob("step-*/MANIFEST.json")):  # training is under way once the first commit exists
        assert proc.poll() is None, "training ended before it was preempted"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    proc.communicate(timeout=60)
    assert proc.returncode == 75
    assert time.monotonic() - sent < 30  # inside the grace period
    message = json.loads(term_log.read_text())
    newest = Checkpointer(store.as_uri(), attempt=2).list()[0]
    assert message["outcome"] == "preempted"
    assert message["step"] == newest.step and message["checkpoint"] == newest.url
    # Usually the stop lands between policy saves and the emergency save commits that step; if it lands just
    # after a policy save of the very step the loop stops at, that checkpoint already holds it.
    if newest.step % 50:
        assert newest.manifest.meta == {"emergency": True}
    else:
        assert newest.manifest.meta == {}
