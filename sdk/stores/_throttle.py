"""How many requests a store gets at once: an AIMD limit that shrinks when the store throttles us.

A store that answers "slow down" (S3 ``SlowDown``, HTTP 429, GCS ``rateLimitExceeded``: a
:class:`~sdk.errors.ThrottledStorageError` from :mod:`sdk.stores._fault`) is asking for fewer requests; sending the same
number again after a pause only prolongs the throttling. So every request a :class:`~sdk.stores.store.Store` (and its
children) sends takes a slot of the store's :class:`AdaptiveLimit` first, and gives it back with how it went:

* **Multiplicative decrease.** A throttled answer halves the limit — half the requests then in flight, never
  below 1 — once per round: answers to requests sent before the last decrease belong to the congestion already
  acted on, so 16 throttled answers at once halve it once, not sixteen times.
* **Additive increase.** Each window of ``limit`` answers in a row that are not throttled raises the limit by
  one, up to :data:`CEILING`, where it starts: no limit in practice until the store first throttles.
* **Episodes**, for the log: the first throttled answer starts one, the first clean window ends it
  (``storage.throttle_over``: how long, how many throttled answers, the lowest limit).

How long a request keeps retrying throttled answers is the retry loop's (:class:`~sdk.stores.store.RetryPolicy`
``throttle_seconds``, from its first throttled answer): a store that never stops throttling fails the call —
and the pull — within that budget, while one that lets requests through, however slowly, is followed at its pace.

The waiting threads block on a condition, not a sleep: a slot given back wakes the next. A request gives its
slot back before it sleeps between tries, so a backing-off request does not hold up others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sdk.log import get_logger

__all__ = ["CEILING", "AdaptiveLimit"]

log = get_logger("podtrain.storage")
CEILING = 1024  # the limit before any throttling: more than any caller sends at once


class AdaptiveLimit:
    """Requests in flight to one store, and how many may be. Thread-safe; ``name`` (a URL) is for the log."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic, ceiling: int = CEILING) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be at least 1, not {ceiling}")
        self.name, self.ceiling, self._clock = name, ceiling, clock
        self.limit = self.lowest = ceiling
        self.in_flight = 0
        self.episode_start: float | None = None  # clock time of the first throttled answer of the current episode
        self._round = 0  # bumped at each decrease
        self._clean = 0  # answers since the last throttled one or the last increase
        self._throttled = 0  # throttled answers in the current episode
        self._cond = threading.Condition(threading.Lock())

    def acquire(self) -> int:
        """Wait for a free slot and take it; returns the ticket to give back to :meth:`release`."""
        with self._cond:
            while self.in_flight >= self.limit:
                self._cond.wait()
            self.in_flight += 1
            return self._round

    def release(self, ticket: int, outcome: str) -> None:
        """Give the slot back. ``outcome``: ``"ok"`` (answered, even with an error such as 404), ``"throttled"``,
        or ``"failed"`` (no answer, or an error that says nothing about the rate: neither shrinks nor grows)."""
        with self._cond:
            if outcome == "throttled":
                self._on_throttled(ticket)
            elif outcome == "ok":
                self._on_answered()
            self.in_flight -= 1
            if self.in_flight < self.limit:
                self._cond.notify(self.limit - self.in_flight)

    def _on_throttled(self, ticket: int) -> None:
        if self.episode_start is None:
            self.episode_start, self._throttled, self.lowest = self._clock(), 0, self.limit
        self._throttled += 1
        self._clean = 0
        if ticket != self._round:
            return  # sent before the last decrease: that decrease already answered this congestion
        was, self.limit = self.limit, max(1, min(self.limit, self.in_flight) // 2)
        self.lowest = min(self.lowest, self.limit)
        self._round += 1
        if self.limit != was:
            log.warning("storage.throttle", url=self.name, limit=self.limit, in_flight=self.in_flight)

    def _on_answered(self) -> None:
        self._clean += 1
        if self._clean < self.limit:
            return
        self._clean = 0
        if self.limit < self.ceiling:
            self.limit += 1
        if self.episode_start is not None:
            log.info(
                "storage.throttle_over",
                url=self.name,
                seconds=round(self._clock() - self.episode_start, 3),
                throttled=self._throttled,
                lowest_limit=self.lowest,
                limit=self.limit,
            )
            self.episode_start = None
