"""`podtrain checkpoints list|verify` as a user runs it: the installed console script, real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer

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


def test_list_shows_how_many_ranks_saved_each_checkpoint(tmp_path: Path) -> None:
    """RANKS says which WORLD_SIZE saved a checkpoint (a retry on another count reshards), in the table and --json."""
    url = f"file://{tmp_path}/ckpt"
    for rank in (1, 0):  # rank 1's record first; rank 0 commits once both are in
        Checkpointer(url, run_id="cli", attempt=1, world_size=2, rank=rank).save(4, {"model": torch.nn.Linear(2, 2)})
    out = _podtrain("checkpoints", "list", url)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[3] == "RANKS" and row.split()[3] == "2"
    (entry,) = json.loads(_podtrain("checkpoints", "list", url, "--json").stdout)["checkpoints"]
    assert entry["ranks"] == 2 and entry["sharded"] == []


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


def test_verify_takes_the_step_url_that_list_prints(store: str) -> None:
    """The URL in list's table (and its --json) names one checkpoint: verify checks that one, not the newest."""
    table = _podtrain("checkpoints", "list", store).stdout.splitlines()[1:]
    urls = {int(line.split()[0]): line.split()[-1] for line in table}
    out = _podtrain("checkpoints", "verify", urls[2])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "step 2" in out.stdout and urls[2] in out.stdout
    doc = json.loads(_podtrain("checkpoints", "list", store, "--json").stdout)
    url = next(c["url"] for c in doc["checkpoints"] if c["step"] == 1)
    result = json.loads(_podtrain("checkpoints", "verify", url + "/", "--json").stdout)
    assert result["ok"] and result["step"] == 1, result


def test_verify_of_a_step_url_with_another_step_exits_two_in_one_line(store: str) -> None:
    """A step URL and a --step that disagree: exit 2, one line naming both, no traceback."""
    doc = json.loads(_podtrain("checkpoints", "list", store, "--json").stdout)
    url = next(c["url"] for c in doc["checkpoints"] if c["step"] == 2)
    out = _podtrain("checkpoints", "verify", url, "--step", "3")
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "step 2" in out.stderr and "--step 3" in out.stderr, out.stderr


def _corrupt(tmp_path: Path, step: int) -> None:
    target = next((tmp_path / "ckpt" / f"step-{step:010d}").rglob("model.safetensors"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))


def _listed(store: str, *options: str) -> dict[int, tuple[bool, str | None]]:
    doc = json.loads(_podtrain("checkpoints", "list", store, "--json", *options).stdout)
    return {c["step"]: (c["valid"], c["problem"]) for c in doc["checkpoints"]}


def test_list_marks_what_a_deep_check_found_invalid_also_in_later_plain_lists(store: str, tmp_path: Path) -> None:
    """A flipped byte a plain list cannot see (a file:// store keeps no checksum): once `list --deep` read it, every
    later plain list shows that checkpoint INVALID with the reason; the others stay valid."""
    _corrupt(tmp_path, 3)
    assert _listed(store) == {3: (True, None), 2: (True, None), 1: (True, None)}  # sizes match: nothing to see
    deep = _podtrain("checkpoints", "list", store, "--deep")
    assert deep.returncode == 0, deep.stderr
    assert "INVALID" in next(line for line in deep.stdout.splitlines() if line.split()[0] == "3"), deep.stdout
    table = _podtrain("checkpoints", "list", store)
    row = next(line for line in table.stdout.splitlines() if line.split()[0] == "3")
    assert "INVALID:" in row and "CRC32C" in row and "--deep" in row, table.stdout
    listed = _listed(store)
    assert listed[3][0] is False and "model.safetensors" in str(listed[3][1]), listed
    assert listed[2] == (True, None) and listed[1] == (True, None), listed


def test_a_failed_verify_marks_the_checkpoint_for_later_lists(store: str, tmp_path: Path) -> None:
    """`checkpoints verify` that finds a checkpoint corrupt leaves the same mark: a plain list then says why."""
    _corrupt(tmp_path, 2)
    assert _podtrain("checkpoints", "verify", store, "--step", "2").returncode == 1
    listed = _listed(store)
    assert listed[2][0] is False and "CRC32C" in str(listed[2][1]), listed
    assert listed[3] == (True, None), listed
