"""`make bench` runs: a quick pass of the checkpoint benchmark prints its ratio table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_save_and_resume_ratios() -> None:
    """`python -m bench --size-mib 8 --repeat 1` measures both cases against boto3 and prints ratios and goals."""
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--size-mib", "8", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for case, goal in (("save", "1.2x"), ("resume", "1.3x")):
        row = re.search(rf"^{case}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+<= {re.escape(goal)}", out.stdout, re.M)
        assert row, out.stdout
        podtrain, baseline, ratio = (float(v) for v in row.groups())
        assert podtrain > 0 and baseline > 0
        assert abs(ratio - podtrain / baseline) < 0.01 + 0.01 * ratio
