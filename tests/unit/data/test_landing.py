"""sdk.data._landing: pulled pieces written around the page cache, exact bytes whatever the alignment or the file
system."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
from pathlib import Path

import pytest

from sdk.data import _landing as landing
from sdk.data._landing import ALIGN, LandingFile
from sdk.errors import LocalDiskError

O_DIRECT = getattr(os, "O_DIRECT", 0)


def _supports_direct(folder: Path) -> bool:
    if not O_DIRECT:
        return False
    probe = folder / ".probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def _flags(file: LandingFile) -> int:
    return fcntl.fcntl(file._direct_fd if file.direct else file._plain_fd, fcntl.F_GETFL)


needs_direct = pytest.mark.skipif(not O_DIRECT, reason="this platform has no O_DIRECT")


@needs_direct
def test_a_whole_small_file_of_odd_length_is_written_direct_and_cut_to_its_size(tmp_path: Path) -> None:
    """One unaligned write goes around the page cache, padded, and the file is cut back to its real length."""
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    data = random.Random(1).randbytes(ALIGN * 3 + 123)
    file = LandingFile(tmp_path / "f", len(data))
    assert file.direct and _flags(file) & O_DIRECT
    file.write(data, 0)
    file.close()
    assert (tmp_path / "f").read_bytes() == data


@needs_direct
def test_pieces_from_many_threads_in_any_order_give_the_exact_file(tmp_path: Path) -> None:
    """Ranged pieces written concurrently and out of order, the last one unaligned, land byte for byte."""
    piece = 64 * 1024
    data = random.Random(2).randbytes(piece * 7 + 999)
    file = LandingFile(tmp_path / "f", len(data), preallocate=True)
    starts = list(range(0, len(data), piece))
    random.Random(3).shuffle(starts)
    threads = [threading.Thread(target=file.write, args=(data[s : s + piece], s)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    file.close()
    assert (tmp_path / "f").read_bytes() == data


def test_an_unaligned_piece_inside_the_file_never_pads_over_its_neighbour(tmp_path: Path) -> None:
    """A piece whose length is not a block multiple (and does not end the file) is written through the page
    cache, so no zero padding lands on the next piece's bytes."""
    data = random.Random(4).randbytes(10_000)
    file = LandingFile(tmp_path / "f", len(data), preallocate=True)
    file.write(data[5_000:], 5_000)  # the neighbour first
    file.write(data[:5_000], 0)  # aligned offset, unaligned length, not the end
    file.close()
    assert (tmp_path / "f").read_bytes() == data


