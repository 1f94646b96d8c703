"""Every byte that lands is the byte that was verified: a full disk, a quota or a file-size limit fails the pull
with one clear line, no file is renamed into place or recorded unless all of it is on disk, and what was there
before is intact.

Two real ways to run out of room:

* a small volume — tmpfs (``mount -t tmpfs -o size=…``) and an ext4 image on a loop device (``O_DIRECT``
  path) — filled by another writer after the pull's space check, so the pull meets a real ``ENOSPC``; these need
  ``mount`` (root) and skip with the reason where it is refused;
* ``RLIMIT_FSIZE`` in a ``podtrain pull`` subprocess (SIGXFSZ ignored, so writes past it come back short, then
  ``EFBIG``), which needs no privilege and always runs: the short-write path end to end, through the CLI.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdk.data._localpath import INDEX_NAME, PARTIAL_SUFFIX
from sdk.data.pull import pull
from sdk.errors import LocalDiskError
from sdk.stores.store import Store, open_store

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
MiB = 2**20


def _index(dest: Path) -> dict[str, dict[str, Any]]:
    path = dest / INDEX_NAME
    if not path.exists():
        return {}
    return {entry["rel"]: entry for entry in map(json.loads, path.read_text().splitlines())}


def _mount(kind: str, where: Path, size_mib: int, scratch: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small volume needs root and mount(8)")
    where.mkdir(parents=True)
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)]
    else:
        image = scratch / f"ext4-{uuid.uuid4().hex[:8]}.img"
        with image.open("wb") as f:
            f.truncate(size_mib * MiB)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"mkfs.ext4 unavailable: {made.stderr.strip()}")
        command = ["mount", "-o", "loop", str(image), str(where)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small {kind} volume is not permitted here: {done.stderr.strip()}")


@pytest.fixture
def small_volume(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A freshly mounted 100 MiB volume of the kind ``request.param`` ("tmpfs" or "ext4"), unmounted after."""
    where = tmp_path / "vol"
    _mount(request.param, where, 100, tmp_path)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        for image in tmp_path.glob("ext4-*.img"):
            image.unlink()


def _fill_leaving(volume: Path, free: int) -> Path:
    """Write a filler file so that ``free`` bytes are left on ``volume`` (another writer filling the disk)."""
    filler = volume / "filler"
    os.sync()
    gap = shutil.disk_usage(volume).free - free
    with filler.open("wb") as f:
        chunk = b"\xff" * MiB
        while gap > 0:
            gap -= f.write(chunk[: min(gap, MiB)])
        f.flush()
        os.fsync(f.fileno())
    return filler


@pytest.mark.parametrize(
    ("small_volume", "case"),
    [
        ("tmpfs", (False, 32 * MiB, "old")),  # page cache, one whole-object write
        ("tmpfs", (True, 16 * MiB, "fresh")),  # ranged pieces, the file preallocated
        ("ext4", (True, 32 * MiB, "old")),  # O_DIRECT on a block device
        ("ext4", (True, 16 * MiB, "fresh")),
    ],
    indirect=["small_volume"],
    ids=[
        "tmpfs-page-cache-whole-old",
        "tmpfs-direct-ranged-fresh",
        "ext4-direct-whole-old",
        "ext4-direct-ranged-fresh",
    ],
)
def test_a_disk_that_fills_during_the_pull_fails_it_with_one_line_and_lands_nothing(
    s3_url: str, small_volume: Path, monkeypatch: pytest.MonkeyPatch, case: tuple[bool, int, str]
) -> None:
    """A 20 MiB object, 18 MiB left once the pull has started (it passed the space check): LocalDiskError saying
    how much was needed and is free, in which folder; no partial left; the old file at that name and its record
    untouched (a fresh folder gets no file); and once there is room, the next pull lands the whole object."""
    direct, piece, before = case
    store = open_store(s3_url)
    dest = small_volume / "data"
    if before == "old":
        store.put("ds/big.bin", b"v1" * 50_000)
        pull([f"{s3_url}/ds"], dest, direct=direct)
    old_record = _index(dest).get("big.bin")
    new = os.urandom(20 * MiB)
    store.put("ds/big.bin", new)

    original = Store.read
    filled: list[Path] = []

    def filling(self: Store, rel: str, *args: Any) -> Any:
        if not filled:
            filled.append(_fill_leaving(small_volume, 18 * MiB))
        return original(self, rel, *args)

    monkeypatch.setattr(Store, "read", filling)
    with pytest.raises(LocalDiskError) as caught:
        pull([f"{s3_url}/ds"], dest, direct=direct, piece_size=piece)
    message = str(caught.value)
    assert "\n" not in message and str(dest) in message
    assert "20.0 MiB" in message and "18." in message, message
    if before == "old":
        assert (dest / "big.bin").read_bytes() == b"v1" * 50_000
    else:
        assert not (dest / "big.bin").exists()
    assert _index(dest).get("big.bin") == old_record, "the failed file is not recorded"
    assert not list(dest.rglob(f"*{PARTIAL_SUFFIX}")) and not list(dest.rglob(".*.podtrain-partial"))

    filled[0].unlink()
    monkeypatch.setattr(Store, "read", original)
    again = pull([f"{s3_url}/ds"], dest, direct=direct, piece_size=piece)
    assert again.fetched == 1
    assert (dest / "big.bin").read_bytes() == new


def _limited(limit: int) -> Any:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return preexec


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("piece_mib", [16, 1], ids=["whole", "ranged"])
def test_short_writes_past_a_file_size_limit_fail_the_cli_cleanly_and_keep_the_old_file(
    s3_url: str, tmp_path: Path, direct: bool, piece_mib: int
) -> None:
    """RLIMIT_FSIZE of 1.5 MiB, SIGXFSZ ignored: the 3 MiB object's write comes back short, then EFBIG. Today the
    short write is ignored and a truncated file is renamed into place and recorded (exit 0). Wanted: exit 1, one
    line, the old file and its record intact, no partial; a later pull without the limit lands the new bytes."""
    store = open_store(s3_url)
    store.put("ds/x.bin", b"old" * 1000)
    dest = tmp_path / "data"
    flag = "--direct" if direct else "--no-direct"
    args = [PODTRAIN, "pull", f"{s3_url}/ds", "--dest", str(dest), flag, "--piece-mib", str(piece_mib)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    old_record = _index(dest)["x.bin"]
    new = os.urandom(3 * MiB)
    store.put("ds/x.bin", new)

    limited = subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=_limited(3 * MiB // 2))
    assert limited.returncode == 1, limited.stderr
    assert "Traceback" not in limited.stderr
    (line,) = [line for line in limited.stderr.splitlines() if line.startswith("podtrain:")]
    assert str(dest) in line and "x.bin" in line and "3.0 MiB" in line, line
    assert (dest / "x.bin").read_bytes() == b"old" * 1000
    assert _index(dest)["x.bin"] == old_record
    assert not list(dest.rglob(f"*{PARTIAL_SUFFIX}"))

    after = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stderr
    assert (dest / "x.bin").read_bytes() == new
