"""`podtrain checkpoints list|verify` as a user runs it: the installed console script, real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdk.checkpoint import Checkpointer

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))  # the console script installed beside this python


def _podtrain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PODTRAIN, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A file:// store with committed checkpoints at steps 1, 2 and 3."""
    url = f"file://{tmp_path}/ckpt"
    ckpt = Checkpointer(url, run_id="cli", attempt=1, keep_last=5)
    for step in (1, 2, 3):
        ckpt.save(step, {"model": torch.nn.Linear(4, 4)})
    return url


def test_version_prints_the_package_version() -> None:
    """`podtrain --version` prints the installed version."""
    out = _podtrain("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("podtrain 0.")


def test_list_shows_valid_checkpoints_newest_first(store: str) -> None:
    """The table lists steps 3, 2, 1 in that order; --json gives the same as data."""
    out = _podtrain("checkpoints", "list", store)
    assert out.returncode == 0, out.stderr
    rows = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert rows == ["3", "2", "1"]
    doc = json.loads(_podtrain("checkpoints", "list", store, "--json").stdout)
    assert [c["step"] for c in doc["checkpoints"]] == [3, 2, 1]
    assert all(c["valid"] for c in doc["checkpoints"])


def test_verify_exits_zero_for_a_good_checkpoint(store: str) -> None:
    """verify of the newest and of a named step exit 0 and say what was checked."""
    assert _podtrain("checkpoints", "verify", store).returncode == 0
    out = _podtrain("checkpoints", "verify", store, "--step", "2")
    assert out.returncode == 0
    assert "step 2" in out.stdout


def test_verify_exits_one_with_the_reason_for_a_corrupt_checkpoint(store: str, tmp_path: Path) -> None:
    """A flipped byte in step 3 makes verify exit 1 naming the file and CRC32C; list --all --deep shows it invalid."""
    target = next((tmp_path / "ckpt" / "step-0000000003").rglob("model.safetensors"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    out = _podtrain("checkpoints", "verify", store, "--step", "3")
    assert out.returncode == 1
    assert "model.safetensors" in out.stdout
    assert "CRC32C" in out.stdout
    listed = json.loads(_podtrain("checkpoints", "list", store, "--json", "--all", "--deep").stdout)["checkpoints"]
    assert [(c["step"], c["valid"]) for c in listed] == [(3, False), (2, True), (1, True)]


def test_verify_of_an_empty_location_exits_one(tmp_path: Path) -> None:
    """No checkpoint at all is a failure of verify, with a message."""
    out = _podtrain("checkpoints", "verify", str(tmp_path / "nothing"))
    assert out.returncode == 1
    assert "no checkpoint" in out.stdout


def test_unknown_scheme_exits_two_naming_the_fix() -> None:
    """A URL whose scheme no backend serves is a usage error (exit 2) that says what to use."""
    out = _podtrain("checkpoints", "list", "nosuchscheme://bucket/run")
    assert out.returncode == 2
    assert "unknown URL scheme" in out.stderr
