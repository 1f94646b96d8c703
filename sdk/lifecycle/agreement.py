"""Decisions every rank takes together: when to stop, whether to save, whether the emergency save fits.

A SIGTERM reaches the ranks of a pod at slightly different moments, so each rank sees it at a different step;
clocks differ, so a time-based save policy falls due at different steps; and one rank may still be writing a
checkpoint while another is not. Acting on such local views, ranks would stop or save at different steps, and
the next collective would hang. :class:`Agreement` makes these decisions with ``all_reduce`` over a gloo
process group (the default group when it is gloo, otherwise one made for this, so it runs on the CPU beside NCCL).

**How often the stop is agreed.** :meth:`Agreement.poll` is called once per step by every rank (from
``Run.should_stop()``). A blocking all-reduce every step would add its round trip (a few hundred microseconds
on gloo, more on a busy host) to every step of a small model, so the ranks agree every ``K`` calls, and at each
agreement they also agree on the next ``K``: each rank proposes the smallest ``K`` that keeps the measured cost
of an agreement under :data:`TARGET_SHARE` of the measured step time, capped so that ``K`` steps take at most
:data:`MAX_LATENCY` seconds, and the largest proposal wins (MAX, like the flags). All ranks count calls alike,
so they agree at the same call and stop at the same step; a stop waits at most ``K`` steps (≤ ~1 s) for the
next agreement. The first agreements run every step, to measure. (An asynchronous all-reduce read one step
later was tried first: gloo's hand-off to its worker thread cost more than a blocking round trip on 2 cores.)

The time-based save policy rides on the same agreement: a rank whose clock says a save is due raises a flag,
and the next ``checkpoint()`` call on every rank saves.

Sharded checkpoints (:mod:`sdk.checkpoints._sharded`) plan their saves and loads on the same group
(:meth:`Agreement.group`), in the training thread, and a load takes rank 0's list of checkpoints
(:meth:`Agreement.broadcast`).

The first collective also agrees on the job's checkpoint writer id (:attr:`Agreement.writer`): each rank adds a
random number and the largest wins, so every rank of this job writes into the same ``attempt-<n>-<writer>/``
folder and no other job — even one given the same attempt number — ever does (:mod:`sdk.checkpoints._fence`). It costs
no
collective of its own; every save of several ranks is preceded by an agreement, so the id is known by then.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from sdk.errors import ConfigError

__all__ = ["MAX_LATENCY", "TARGET_SHARE", "Agreement"]

TARGET_SHARE = 0.005  # an agreement may cost at most this share of the steps between two agreements
MAX_LATENCY = 1.0  # seconds: agree at least this often, so a stop is acted on within about a second
MAX_EVERY = 1000


class Agreement:
    """Cross-rank decisions over a gloo group (created on first use, by every rank at the same point)."""

    def __init__(self, world_size: int, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.world_size = world_size
        self._clock = clock
        self._group: Any = None
        self._ready = False
        self.every = 1  # agree every this many polls (itself agreed)
        self._calls = 0
        self._since: float | None = None  # when the last agreement ended
        self._cost: float | None = None  # seconds per agreement, smoothed
        self.stopped = False
        self.save_due = False
        self.collectives = 0
        self.writer: str | None = None  # the job's checkpoint writer id, agreed with the first collective

    def _ensure_group(self) -> Any:
        if not self._ready:
            if not (dist.is_available() and dist.is_initialized()):
                raise ConfigError(
                    f"WORLD_SIZE={self.world_size} but torch.distributed is not initialized: call "
                    "torch.distributed.init_process_group() before the first checkpoint()/should_stop()"
                )
            if dist.get_world_size() != self.world_size:
                raise ConfigError(
                    f"WORLD_SIZE={self.world_size} but the process group has {dist.get_world_size()} ranks"
                )
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._ready = True
        return self._group

    def group(self) -> Any:
        """The gloo group these collectives run on (``None``: the default group), for the checkpoint's own."""
        return self._ensure_group()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank (blocking, now)."""
        holder = [value]
        dist.broadcast_object_list(holder, src=0, group=self._ensure_group())
        self.collectives += 1
        return holder[0]

    def _reduce_max(self, values: list[int]) -> list[int]:
        group = self._ensure_group()
        first = self.writer is None  # alike on every rank: all run the same collectives in the same order
        tensor = torch.tensor([*values, secrets.randbits(48)] if first else values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        self.collectives += 1
        agreed = [int(v) for v in tensor.tolist()]
        if first:
            self.writer = f"{agreed.pop():012x}"
        return agreed

    def writer_id(self) -> str | None:
        """The job's agreed checkpoint writer id; None before the first collective."""
        return self.writer

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag: whether it is true on any rank (blocking, now)."""
        return tuple(bool(v) for v in self._reduce_max([int(f) for f in flags]))

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every rank (blocking, now)."""
        return not self.any(not flag)[0]

    def poll(self, stop: bool, save_due: bool = False) -> bool:
        """Called once per step: the agreed stop decision (once true, true for good); updates :attr:`save_due`."""
        if self.stopped:
            return True
        self._calls += 1
        if self._calls < self.every:
            return False
        now = self._clock()
        step = (now - self._since) / self._calls if self._since is not None else None
        agreed_stop, agreed_due, self.every = self._reduce_max([int(stop), int(save_due), self._propose(step)])
        self._since = self._clock()
        cost = self._since - now
        self._cost = cost if self._cost is None else 0.8 * self._cost + 0.2 * cost
        self._calls = 0
        self.save_due = self.save_due or bool(agreed_due)
        self.stopped = bool(agreed_stop)
        return self.stopped

    def _propose(self, step: float | None) -> int:
        if step is None or self._cost is None or step <= 0:
            return 1
        wanted = math.ceil(self._cost / (TARGET_SHARE * step))
        cap = max(1, int(MAX_LATENCY / step))
        return max(1, min(wanted, cap, MAX_EVERY))

    def settle(self, stop: bool) -> bool:
        """At the end of the loop: agree once more, now (every rank leaves the loop at the same step)."""
        self.stopped = self.any(self.stopped or stop)[0]
        return self.stopped
