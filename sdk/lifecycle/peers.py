"""Ranks that went silent: a pod of the job gone without a word (SIGKILL, a lost node), noticed within seconds.

Collectives notice too late, or say too little. When a peer's connections close (its processes killed), gloo
fails the collective at once with ``Connection reset by peer`` — a traceback naming an address, and exit 1, which
would tell Airflow "a bug, do not retry". When they do not close (a node gone from the network), gloo waits until
the group's timeout (30 minutes by default) and NCCL's watchdog for 10: a pod that waits that long holds its GPUs
for nothing, and the gang's restart waits for it.

So in a job of several ranks each rank beats (:class:`PeerWatch`): a thread adds 1 to the rank's own counter in
the job's rendezvous store (torchrun's TCPStore, at ``MASTER_ADDR:MASTER_PORT``) every :data:`INTERVAL` seconds
and reads every rank's counter in one request. A rank whose counter has not moved for ``silence`` seconds (half
the grace period, within [5, 60]) is silent; so is the store itself when it stopped answering for as long (it
lives in the pod of rank 0, the coordinator). The rank that sees it calls ``on_silent`` with one sentence naming
the silent ranks; the SDK then tells its supervisor and exits 75 at once (:mod:`sdk.run`): the rank cannot leave
the collective it is stuck in, and nothing can be committed without the silent ranks, so the retry resumes from
the last commit.

When a collective fails (:func:`collective_failure`), the SDK waits for the watch's verdict
(:meth:`PeerWatch.verdict`, at most ``silence`` and two beats) before it lets the error through: silent ranks make
it a preemption.

A rank leaving the SDK's block says so first (:meth:`PeerWatch.stop` moves its counter past :data:`DONE`), so the
ranks still finishing — rank 0 committing the last step — never take it for silent. One that leaves it failing
(an exception in the user's code) moves it past :data:`FAILED`: the others then stop as failed too (exit 1, no
retry), where they would otherwise wait in their next collective for the one that is gone. A rank that never beat
(not started yet) is never called silent: the rendezvous already waited for every rank.

Cost: one small request to the store per rank per second. A thread that needs the GIL: a rank holding it for
longer than ``silence`` (a C call that never releases it) would be taken for silent.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

__all__ = [
    "DONE",
    "FAILED",
    "INTERVAL",
    "PeerWatch",
    "Store",
    "collective_failure",
    "failed_by",
    "silence_for",
    "watch_for",
]

INTERVAL = 1.0  # seconds between beats
DONE = 10**15  # added to a rank's counter when it leaves the block: it is done, not silent
FAILED = 2 * DONE  # added instead when it leaves the block failing: the others stop too, as failed


class Store(Protocol):
    """What the watch needs of a c10d store (``torch.distributed.TCPStore``)."""

    def add(self, key: str, amount: int) -> int: ...

    def multi_get(self, keys: list[str]) -> list[bytes]: ...


def silence_for(grace_seconds: float) -> float:
    """Seconds without a beat after which a rank is silent: half the grace period, within [5, 60]."""
    return min(60.0, max(5.0, grace_seconds / 2))


class PeerWatch:
    """Beat for ``rank`` and watch the other ranks of ``world_size`` in ``store`` (see the module's doc)."""

    def __init__(
        self,
        store: Store,
        *,
        rank: int,
        world_size: int,
        prefix: str,
        silence: float,
        on_silent: Callable[[str, bool], None],
        where: str = "the rendezvous store",
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL,
    ) -> None:
        self._store, self._rank, self._world = store, rank, world_size
        self._keys = [f"{prefix}/beat/{r}" for r in range(world_size)]
        self._silence, self._on_silent, self._where = silence, on_silent, where
        self._clock, self._interval = clock, interval
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (its counter, when it last moved)
        self._failing_since: float | None = None
        self._stop = threading.Event()
        self._found = threading.Event()
        self._thread: threading.Thread | None = None
        self.reported: str | None = None

    def start(self) -> None:
        """Make every rank's counter (0: not started; so reading them all never waits for a missing one), beat once
        now, then from a daemon thread."""
        for key in self._keys:
            self._store.add(key, 0)
        self._store.add(self._keys[self._rank], 1)
        self._thread = threading.Thread(target=self._run, name="podtrain-peers", daemon=True)
        self._thread.start()

    def stop(self, *, failed: bool = False) -> None:
        """This rank leaves the block (``failed``: with an error): mark it (best effort) and stop watching."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(Exception):  # the store may be gone with the job; this is a courtesy to the others
            self._store.add(self._keys[self._rank], FAILED if failed else DONE)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            found = self.check()
            if found is not None and not self._stop.is_set():
                self.reported = found[0]
                self._found.set()
                self._on_silent(*found)
                return

    @property
    def silence(self) -> float:
        return self._silence

    def verdict(self, timeout: float | None = None) -> str | None:
        """Wait until the watch found silent or failed ranks (then ``on_silent`` has run: in the SDK, the process
        ends there), at most ``timeout`` seconds (default: ``silence`` and two beats); None: every rank still beats."""
        self._found.wait(self._silence + 2 * self._interval if timeout is None else timeout)
        return self.reported

    def check(self) -> tuple[str, bool] | None:
        """One beat and one look at every counter: why this rank must stop and whether a rank failed, or None."""
        now = self._clock()
        try:
            self._store.add(self._keys[self._rank], 1)
            values = [int(v) for v in self._store.multi_get(self._keys)]
        except Exception as exc:
            self._failing_since = self._failing_since if self._failing_since is not None else now
            if now - self._failing_since >= self._silence:
                cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                return (
                    f"{self._where} has not answered for {now - self._failing_since:.0f} s (it lives in the pod of "
                    f"rank 0, the coordinator: gone?): {type(exc).__name__}{': ' + cause if cause else ''}",
                    False,
                )
            return None
        if self._failing_since is not None:  # nobody could beat while the store was away: count from now
            self._failing_since = None
            self._seen = {rank: (value, now) for rank, value in enumerate(values)}
            return None
        return self._silent(values, now)

    def _silent(self, values: Sequence[int], now: float) -> tuple[str, bool] | None:
        stale: dict[int, float] = {}  # rank -> seconds since its counter last moved (started, not done)
        failed = [r for r, v in enumerate(values) if v >= FAILED and r != self._rank]
        for rank, value in enumerate(values):
            last, since = self._seen.get(rank, (None, now))
            if value != last:
                self._seen[rank] = (value, now)
            elif rank != self._rank and 0 < value < DONE:
                stale[rank] = now - since
        if failed:
            return f"{_named(failed)} failed (see its log): the job stops", True
        if any(quiet >= self._silence for quiet in stale.values()):
            # Ranks that went with it (a pod's ranks die together, their last beats a moment apart) are named too:
            # any that missed two beats.
            silent = sorted(r for r, quiet in stale.items() if quiet >= self._silence or quiet > 2 * self._interval)
            return f"{_named(silent)} went silent for {self._silence:g} s (its pod gone?): the job stops", False
        return None


def _named(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


_RUNS = itertools.count()  # this process's runs, numbered alike on every rank
_COLLECTIVE_WORDS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "NCCL", "ProcessGroup")


def collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed collective (a peer that went away looks like this), as torch raises it:
    ``torch.distributed.DistError``, or gloo's and NCCL's plain ``RuntimeError``."""
    if not isinstance(error, RuntimeError):
        return False
    torch_distributed = sys.modules.get("torch.distributed")
    dist_error = getattr(torch_distributed, "DistError", None)
    if isinstance(dist_error, type) and isinstance(error, dist_error):
        return True
    text = str(error)
    return any(word in text for word in _COLLECTIVE_WORDS)


def failed_by(error: BaseException) -> bool:
    """Whether a rank leaving its block with ``error`` failed (the others then stop as failed): anything but
    ``SystemExit`` with code 0 or None, which ends a run as intended."""
    return not (isinstance(error, SystemExit) and error.code in (0, None))


def watch_for(
    *,
    rank: int,
    world_size: int,
    attempt: int | None,
    grace_seconds: float,
    on_silent: Callable[[str, bool], None],
    env: Mapping[str, str],
) -> PeerWatch | None:
    """A started :class:`PeerWatch` over the job's rendezvous store (``MASTER_ADDR``/``MASTER_PORT`` of ``env``),
    or None: one rank, or no store to reach (a job not started by torchrun nor with ``env://``)."""
    host, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if world_size < 2 or not host or not port or not str(port).isascii() or not str(port).isdigit():
        return None
    from datetime import timedelta

    import torch.distributed as dist

    silence = silence_for(grace_seconds)
    # A request that hangs is a silence too: it must not take longer than half of one to fail.
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=silence / 2))
    # Each run of the process opens its own keys (the ranks open their runs in the same order): a second
    # sdk.init() in one process must not find the counters the first one left done.
    watch = PeerWatch(
        store,
        rank=rank,
        world_size=world_size,
        prefix=f"podtrain/peers/attempt-{attempt}/run-{next(_RUNS)}",
        silence=silence,
        on_silent=on_silent,
        where=f"the rendezvous store at {host}:{port}",
    )
    watch.start()
    return watch
