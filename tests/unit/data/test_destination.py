"""sdk.data._destination: the pull's folder — its lock, links never followed below it, and one-line disk errors."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from sdk.data._destination import Destination
from sdk.data._localpath import LOCK_NAME
from sdk.errors import DataPathError, DestinationBusyError, LocalDiskError, UnsafeKeyError


def test_the_lock_excludes_a_second_holder_and_its_file_goes_with_the_last_holder(tmp_path: Path) -> None:
    first = Destination(tmp_path / "d")
    assert first.lock()
    assert (tmp_path / "d" / LOCK_NAME).read_text().strip() == str(os.getpid())
    with Destination(tmp_path / "d") as second, pytest.raises(DestinationBusyError, match=f"pid {os.getpid()}"):
        second.lock(wait=0.05)
    first.close()
    assert not (tmp_path / "d" / LOCK_NAME).exists(), "the folder is left as it was"


def test_a_waiter_woken_on_a_removed_lock_file_takes_the_current_one(tmp_path: Path) -> None:
    """A holds; B waits on A's file; A removes it as it lets go; B must then lock the folder's current file, so
    that C, arriving after, waits for B rather than holding a lock of its own at the same time."""
    a, b, c = (Destination(tmp_path / "d") for _ in range(3))
    assert a.lock()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: b.lock(wait=30, sleep=lambda s: got.wait(0.01)) and got.set())
    waiter.start()
    a.close()
    waiter.join(timeout=30)
    assert got.is_set()
    with pytest.raises(DestinationBusyError):
        c.lock(wait=0.05)
    b.close()
    assert c.lock(wait=1)
    c.close()


def test_a_stopped_waiter_gives_up_without_the_lock(tmp_path: Path) -> None:
    with Destination(tmp_path / "d") as holder, Destination(tmp_path / "d") as waiter:
        assert holder.lock()
        assert waiter.lock(wait=30, stopped=lambda: True) is False


def test_folders_are_created_and_never_followed_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(outside)
    (tmp_path / "d" / "file").write_text("x")
    with Destination(tmp_path / "d") as folder:
        fd, leaf = folder.folder_of("a/b/c.bin", create=True)
        os.close(fd)
        assert leaf == "c.bin" and (tmp_path / "d" / "a" / "b").is_dir()
        with pytest.raises(OSError) as caught:
            folder.folder_of("link/x/y", create=True)
        assert caught.value.errno == errno.ELOOP and caught.value.filename == "link"
        with pytest.raises(DataPathError, match="'link' there is a symbolic link"):
            folder.explain(caught.value, "link/x/y", "s3://b/ds/link/x/y")
        with pytest.raises(OSError) as caught:
            folder.folder_of("file/y", create=True)
        assert caught.value.errno == errno.ENOTDIR
        with pytest.raises(DataPathError, match="'file' there is a file where a folder must be"):
            folder.explain(caught.value, "file/y", "")
        assert folder.open_existing("link/x") is None and folder.open_existing("file") is not None
    assert list(outside.iterdir()) == []


def test_names_come_from_localpath_with_this_file_systems_limits(tmp_path: Path) -> None:
    with Destination(tmp_path / "d") as folder:
        assert folder.name_of("a/b.bin") == "a/b.bin"
        with pytest.raises(UnsafeKeyError, match=str(tmp_path / "d")):
            folder.name_of("../x", "s3://b/ds/../x")


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "disk quota exceeded"), (errno.EFBIG, "too large")],
)
def test_a_disk_error_is_one_line_with_the_sizes_and_the_folder(tmp_path: Path, code: int, words: str) -> None:
    with Destination(tmp_path / "d") as folder:
        error = folder.failure(OSError(code, os.strerror(code), "train/x.bin"), need=20 * 2**20, files=3)
    text = str(error)
    assert isinstance(error, LocalDiskError) and "\n" not in text
    assert words in text and "20.0 MiB for 3 files" in text and str(tmp_path / "d") in text and "train/x.bin" in text


def test_a_folder_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a file")
    with pytest.raises(DataPathError, match="PODTRAIN_DATA_DIR"):
        Destination(tmp_path / "f" / "data")
