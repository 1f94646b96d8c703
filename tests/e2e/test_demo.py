"""The README's quick start: `make demo` runs the real flow and proves an exact resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_interrupts_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The demo (what `make demo` runs) ends with bitwise-equal weights and lists/verifies its checkpoints."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed weights == uninterrupted weights, bitwise: True" in out.stdout
    assert "verified: sizes and CRC32C match the manifest" in out.stdout
    assert "interrupted after 75, resumed from 70 (5 steps lost" in out.stdout


def test_readme_quick_start_names_the_two_commands_and_make_has_them() -> None:
    """The README's quick start shows `make demo` and `make test`, and the Makefile defines both targets."""
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True)
    assert "examples/quickstart.py" in dry.stdout
