"""examples/test_train_preemption.py, a user's own test written with sdk.testing, passes as users would run it.

The main suite collects only tests/, so this runs the example through pytest in a subprocess, from the top of
the checkout, with PODTRAIN_* pointing at a "real" run's store: the example's runs must leave it untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/test_train_preemption.py"


def test_the_users_preemption_test_example_passes_without_touching_the_configured_store(tmp_path: Path) -> None:
    real = tmp_path / "real-run"
    env = {
        **os.environ,
        "PODTRAIN_CHECKPOINT_URI": (real / "checkpoints").as_uri(),
        "PODTRAIN_ARTIFACT_URI": str(real / "artifacts"),
        "PODTRAIN_OUTPUT_DIR": str(real / "output"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", EXAMPLE, "-p", "no:cacheprovider", "-q", "--basetemp", str(tmp_path / "t")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
    assert not real.exists()
