"""Where pulled bytes land on disk: written around the page cache (``O_DIRECT``) where the file system allows.

Writing a dataset through the page cache costs the kernel a copy of every byte into freshly allocated cache
pages. Measured on this project's 2-core test machine (ext4): 2.9 CPU-s of system time to write 1.5 GB with
``dd``, 0.45 CPU-s with ``oflag=direct`` — the largest single CPU cost of a pull, larger than receiving the
bytes. On a GPU node those are CPU-seconds taken from the data loader of the run that is about to start.

``O_DIRECT`` wants the buffer's address, the file offset and the length in multiples of the device's logical
block; :data:`ALIGN` (4096) covers 512- and 4096-byte sectors. Each thread therefore copies a piece into its own
page-aligned buffer (an anonymous ``mmap``, reused; a memory copy costs far less than a page-cache write), pads
the tail with zeros to the next block, writes, and the file is cut to its real length when it is closed.
Piece offsets are multiples of the piece size, itself a whole number of MiB, so every write is aligned.

Where the file system refuses ``O_DIRECT`` (tmpfs, many FUSE and network file systems: ``EINVAL`` at open or
at the first write) or the platform has none (macOS), the file is written through the page cache as before;
nothing else changes. The trade-off, written down: files pulled this way are not left in the page cache, so the
first epoch reads them from the disk rather than from memory. ``pull(..., direct=False)`` (``podtrain pull
--no-direct``) keeps the old behaviour for a dataset that fits in memory and is read at once.

Durability is unchanged: the data goes to the device with each write, and the file's size and blocks are made
durable with the batch's ``syncfs`` (:mod:`sdk.data._warmcache`) before the file is recorded.

**Every byte or an error.** A write that comes back short (a full disk, a quota, a file-size limit, a signal)
is continued from where it stopped, through the page cache, until every byte is written or the file system says
why not (``ENOSPC``, ``EDQUOT``, ``EFBIG``: raised with the object's name in ``filename``); a write that writes
nothing is ``ENOSPC``. :meth:`LandingFile.finish` is the only way to a file that may be put in place: it checks
that the pieces written cover the whole file without a gap and that the file on disk (``fstat``) has exactly
the listed length, and raises :class:`~sdk.errors.LocalDiskError` otherwise. Files are created with ``O_EXCL |
O_NOFOLLOW`` relative to a folder's descriptor (:mod:`sdk.data._destination`), so nothing planted at the name is
written through; a second descriptor, opened by name for unaligned pieces, must be the same file (device and
inode) or it is refused.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
from pathlib import Path

from sdk.errors import LocalDiskError

__all__ = ["ALIGN", "LandingFile"]

ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_buffers = threading.local()


def _aligned_buffer(nbytes: int) -> memoryview:
    """This thread's page-aligned buffer of at least ``nbytes``, grown (never shrunk) as pieces require."""
    buf: mmap.mmap | None = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < nbytes:
        if buf is not None:
            buf.close()
        buf = _buffers.buf = mmap.mmap(-1, max(nbytes, ALIGN))
    return memoryview(buf)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """All of ``data`` at ``offset``: a short write is continued; one that writes nothing is ``ENOSPC``."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "the file system took no byte of a write")
        view = view[written:]
        offset += written


class LandingFile:
    """One file being written at offsets, possibly by several threads at once (one piece each).

    ``path`` is created (``O_EXCL``: it must not exist, unless ``replace`` lets what is there be removed first),
    relative to the folder descriptor ``dir_fd`` when given; ``label`` names the file in errors (the object's
    name). ``resume``: ``path`` is the partial file an earlier pull left, opened as it is (a regular file of
    exactly ``size`` bytes, else ``ESTALE``); the pieces kept from it are told with :meth:`mark`."""

    def __init__(
        self,
        path: str | Path,
        size: int,
        *,
        direct: bool = True,
        preallocate: bool = False,
        dir_fd: int | None = None,
        label: str = "",
        replace: bool = False,
        resume: bool = False,
    ) -> None:
        self.path, self.size, self.dir_fd, self._replace, self._resume = path, size, dir_fd, replace, resume
        self.label = label or str(path)
        self._lock = threading.Lock()
        self._padded = False  # a direct write went past ``size``: cut the file back on close
        self._pieces: dict[int, int] = {}  # offset -> length of every piece written whole
        self._direct_fd = -1  # O_DIRECT: every write through it must be aligned
        self._plain_fd = -1  # through the page cache: opened at once, or when a piece cannot go direct
        try:
            if direct and _O_DIRECT:
                try:
                    self._direct_fd = self._create(_CREATE | _O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    with contextlib.suppress(FileNotFoundError):  # some file systems create it, then refuse
                        if not resume:
                            os.unlink(path, dir_fd=dir_fd)
            if self._direct_fd < 0:
                self._plain_fd = self._create(_CREATE)
            self.direct = self._direct_fd >= 0
            if preallocate:  # pieces land anywhere in it: the full size at once
                os.ftruncate(self._direct_fd if self.direct else self._plain_fd, size)
        except OSError as exc:
            self.close()
            exc.filename = self.label
            raise

    def _create(self, flags: int) -> int:
        """A new file at the path (``O_EXCL | O_NOFOLLOW``); with ``replace``, what is there already (a leftover of
        an interrupted pull, or anything planted) is removed first — unlinked, never written through. With
        ``resume``, the file there is opened as it is, and must be a regular file of the full size."""
        if self._resume:
            fd = os.open(self.path, (flags & ~(os.O_CREAT | os.O_EXCL)), dir_fd=self.dir_fd)
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode) or status.st_size != self.size:
                os.close(fd)
                raise OSError(errno.ESTALE, "the partial file left by an earlier pull is not the one recorded")
            return fd
        try:
            return os.open(self.path, flags, 0o644, dir_fd=self.dir_fd)
        except FileExistsError:
            if not self._replace:
                raise
        os.unlink(self.path, dir_fd=self.dir_fd)
        return os.open(self.path, flags, 0o644, dir_fd=self.dir_fd)

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """All of ``data`` at ``offset``: around the page cache when the offset is aligned and the length is too or
        the piece ends the file (its zero padding then goes past the end, which :meth:`close` cuts off); any
        other piece, and whatever a short direct write left, through the page cache, so padding never lands on a
        neighbour's bytes. Raises the file system's error (``filename``: the label) when it cannot."""
        length = len(data)
        done = 0
        try:
            if self.direct and offset % ALIGN == 0 and (length % ALIGN == 0 or offset + length >= self.size):
                padded = -(-length // ALIGN) * ALIGN
                view = _aligned_buffer(padded)
                try:
                    view[:length] = data
                    if padded > length:
                        view[length:padded] = bytes(padded - length)
                        self._padded = True
                    done = min(os.pwrite(self._direct_fd, view[:padded], offset), length)
                    # short: the rest through the page cache, which either takes it or says why not
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct = False  # the file system took the flag but not the write: page cache from now on
                finally:
                    view.release()
            if done < length:
                _write_all(self._plain(), memoryview(data)[done:], offset + done)
        except OSError as exc:
            exc.filename = self.label
            raise
        self._pieces[offset] = length

    def mark(self, offset: int, length: int) -> None:
        """Count a piece already in the file (kept from an earlier pull, its bytes checked) as written."""
        self._pieces[offset] = length

    def _plain(self) -> int:
        with self._lock:
            if self._plain_fd < 0:
                fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
                if self._direct_fd >= 0 and not os.path.samestat(os.fstat(fd), os.fstat(self._direct_fd)):
                    os.close(fd)
                    raise OSError(errno.ESTALE, "the file being written was replaced by another under its name")
                self._plain_fd = fd
            return self._plain_fd

    def written(self) -> int:
        """How many bytes from the start are covered by whole pieces, without a gap."""
        end = 0
        for offset in sorted(self._pieces):
            if offset != end:
                break
            end += self._pieces[offset]
        return end

    def finish(self) -> os.stat_result:
        """Close a file that is complete, and its ``fstat``: every byte written, its length on disk the listed
        one. Anything else raises (:class:`~sdk.errors.LocalDiskError`, or the file system's error); the file is
        closed either way, and must then not be put in place."""
        fd = self._direct_fd if self._direct_fd >= 0 else self._plain_fd
        try:
            if self._padded:
                self._padded = False
                os.ftruncate(fd, self.size)
            status = os.fstat(fd)
        except OSError as exc:
            exc.filename = self.label
            raise
        finally:
            self.close()
        written = self.written()
        if written != self.size or status.st_size != self.size:
            raise LocalDiskError(
                f"{self.label!r}: {written} of {self.size} bytes were written and {status.st_size} are on disk; "
                "the file was not put in place"
            )
        return status

    def close(self) -> None:
        """Cut the file to its real length where padding went past it, then close."""
        fds = [fd for fd in (self._direct_fd, self._plain_fd) if fd >= 0]
        self._direct_fd = self._plain_fd = -1
        try:
            if self._padded and fds:
                os.ftruncate(fds[0], self.size)
        finally:
            for fd in fds:
                os.close(fd)