def test_a_file_system_refusing_o_direct_at_open_gets_a_page_cache_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL for O_DIRECT at open (tmpfs on old kernels, FUSE) means a normal file, same bytes."""
    real_open = os.open

    def refusing(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & O_DIRECT and O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(landing.os, "open", refusing)
    data = random.Random(5).randbytes(ALIGN + 7)
    file = LandingFile(tmp_path / "f", len(data))
    assert not file.direct
    file.write(data, 0)
    file.close()
    assert (tmp_path / "f").read_bytes() == data


@needs_direct
def test_a_file_system_refusing_the_first_direct_write_switches_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL at the first direct write (a file system that takes the flag but not the alignment) is not an
    error: that piece and the rest go through the page cache, and the file is whole."""
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    real_pwrite = os.pwrite
    refused = []

    def refusing(fd: int, data: bytes, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(landing.os, "pwrite", refusing)
    data = random.Random(6).randbytes(ALIGN * 4 + 1)
    file = LandingFile(tmp_path / "f", len(data), preallocate=True)
    file.write(data[: ALIGN * 2], 0)
    file.write(data[ALIGN * 2 :], ALIGN * 2)
    assert refused == [0] and not file.direct
    file.close()
    assert (tmp_path / "f").read_bytes() == data


def test_direct_false_never_opens_with_o_direct(tmp_path: Path) -> None:
    """``direct=False`` (``podtrain pull --no-direct``) keeps files in the page cache."""
    file = LandingFile(tmp_path / "f", 10, direct=False)
    assert not file.direct and not (_flags(file) & O_DIRECT if O_DIRECT else 0)
    file.write(b"0123456789", 0)
    file.close()
    assert (tmp_path / "f").read_bytes() == b"0123456789"


def test_other_open_errors_are_not_swallowed(tmp_path: Path) -> None:
    """Only EINVAL means "no O_DIRECT here"; a missing folder is still an error the caller sees."""
    with pytest.raises(FileNotFoundError):
        LandingFile(tmp_path / "missing" / "f", 10)


def test_a_short_write_is_continued_until_every_byte_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwrite may write less than asked (a signal, a full disk about to say so): the rest is written, in order."""
    real_pwrite = os.pwrite
    calls: list[int] = []

    def short(fd: int, data: bytes, offset: int) -> int:
        calls.append(len(data))
        return real_pwrite(fd, bytes(data)[: max(1, len(data) // 3)], offset)

    monkeypatch.setattr(landing.os, "pwrite", short)
    data = random.Random(7).randbytes(ALIGN * 5 + 11)
    file = LandingFile(tmp_path / "f", len(data), direct=False)
    file.write(data, 0)
    assert len(calls) > 2
    file.finish()
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("direct", [True, False])
def test_a_write_that_writes_nothing_is_an_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """A write that comes back with 0 bytes would loop for ever or leave a hole: ENOSPC, the object named."""
    monkeypatch.setattr(landing.os, "pwrite", lambda fd, data, offset: 0)
    file = LandingFile(tmp_path / "f", ALIGN * 2, direct=direct, label="train/x.bin")
    with pytest.raises(OSError, match="no byte") as caught:
        file.write(bytes(ALIGN * 2), 0)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "train/x.bin"
    file.close()


def test_finish_refuses_a_file_with_a_piece_missing_even_when_its_length_looks_right(tmp_path: Path) -> None:
    """A preallocated file always has its full length on disk: finish() also checks every piece was written."""
    file = LandingFile(tmp_path / "f", ALIGN * 4, preallocate=True, direct=False, label="x.bin")
    file.write(bytes(ALIGN * 2), 0)
    with pytest.raises(LocalDiskError, match=r"'x\.bin': 8192 of 16384 bytes were written"):
        file.finish()
    assert file._direct_fd == file._plain_fd == -1, "closed all the same"


def test_finish_refuses_a_file_shorter_on_disk_than_listed(tmp_path: Path) -> None:
    file = LandingFile(tmp_path / "f", 10, direct=False)
    file.write(b"0123456789", 0)
    os.ftruncate(file._plain_fd, 5)  # the disk kept less than was written
    with pytest.raises(LocalDiskError, match="5 are on disk"):
        file.finish()


def test_an_existing_file_or_link_at_the_name_is_never_opened(tmp_path: Path) -> None:
    """The file is created (O_EXCL | O_NOFOLLOW): a name already taken — a file, a planted symlink — is an error,
    and the link's target is not touched."""
    target = tmp_path / "outside"
    target.write_bytes(b"keep")
    (tmp_path / "f").symlink_to(target)
    with pytest.raises(FileExistsError):
        LandingFile(tmp_path / "f", 4, direct=False)
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            LandingFile("f", 4, dir_fd=folder)
        file = LandingFile("g", 4, dir_fd=folder, direct=False)
        file.write(b"data", 0)
        assert file.finish().st_size == 4
    finally:
        os.close(folder)
    assert target.read_bytes() == b"keep" and (tmp_path / "g").read_bytes() == b"data"


def test_resume_opens_the_partial_file_as_it_is_and_finish_counts_the_marked_pieces(tmp_path: Path) -> None:
    """resume: the bytes already there are kept (never truncated), a marked piece counts as written, and a file
    of another size or a missing one is refused rather than created."""
    size, half = 2 * 2**20, 2**20
    first = LandingFile(tmp_path / "f.part", size, preallocate=True, direct=False)
    first.write(b"a" * half, 0)
    first.close()
    again = LandingFile(tmp_path / "f.part", size, preallocate=True, resume=True)
    again.mark(0, half)
    again.write(b"b" * half, half)
    again.finish()
    assert (tmp_path / "f.part").read_bytes() == b"a" * half + b"b" * half
    (tmp_path / "short.part").write_bytes(b"x" * 10)
    for name in ("short.part", "missing.part"):
        with pytest.raises(OSError):
            LandingFile(tmp_path / name, size, resume=True)
    assert (tmp_path / "short.part").read_bytes() == b"x" * 10 and not (tmp_path / "missing.part").exists()
