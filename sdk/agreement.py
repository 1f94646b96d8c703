"""Decisions every rank takes together: when to stop, whether to save, whether the emergency save fits.

A SIGTERM reaches the ranks of a pod at slightly different moments, so each rank sees it at a different step;
clocks differ, so a time-based save policy falls due at different steps; and one rank may still be writing a
checkpoint while another is not. Acting on such local views, ranks would stop or save at different steps, and
the next collective would hang. :class:`Agreement` makes these decisions with ``all_reduce`` over a gloo
process group (the default group when it is gloo, otherwise one made for this, so it runs on the CPU beside NCCL).

**How often the stop is agreed.** :meth:`stop` is called once per step by every rank. A blocking all-reduce each
step would add its round trip to every step, so the agreement is *pipelined*: each call starts an asynchronous
all-reduce (MAX) of this rank's flag and reads the one the previous call started, which has long finished. All
ranks read the same result at the same call, so they stop at the same step — one step after the first rank
saw the signal. The per-step cost is starting one small all-reduce (measured in ``make bench``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sdk.errors import ConfigError

__all__ = ["Agreement"]


class Agreement:
    """Cross-rank decisions over a gloo group (created on first use, by every rank at the same point)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._group: Any = None
        self._ready = False
        self._pending: Any = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self.stopped = False
        self.collectives = 0

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

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag: whether it is true on any rank (blocking)."""
        group = self._ensure_group()
        values = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        self.collectives += 1
        return tuple(bool(v) for v in values.tolist())

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every rank (blocking)."""
        return not self.any(not flag)[0]

    def stop(self, local: bool) -> bool:
        """The agreed stop decision, one call late (see the module's doc); once true, true for good."""
        if self.stopped:
            return True
        group = self._ensure_group()
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            if self._flag.item():
                self.stopped = True
                return True
        self._flag = torch.tensor([int(local)], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=group, async_op=True)
        self.collectives += 1
        return False

    def settle(self, local: bool) -> bool:
        """At the end of the loop: finish a pending stop agreement and agree once more, blocking."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            self.stopped = self.stopped or bool(self._flag.item())
        self.stopped = self.any(self.stopped or local)[0]
        return self.stopped
