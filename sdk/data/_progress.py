"""Progress of a transfer: a tqdm bar on a terminal, structured log lines every few seconds otherwise.

Pods have no terminal: their logs are read by machines, so there the progress is a ``<label>.progress`` line
(files and bytes done, MiB/s, ETA) every ``every`` seconds and at the end. On a terminal (stderr is a TTY) a
bar shows the same, and the log lines are left out.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sdk.log import get_logger

__all__ = ["Progress"]


class Progress:
    """Thread-safe counters of bytes and files, reported as a bar or as log lines."""

    def __init__(
        self,
        label: str,
        files: int,
        total: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        every: float = 5.0,
        bar: bool | None = None,
    ) -> None:
        self.label, self.files, self.total, self.clock, self.every = label, files, total, clock, every
        self.done_files = self.done_bytes = 0
        self.started = self.last = clock()
        self._lock = threading.Lock()
        self._log = get_logger(f"podtrain.{label}")
        self._bar: Any = None
        if files and (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=True)

    def add_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.done_bytes += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)
            self._maybe_report()

    def add_file(self) -> None:
        with self._lock:
            self.done_files += 1
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self.done_files}/{self.files} files", refresh=False)
            self._maybe_report()

    def _maybe_report(self) -> None:
        now = self.clock()
        finished = self.done_files >= self.files
        if self._bar is not None or (now - self.last < self.every and not finished):
            return
        if finished and self.last == float("inf"):
            return  # the final line is out already
        self.last = float("inf") if finished else now
        rate = self.done_bytes / max(now - self.started, 1e-9)
        self._log.info(
            f"{self.label}.progress",
            files=f"{self.done_files}/{self.files}",
            bytes=self.done_bytes,
            total=self.total,
            mib_per_s=round(rate / 2**20, 1),
            eta_s=round((self.total - self.done_bytes) / rate, 1) if rate else None,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
