"""Preemption: a stop signal becomes a stop request with a deadline inside the pod's grace period.

The kubelet sends SIGTERM and kills the pod ``terminationGracePeriodSeconds`` later. ``podtrain run`` keeps
:func:`safety_margin` of that period for itself (it SIGKILLs the child at ``arrival + grace - margin``, then
writes the termination message), so the training process must be done one more margin earlier:
``deadline = arrival + grace - 2 * margin``. Handlers only record; :meth:`Preemption.requested` is an
attribute read, cheap enough for every step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

__all__ = ["DEFAULT_SIGNALS", "Preemption", "parse_signals", "safety_margin"]

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
MAX_MARGIN = 5.0
MARGIN_FRACTION = 0.2


def safety_margin(grace_seconds: float) -> float:
    """Seconds kept back at the end of the grace period for the supervisor's own exit: min(5 s, 20 %)."""
    return min(MAX_MARGIN, MARGIN_FRACTION * grace_seconds)


def parse_signals(names: str | Iterable[str]) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (or ``TERM``) → signals; raises ValueError naming an unknown one, or one that cannot
    be caught (SIGKILL, SIGSTOP)."""
    items = names.split(",") if isinstance(names, str) else list(names)
    parsed = []
    for raw in (n.strip().upper() for n in items):
        if not raw:
            continue
        name = raw if raw.startswith("SIG") else f"SIG{raw}"
        try:
            signum = signal.Signals[name]
        except KeyError:
            raise ValueError(f"unknown signal {raw!r}") from None
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name} cannot be caught, so it cannot stop a run cleanly")
        parsed.append(signum)
    if not parsed:
        raise ValueError("no signal named")
    return tuple(parsed)


class Preemption:
    """Records the first stop signal and the deadline that follows from it."""

    def __init__(
        self,
        grace_seconds: float,
        *,
        signals: str | Iterable[str] = DEFAULT_SIGNALS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace_seconds = grace_seconds
        self.signals = parse_signals(signals)
        self._clock = clock
        self.signum: int | None = None
        self.arrival: float | None = None
        self.deadline: float | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested (a signal arrived, or :meth:`request` was called)."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop request now (what the handler does; tests and callers may call it directly)."""
        if self.signum is not None:
            return  # the first request sets the deadline; repeats do not move it
        self.arrival = self._clock()
        self.deadline = self.arrival + self.grace_seconds - 2 * safety_margin(self.grace_seconds)
        self.signum = signum

    def seconds_left(self) -> float | None:
        """Seconds until the deadline (may be negative), or None when no stop was requested."""
        return None if self.deadline is None else self.deadline - self._clock()

    def install(self) -> Preemption:
        """Install the handlers (main thread only; elsewhere this is a no-op and says so by returning self)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)
