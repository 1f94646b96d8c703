"""Every user-facing failure of the real ``podtrain`` CLI is one line on stderr, never a traceback, with the
contract's exit code (2: the user must change something; 1: the platform failed; 130: interrupted).

Read-only and full volumes are real mounts (a tmpfs mounted read-only, a 1 MiB tmpfs): tests run as root, where
permission bits do not stop a write. Without the right to mount, those cases are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdk.stores.store import open_store
from tests.faultproxy import FaultProxy

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))


def _podtrain(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PODTRAIN, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=cwd
    )


def _is_log_record(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _one_line_failure(done: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """``done`` exited ``code``; besides the structured log records (JSON lines; ``podtrain run``'s last one is
    its termination message), stderr holds exactly one line, ``podtrain: ...`` naming ``words``; no traceback."""
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not _is_log_record(line)]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("podtrain: "), lines[0]
    assert done.returncode == code, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def _mounted(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``folder`` with ``options``; the test is skipped where this process cannot mount."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def dataset(s3_url: str) -> str:
    store = open_store(s3_url)
    store.put("ds/a.bin", b"a" * 300_000)
    store.put("ds/b.bin", b"b" * 300_000)
    store.put("ds/c.bin", b"c" * 600_000)
    return f"{s3_url}/ds"


def test_pull_into_a_dest_that_is_a_file_is_one_line_exit_2(dataset: str, tmp_path: Path) -> None:
    """``--dest`` naming a file: exit 2, one line naming the path; the file is untouched."""
    dest = tmp_path / "a-file"
    dest.write_text("keep")
    done = _podtrain("pull", dataset, "--dest", str(dest))
    _one_line_failure(done, 2, str(dest))
    assert dest.read_text() == "keep"


def test_pull_into_a_read_only_folder_is_one_line_exit_2(dataset: str, tmp_path: Path) -> None:
    """``--dest`` a folder on a read-only volume (and a folder to create below one): exit 2, one line."""
    with _mounted(tmp_path / "ro", "ro,size=1m") as ro:
        line = _one_line_failure(_podtrain("pull", dataset, "--dest", str(ro)), 2, str(ro))
        assert "read-only" in line.lower()
        below = ro / "data" / "set"
        assert "read-only" in _one_line_failure(_podtrain("pull", dataset, "--dest", str(below)), 2).lower()


def test_pull_onto_a_volume_too_small_is_one_line_exit_2(dataset: str, tmp_path: Path) -> None:
    """A volume too small for the dataset (1 MiB for 1.2 MB), seen before a byte is fetched: exit 2, one line
    naming the folder and the fix."""
    with _mounted(tmp_path / "small", "size=1m") as small:
        done = _podtrain("pull", dataset, "--dest", str(small / "d"))
        assert "bigger volume" in _one_line_failure(done, 2, str(small / "d"))


def test_pull_that_hits_enospc_while_writing_is_one_line_exit_1(dataset: str, tmp_path: Path) -> None:
    """ENOSPC in the middle of the pull (a volume with room for the bytes but only a few inodes): exit 1, one
    line saying the volume is full, not a traceback."""
    with _mounted(tmp_path / "inodes", "size=256m,nr_inodes=6") as volume:
        done = _podtrain("pull", dataset, "--dest", str(volume / "d"), "--workers", "1")
        line = _one_line_failure(done, 1)
        assert "space" in line.lower() or "full" in line.lower(), line


def test_pull_into_an_over_long_dest_is_one_line_exit_2(dataset: str, tmp_path: Path) -> None:
    """A 5,000-character ``--dest`` (ENAMETOOLONG): exit 2, one line saying the path is too long."""
    dest = tmp_path / "/".join(["x" * 200] * 25)
    done = _podtrain("pull", dataset, "--dest", str(dest))
    assert " long" in _one_line_failure(done, 2).lower()
    long_name = tmp_path / ("y" * 300)
    done = _podtrain("pull", dataset, "--dest", str(long_name))
    assert " long" in _one_line_failure(done, 2).lower()


def test_run_with_a_checkpoint_folder_to_create_on_a_read_only_volume_is_one_line_exit_2(tmp_path: Path) -> None:
    """PODTRAIN_CHECKPOINT_URI a folder that does not exist yet on a read-only volume: exit 2 before the child
    starts, one line naming the store, and a termination message that says why (not a child's traceback and "no
    checkpoint committed yet")."""
    ran = tmp_path / "ran"
    with _mounted(tmp_path / "ro", "ro,size=1m") as ro:
        env = {
            "PODTRAIN_CHECKPOINT_URI": str(ro / "ckpt"),
            "PODTRAIN_ATTEMPT": "1",
            "PODTRAIN_TERMINATION_LOG": str(tmp_path / "term"),
            "PODTRAIN_OUTPUT_DIR": str(tmp_path / "out"),
            "PODTRAIN_ARTIFACT_URI": str(tmp_path / "art"),
        }
        done = _podtrain("run", "--", "touch", str(ran), env=env, cwd=tmp_path)
        line = _one_line_failure(done, 2, str(ro / "ckpt"))
    assert "read-only" in line and not ran.exists()
    message = json.loads((tmp_path / "term").read_text())
    assert message["exit_code"] == 2 and "read-only" in message["message"]


def test_record_of_a_missing_bucket_says_the_bucket_is_missing(s3_url: str) -> None:
    """``podtrain record s3://no-such-bucket/run``: exit 2, one line naming the missing bucket, not "no run
    record"."""
    done = _podtrain("record", "s3://podtrain-no-such-bucket/artifacts/run-7")
    line = _one_line_failure(done, 2, "podtrain-no-such-bucket")
    assert "no run record" not in line and "bucket" in line


def test_push_of_a_folder_that_does_not_exist_is_one_line_exit_2(s3_url: str, tmp_path: Path) -> None:
    """``podtrain push /no/such/folder URI``: exit 2 naming the folder (not "0 files, 0 sent", exit 0); nothing
    is uploaded."""
    missing = tmp_path / "no-such-output"
    done = _podtrain("push", str(missing), f"{s3_url}/art/run-7")
    _one_line_failure(done, 2, str(missing))
    assert not list(open_store(s3_url).list("art"))


def test_ctrl_c_during_a_pull_is_one_line_exit_130_and_the_rerun_finishes(
    s3_url: str, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """SIGINT while a large object comes in 1 MiB pieces over a slow link: exit 130, one line saying the files in
    place are kept, no ``KeyboardInterrupt`` traceback; the same command run again completes and verifies."""
    payload = os.urandom(8 * 2**20)
    open_store(s3_url).put("big/blob.bin", payload)
    open_store(s3_url).put("big/small.txt", b"small")
    proxy = fault_proxy("s3")
    proxy.slow(64 * 1024, 0.05, method="GET", path=r"blob\.bin", times=None)  # ~0.8 s per 1 MiB piece
    dest = tmp_path / "d"
    command = [PODTRAIN, "pull", f"{s3_url}/big", "--dest", str(dest), "--piece-mib", "1", "--workers", "2"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = dest / "blob.bin.podtrain-partial"
    deadline = time.monotonic() + 60
    while not partial.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert partial.exists(), "the pull never started writing the big object"
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    done = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
    line = _one_line_failure(done, 130, "interrupted", str(dest))
    assert "kept" in line and "again" in line
    assert not (dest / "blob.bin").exists(), "no half-file that looks whole"
    proxy.clear()
    again = _podtrain(*command[1:])
    assert again.returncode == 0, again.stderr
    assert (dest / "blob.bin").read_bytes() == payload


def _pull_stopped_by_ctrl_c(url: str, proxy: FaultProxy, dest: Path, mib: int) -> tuple[list[str], int]:
    """``podtrain pull`` of ``url`` (``mib`` MiB) in 1 MiB pieces through ``proxy`` made slow (0.4 s a piece, 1.2 s
    for a small object); SIGINT once 3 pieces were asked for. Asserts exit 130 with one line; returns the command
    and how many pieces were asked for."""
    proxy.slow(256 * 1024, 0.1 if mib > 16 else 0.3, method="GET", path=r"blob\.bin", times=None)
    command = [PODTRAIN, "pull", url, "--dest", str(dest), "--piece-mib", "1", "--workers", "2"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _pieces_asked(proxy) < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    _one_line_failure(subprocess.CompletedProcess(command, child.returncode, stdout, stderr), 130, "kept")
    first = _pieces_asked(proxy)
    assert 3 <= first < mib, f"{first} pieces asked for before the stop"
    proxy.clear()  # no more slowness; the counts start again
    return command, first


def _pieces_asked(proxy: FaultProxy) -> int:
    return sum(1 for method, target in list(proxy.requests) if method == "GET" and "blob.bin" in target)


@pytest.mark.parametrize(
    ("mib", "checked_by"),
    [(64, "parts"), (7, "crc32c")],
    ids=["64 MiB multipart, checked by its parts", "7 MiB, checked by its whole CRC32C"],
)
def test_ctrl_c_keeps_the_pieces_that_landed_and_the_rerun_fetches_only_the_rest(
    s3_url: str, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path, mib: int, checked_by: str
) -> None:
    """An object in 1 MiB pieces over a slow link, SIGINT once a few pieces are asked for: the pieces that landed
    are kept (exit 130, one line), and the rerun GETs only the others — each piece is fetched exactly once over
    both runs — and the file verifies (the store's checksum, from kept and new pieces alike)."""
    payload = os.urandom(mib * 2**20)
    open_store(s3_url).put("big/blob.bin", payload)
    dest = tmp_path / "d"
    command, first = _pull_stopped_by_ctrl_c(f"{s3_url}/big", fault_proxy("s3"), dest, mib)
    kept = json.loads((dest / ".podtrain-pull.jsonl").read_text().splitlines()[-1])
    assert kept["partial"]["digest"] == checked_by and len(kept["partial"]["crcs"]) == first
    proxy = fault_proxy("s3")
    again = _podtrain(*command[1:])
    assert again.returncode == 0, again.stderr
    assert _pieces_asked(proxy) == mib - first, "only the pieces the first pull did not land are fetched"
    assert (dest / "blob.bin").read_bytes() == payload
    assert not list(dest.glob("*.podtrain-partial"))


@pytest.mark.parametrize(("mib", "refetched"), [(64, 64), (7, 1)], ids=["parts", "crc32c"])
def test_a_kept_piece_damaged_on_disk_is_fetched_again_and_the_file_verifies(
    s3_url: str, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path, mib: int, refetched: int
) -> None:
    """A byte of a kept piece flipped on disk between the runs: never put in place. Checked by its whole CRC, that
    piece alone is fetched again (its CRC no longer the recorded one); checked by its parts, the whole check
    fails and the object is read again in order. Either way the file is the store's."""
    payload = os.urandom(mib * 2**20)
    open_store(s3_url).put("big/blob.bin", payload)
    dest = tmp_path / "d"
    command, first = _pull_stopped_by_ctrl_c(f"{s3_url}/big", fault_proxy("s3"), dest, mib)
    kept = json.loads((dest / ".podtrain-pull.jsonl").read_text().splitlines()[-1])
    at = min(int(start) for start in kept["partial"]["crcs"]) + 1000
    with (dest / "blob.bin.podtrain-partial").open("r+b") as partial:
        partial.seek(at)
        byte = partial.read(1)
        partial.seek(at)
        partial.write(bytes([byte[0] ^ 0xFF]))
    proxy = fault_proxy("s3")
    again = _podtrain(*command[1:])
    assert again.returncode == 0, again.stderr
    assert _pieces_asked(proxy) == mib - first + refetched
    assert (dest / "blob.bin").read_bytes() == payload
