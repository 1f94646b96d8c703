"""Stop signals recorded before the supervisor took over, with their real arrival times.

The console script (:mod:`entrypoint.early`) installs these recorders first thing, so a SIGTERM that comes while
``podtrain run`` is still importing is not lost; the CLI hands them to :class:`~entrypoint.supervisor.Supervisor`,
which replays them once its own handlers are in place. A module of its own, importing only the standard library,
so that both the console script and the CLI can import it without importing each other.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

__all__ = ["RECORDED", "EarlySignals"]

RECORDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class EarlySignals:
    """Signals received before the supervisor took over: ``(signum, monotonic time)``."""

    def __init__(self) -> None:
        self.received: list[tuple[int, float]] = []
        self.installed = False

    def install(self) -> EarlySignals:
        for signum in RECORDED:
            signal.signal(signum, self._record)
        self.installed = True
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append((signum, time.monotonic()))

    def sigterm_at(self) -> float | None:
        """When the first SIGTERM arrived, or None."""
        return next((at for signum, at in self.received if signum == signal.SIGTERM), None)
