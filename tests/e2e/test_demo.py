"""The README's quick start: `make demo` runs the whole flow (pull, train, SIGTERM, resume, push) and proves it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _demo(tmp_path: Path, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--workdir", str(tmp_path / "demo"), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def _check_summary(text: str, steps: int) -> None:
    assert "exit code 75 (75: preempted" in text and '"outcome": "preempted"' in text
    assert '"outcome": "succeeded"' in text
    resumed = re.search(
        r"attempt 1 stopped at step (\d+) and exited 75, attempt 2 resumed from step (\d+): (\d+) steps", text
    )
    assert resumed, text
    stopped, start, lost = map(int, resumed.groups())
    assert 0 < start <= stopped < steps and lost == stopped - start
    assert re.search(r"checkpoints: \d+ committed, [\d.]+ MiB each; training stall per checkpoint: median", text)
    loss = re.search(r"loss: ([\d.]+) at step 1, ([\d.]+) at step (\d+)", text)
    assert loss and float(loss[2]) < float(loss[1]) and int(loss[3]) == steps
    assert "verified" in text, "the demo lists and verifies the checkpoints in the bucket"
    assert re.search(r"total: 2 attempts, 1 preempted", text), "the run record has both attempts"
    assert "final weights equal the uninterrupted run's, bitwise: True" in text


def test_demo_preempts_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """`make demo` (file:// bucket): exit 75 then a resumed attempt; summary facts hold; weights bitwise equal."""
    _check_summary(_demo(tmp_path, "--steps", "100"), 100)


@pytest.mark.slow  # ~50 s; S3 under podtrain run stays covered: README walkthrough, Airflow e2e
def test_demo_runs_the_same_flow_against_s3_on_loopback(tmp_path: Path) -> None:
    """`make demo S3=1`: the same flow with the bucket on an S3 server (moto) on 127.0.0.1."""
    pytest.importorskip("moto")
    text = _demo(tmp_path, "--s3", "--steps", "60", "--checkpoint-every", "10")
    assert "the bucket is s3://podtrain-demo (an S3 server on http://127.0.0.1:" in text
    _check_summary(text, 60)


@pytest.mark.slow  # ~40 s; the S3 contract suites run on SeaweedFS in make test
def test_demo_runs_the_same_flow_against_seaweedfs(tmp_path: Path) -> None:
    """`make demo S3=seaweedfs`: the same flow on SeaweedFS, a real object store that checks signatures and each
    body's CRC32C."""
    text = _demo(tmp_path, "--s3", "seaweedfs", "--steps", "60", "--checkpoint-every", "10")
    assert "the bucket is s3://podtrain-demo (an S3 server on http://127.0.0.1:" in text and ", SeaweedFS)" in text
    _check_summary(text, 60)


def test_readme_quick_start_names_the_two_commands_and_make_runs_the_demo() -> None:
    """The README's quick start is `make demo` and `make test`; `make demo` runs examples/demo.py, S3=1 adds --s3."""
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True)
    assert "examples/demo.py" in dry.stdout and "--s3" not in dry.stdout
    dry = subprocess.run(["make", "-n", "demo", "S3=1"], cwd=ROOT, capture_output=True, text=True)
    assert "examples/demo.py" in dry.stdout and "--s3" in dry.stdout
