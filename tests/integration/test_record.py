"""The run record across real attempts: a SIGTERM'd attempt pushes its outputs and records itself, the resumed
one adds its own entry, and `podtrain record` shows both — on S3, GCS and file://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdk.lifecycle import runrecord as record
from sdk.stores.store import open_store

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
TRAIN = Path(__file__).resolve().parents[1] / "e2e" / "chaos_train.py"


def _attempt(env: dict[str, str], tmp_path: Path, *, preempt_after: int | None) -> int:
    progress = tmp_path / "progress.txt"
    progress.write_text("")
    argv = [PODTRAIN, "run", "--", sys.executable, str(TRAIN), "--steps", "80", "--every", "10", "--sleep", "0.02"]
    argv += ["--progress", str(progress), "--weights", str(tmp_path / "final.pt")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if preempt_after is not None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            steps = [int(line) for line in progress.read_text().splitlines() if line.isdigit()]
            if steps and steps[-1] >= preempt_after:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, 75), stderr
    return proc.returncode


@pytest.mark.parametrize("backend", ["s3", "gcs", "file"])
def test_a_preempted_attempt_and_its_resumption_share_one_record(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Attempt 1 gets a real SIGTERM: exits 75, its metrics so far are pushed, its entry says preempted with the
    steps it made. Attempt 2 resumes where 1 committed and succeeds. The record holds both, in order."""
    base = str(request.getfixturevalue(f"{backend}_url"))  # its fixture points AWS_*/STORAGE_EMULATOR_HOST here
    env = {
        **os.environ,
        "PODTRAIN_RUN_ID": "rec-1",
        "PODTRAIN_CHECKPOINT_URI": f"{base}/ckpt",
        "PODTRAIN_ARTIFACT_URI": f"{base}/artifacts",
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "out"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "termination"),
        "PODTRAIN_GRACE_SECONDS": "30",
        "PODTRAIN_NODE_NAME": "gpu-node-7",
        "PODTRAIN_LOG_FORMAT": "json",
    }
    assert _attempt(env, tmp_path, preempt_after=25) == 75
    run_url = f"{base}/artifacts/rec-1"
    pushed = open_store(run_url).get("metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in pushed][:2] == [10, 20], "metrics so far went up on preemption"
    (first,) = record.read(run_url)["attempts"]
    assert (first["attempt"], first["outcome"], first["exit_code"], first["node"]) == (1, "preempted", 75, "gpu-node-7")
    assert first["resumed_from"] == 0 and first["last_step"] >= 25
    assert first["steps_done"] == first["last_step"] and first["checkpoint_step"] == first["last_step"]
    assert first["steps_lost"] == 0, "the emergency save committed the step the loop reached"
    assert first["artifacts_files"] >= 1 and first["wall_seconds"] > 0

    assert _attempt(env, tmp_path, preempt_after=None) == 0
    shown = subprocess.run([PODTRAIN, "record", run_url, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    merged = json.loads(shown.stdout)
    assert [(e["attempt"], e["outcome"]) for e in merged["attempts"]] == [(1, "preempted"), (2, "succeeded")]
    second = merged["attempts"][1]
    assert second["resumed_from"] == first["checkpoint_step"] and second["last_step"] == 80
    assert second["resumed_from_url"].startswith(f"{base}/ckpt") and first["resumed_from_url"] is None
    assert merged["totals"]["preemptions"] == 1 and merged["totals"]["last_step"] == 80
    assert json.loads(open_store(run_url).get("run.json"))["attempts"] == merged["attempts"]
    table = subprocess.run([PODTRAIN, "record", run_url], env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "preempted" in table.stdout and "succeeded" in table.stdout
    assert "total: 2 attempts, 1 preempted" in table.stdout


def test_podtrain_record_says_so_when_a_run_has_no_record(tmp_path: Path) -> None:
    """No attempt wrote under the URI: exit 1 with a message naming it."""
    done = subprocess.run([PODTRAIN, "record", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no run record under" in done.stderr
