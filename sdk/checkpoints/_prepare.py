"""What a save writes: the state's payloads, and its sharded part planned with every rank.

In a job of several ranks with ``torch.distributed`` initialized, the state's modules and optimizers are sharded
state (:mod:`sdk.checkpoints._sharded`): planned here with every rank (collectives, in the caller's thread — the
training thread, at the same step on every rank), each rank's items becoming its ``sharded`` payload; the rest
of the state is per rank. Anywhere else (one rank, or ranks without a process group) everything is per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.checkpoints import _state as trainstate

__all__ = ["Prepared", "ShardedPart", "distributed", "prepare"]


@dataclass(frozen=True)
class ShardedPart:
    """The sharded state of a save: its names, and (rank 0) the index of the whole checkpoint to write."""

    names: tuple[str, ...]
    index: bytes | None


@dataclass(frozen=True)
class Prepared:
    """A save, ready to write: ``(name, payload)`` pairs and the sharded part (None: nothing is sharded)."""

    payloads: list[tuple[str, Any]]
    sharded: ShardedPart | None


def distributed(world_size: int) -> bool:
    """Whether the ranks of this job can run collectives (several ranks, torch.distributed initialized)."""
    if world_size < 2:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def prepare(
    state: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    collective: Callable[[], Any],
    plans: dict[str, Any] | None = None,
) -> Prepared:
    """The payloads of a save of ``state``; ``collective()`` gives the ranks' collective when it is needed.

    ``plans``: where the job keeps its last agreed plan between saves (:class:`sdk.checkpoints._sharded.PlanCache`).
    """
    trainstate.check(state)
    if not distributed(world_size):
        return Prepared(list(trainstate.payloads(state)), None)
    from sdk.checkpoints import _sharded

    names = [k for k, v in state.items() if _sharded.saves_sharded(v)]
    if not names:
        return Prepared(list(trainstate.payloads(state)), None)
    cache = None if plans is None else plans.setdefault("cache", _sharded.PlanCache())
    planned = _sharded.plan(
        {k: state[k] for k in names},
        rank=rank,
        world_size=world_size,
        collective=collective(),
        cache=cache,
    )
    payloads = list(trainstate.payloads({k: v for k, v in state.items() if k not in names}))
    if planned.items:
        payloads.append((trainstate.SHARDED_STEM, planned.items))
    return Prepared(payloads, ShardedPart(tuple(names), planned.index))
