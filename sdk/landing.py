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
durable with the batch's ``syncfs`` (:mod:`sdk.warmcache`) before the file is recorded.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

__all__ = ["ALIGN", "LandingFile"]

ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_buffers = threading.local()


def _aligned_buffer(nbytes: int) -> memoryview:
    """This thread's page-aligned buffer of at least ``nbytes``, grown (never shrunk) as pieces require."""
    buf: mmap.mmap | None = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < nbytes:
        if buf is not None:
            buf.close()
        buf = _buffers.buf = mmap.mmap(-1, max(nbytes, ALIGN))
    return memoryview(buf)


class LandingFile:
    """One file being written at offsets, possibly by several threads at once (one piece each)."""

    def __init__(self, path: Path, size: int, *, direct: bool = True, preallocate: bool = False) -> None:
        self.path, self.size = path, size
        self._lock = threading.Lock()
        self._padded = False  # a direct write went past ``size``: cut the file back on close
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._direct_fd = -1  # O_DIRECT: every write through it must be aligned
        self._plain_fd = -1  # through the page cache: opened at once, or when a piece cannot go direct
        if direct and _O_DIRECT:
            try:
                self._direct_fd = os.open(path, flags | _O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if self._direct_fd < 0:
            self._plain_fd = os.open(path, flags, 0o644)
        self.direct = self._direct_fd >= 0
        if preallocate:  # pieces land anywhere in it: the full size at once
            os.ftruncate(self._direct_fd if self.direct else self._plain_fd, size)

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """``data`` at ``offset``: around the page cache when the offset is aligned and the length is too or
        the piece ends the file (its zero padding then goes past the end, which :meth:`close` cuts off); any
        other piece through the page cache, so padding never lands on a neighbour's bytes."""
        length = len(data)
        if self.direct and offset % ALIGN == 0 and (length % ALIGN == 0 or offset + length >= self.size):
            padded = -(-length // ALIGN) * ALIGN
            view = _aligned_buffer(padded)
            try:
                view[:length] = data
                if padded > length:
                    view[length:padded] = bytes(padded - length)
                    self._padded = True
                if os.pwrite(self._direct_fd, view[:padded], offset) == padded:
                    return
                # a short direct write: this piece again through the page cache
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # the file system took the flag but not the write: page cache from now on
            finally:
                view.release()
        os.pwrite(self._plain(), data, offset)

    def _plain(self) -> int:
        with self._lock:
            if self._plain_fd < 0:
                self._plain_fd = os.open(self.path, os.O_WRONLY)
            return self._plain_fd

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
