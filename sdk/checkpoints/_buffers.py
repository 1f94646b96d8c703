"""The memory a save builds its files in, kept from one save to the next.

A safetensors file is built in one ``bytearray`` (:mod:`sdk.checkpoints.serialization`). A fresh one is zero-filled
by CPython while it holds the GIL: ~90 ms per 128 MiB here, page faults included, during which an asynchronous
save's background thread keeps the training thread from running (it measured as most of the sharded benchmark's
stall, docs/benchmarks.md). A run's saves mostly write files of the same sizes, so the buffers of the last save are
kept and handed out again for files of the same size: after the first save, building a file allocates nothing.
The cost is host memory: the last save's files stay allocated (about the state's size on this rank) between saves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["FileBuffers"]


class FileBuffers:
    """Bytearrays by size: :meth:`take` one for a file, :meth:`keep` the ones a save used once its uploads are done
    (the rest are let go, so a state whose layout changed keeps only what its last save needed)."""

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes, with old contents (the caller writes every byte), or a new one."""
        with self._lock:
            spare = self._free.get(size)
            if spare:
                return spare.pop()
        return bytearray(size)

    def keep(self, used: Iterable[bytearray]) -> None:
        """The buffers of the save that just finished become the only ones kept."""
        free: dict[int, list[bytearray]] = {}
        for buffer in used:
            free.setdefault(len(buffer), []).append(buffer)
        with self._lock:
            self._free = free

    @property
    def held(self) -> int:
        """Bytes kept for the next save."""
        with self._lock:
            return sum(len(b) for spare in self._free.values() for b in spare)
