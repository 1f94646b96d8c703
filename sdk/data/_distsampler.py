"""DistributedSampler's order as arithmetic, so that a position in an epoch carries over to another number of ranks.

DistributedSampler orders epoch ``e`` as one permutation of the dataset (``randperm`` seeded ``seed + e``, or
``range`` when it does not shuffle), pads it by repeating its start up to a multiple of the ranks (or, with
``drop_last``, cuts its tail), and gives rank ``r`` of ``N`` the entries ``r::N``. So ``N`` ranks in lockstep
that each consumed ``c`` entries have together consumed exactly the prefix ``[:N*c]`` of the permutation. While
the epoch is unfinished that prefix never reaches the padding (``N*c < len``), so its length,
``samples_consumed``, is the position in terms that every world size understands.

The rest of an interrupted epoch is a *segment*: the permutation from ``segment_start`` on, split over the
ranks by DistributedSampler's own rules (padded by repeating the segment's start, or cut with ``drop_last``,
to a multiple of the ranks; rank ``r`` takes ``r::M``) and batched like the loader's BatchSampler. A segment
starting at 0 is DistributedSampler's whole epoch. Ranks working through a segment in lockstep again consume a
prefix of it, so a segment can be cut and carried over again: positions chain over any number of changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

__all__ = ["Layout", "describe", "merged_position", "saved_segment_start"]

# What a saved layout records; ``rank`` and ``num_replicas`` are the saving rank's.
_INTS = ("dataset_len", "num_replicas", "rank", "seed", "batch_size")
_BOOLS = ("shuffle", "drop_last", "drop_last_batch")
# What must be equal for two layouts to describe the same sequence of epochs.
_ORDER = ("dataset_len", "seed", "shuffle")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one rank's DistributedSampler, and the batch sampler around it, cut every epoch."""

    dataset_len: int
    num_replicas: int
    rank: int
    seed: int
    shuffle: bool
    drop_last: bool
    batch_size: int  # 1 for an unbatched loader (each entry is one index)
    drop_last_batch: bool
    batched: bool = dataclasses.field(default=True, compare=False)

    def per_rank(self, start: int) -> int:
        """Indices each rank gets from the segment that starts at ``start`` (DistributedSampler's num_samples)."""
        rest = self.dataset_len - start
        return rest // self.num_replicas if self.drop_last else -(-rest // self.num_replicas)

    def batches(self, start: int) -> int:
        """Batches each rank gets from the segment that starts at ``start``."""
        samples = self.per_rank(start)
        return samples // self.batch_size if self.drop_last_batch else -(-samples // self.batch_size)

    def consumed(self, start: int, batches_done: int) -> int:
        """Entries of the epoch's permutation consumed by all ranks once each handed out ``batches_done``."""
        taken = min(batches_done * self.batch_size, self.per_rank(start))
        return start + min(self.num_replicas * taken, self.dataset_len - start)

    def entries(self, epoch: int, start: int) -> list[Any]:
        """This rank's batches (indices when unbatched) of the segment, as DistributedSampler + BatchSampler give."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order: list[int] = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        rest = order[start:]
        total = self.per_rank(start) * self.num_replicas
        if total > len(rest):
            padding = total - len(rest)
            rest += (rest * math.ceil(padding / len(rest)))[:padding]
        mine = rest[self.rank : total : self.num_replicas]
        if not self.batched:
            return mine
        size = self.batch_size
        batches = [mine[i : i + size] for i in range(0, len(mine), size)]
        if self.drop_last_batch and batches and len(batches[-1]) < size:
            batches.pop()
        return batches

    def state(self, start: int, batches_done: int) -> dict[str, Any]:
        """The layout and the position, as saved in a loader state (plain ints and bools)."""
        fields = {name: getattr(self, name) for name in (*_INTS, *_BOOLS)}
        return {**fields, "segment_start": start, "samples_consumed": self.consumed(start, batches_done)}

    def difference(self, other: Layout, names: tuple[str, ...] = (*_INTS, *_BOOLS)) -> str | None:
        """The first of ``names`` in which the layouts differ, as ``name=mine vs name=other``; None if none."""
        for name in names:
            if getattr(self, name) != getattr(other, name):
                return f"{name}={getattr(self, name)!r} vs {name}={getattr(other, name)!r}"
        return None


def describe(loader: DataLoader[Any]) -> Layout | str:
    """The loader's layout, or why its order is not DistributedSampler's (so its position cannot be resharded)."""
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return f"its batch sampler is a {type(batch_sampler).__name__}, whose batches podtrain cannot recompute"
    sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
    if not isinstance(sampler, DistributedSampler):
        return (
            f"its sampler is a {type(sampler).__name__}, not a DistributedSampler: each rank draws its own order, "
            "so the ranks' positions are not one position in a shared order"
        )
    if type(sampler) is not DistributedSampler:
        return f"its sampler is a {type(sampler).__name__}, a DistributedSampler subclass that may order differently"
    batched = batch_sampler is not None
    batch_size, drop_last_batch = (batch_sampler.batch_size, batch_sampler.drop_last) if batch_sampler else (1, False)
    layout = Layout(
        dataset_len=len(sampler.dataset),  # type: ignore[arg-type]
        num_replicas=int(sampler.num_replicas),
        rank=int(sampler.rank),
        seed=int(sampler.seed),
        shuffle=bool(sampler.shuffle),
        drop_last=bool(sampler.drop_last),
        batch_size=int(batch_size),
        drop_last_batch=bool(drop_last_batch),
        batched=batched,
    )
    if layout.per_rank(0) != len(sampler) or layout.batches(0) != len(loader):
        return "its DistributedSampler's length does not fit its dataset's (did the dataset change size?)"
    return layout


def parse(saved: Any, where: str) -> tuple[Layout, int, int]:
    """``(layout, segment_start, samples_consumed)`` of a saved ``sharding`` entry; ValueError when malformed."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where} must be a dict, got {type(saved).__name__}")
    for name in (*_INTS, "segment_start", "samples_consumed"):
        value = saved.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and name != "seed"):
            raise ValueError(f"{where} {name} must be a non-negative int, got {value!r}")
    for name in _BOOLS:
        if not isinstance(saved.get(name), bool):
            raise ValueError(f"{where} {name} must be a bool, got {saved.get(name)!r}")
    layout = Layout(**{name: saved[name] for name in (*_INTS, *_BOOLS)})
    if layout.num_replicas < 1 or layout.rank >= layout.num_replicas or layout.batch_size < 1:
        raise ValueError(
            f"{where} has rank {layout.rank} of {layout.num_replicas} with batch size {layout.batch_size}: "
            "impossible (needs 0 <= rank < num_replicas and batch_size >= 1)"
        )
    start = saved["segment_start"]
    if start >= max(layout.dataset_len, 1):
        raise ValueError(f"{where} segment_start {start} is beyond the epoch's {layout.dataset_len} samples")
    return layout, start, saved["samples_consumed"]


def check_position(layout: Layout, start: int, consumed: int, batches_done: int, where: str) -> None:
    """ValueError unless ``batches_done`` fits the segment and ``consumed`` is what it adds up to."""
    if batches_done and batches_done >= layout.batches(start):
        raise ValueError(
            f"{where} batches_done {batches_done} is impossible: the epoch's remainder from sample {start} has "
            f"{layout.batches(start)} batches per rank"
        )
    if consumed != layout.consumed(start, batches_done):
        raise ValueError(
            f"{where} samples_consumed {consumed} does not add up to {layout.consumed(start, batches_done)} "
            f"({batches_done} batches of {layout.batch_size} on {layout.num_replicas} ranks from sample {start})"
        )


def saved_segment_start(state: dict[str, Any], layout: Layout | None) -> int:
    """Where a same-size state's remainder starts (0: whole epochs); ValueError when its sharding does not fit."""
    sharding = state.get("sharding")
    if state["version"] == 1 or (sharding is None and layout is None):
        return 0
    if layout is None or sharding is None:
        have = "has no" if layout is None else "has a"
        raise ValueError(f"loader state does not fit: this loader {have} DistributedSampler, the saving one not")
    saved, start, consumed = parse(sharding, "loader state sharding")
    difference = saved.difference(layout)
    if difference is not None:
        raise ValueError(
            f"loader state is for another DistributedSampler layout ({difference}): load each rank's own "
            "state, or on another number of ranks the one reshard_state_dict returns"
        )
    check_position(saved, start, consumed, state["batches_done"], "loader state")
    return start


def merged_position(states: Any, new: Layout | str, *, rank: int, world_size: int) -> tuple[int, int]:
    """``(epoch, samples consumed)`` that the saved ranks' states (index = old rank) describe together, for
    ``new``, the layout of ``rank`` of ``world_size`` (or why that loader has none).

    ValueError when a state is malformed, saved without a DistributedSampler or by an older version, when the
    states disagree (another epoch, step or sampler), or when their order is not ``new``'s.
    """
    count = len(states) if isinstance(states, list | tuple) else "N"
    if isinstance(new, str):
        raise ValueError(
            f"cannot carry this loader's position to another number of ranks: {new}; "
            f"use a DistributedSampler, or resume with WORLD_SIZE={count}"
        )
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"reshard_state_dict {name} must be an int, got {value!r}")
    if (new.rank, new.num_replicas) != (rank, world_size):
        raise ValueError(
            f"this loader's DistributedSampler is rank {new.rank} of {new.num_replicas}, asked for rank {rank} "
            f"of {world_size}: build it with rank={rank}, num_replicas={world_size}"
        )
    if not isinstance(states, list | tuple) or not states:
        raise ValueError(
            f"the saved loader states must be a non-empty list (index = old rank), got {type(states).__name__}"
        )
    count = len(states)
    positions = [_rank_position(state, index, count) for index, state in enumerate(states)]
    for index, position in enumerate(positions[1:], start=1):
        for name, value in position.items():
            if value != positions[0][name]:
                raise ValueError(
                    f"the saved loader states disagree: rank {index} has {name}={value!r}, rank 0 "
                    f"{name}={positions[0][name]!r}; all ranks must be saved at the same step of the same run"
                )
    old, _, _ = parse(states[0]["sharding"], "rank 0's loader state sharding")
    difference = old.difference(new, _ORDER)
    if difference is not None:
        raise ValueError(
            f"the saved job's DistributedSampler and this one order epochs differently ({difference}): "
            "resume with the same dataset, seed and shuffle"
        )
    return positions[0]["epoch"], positions[0]["samples_consumed"]


def _rank_position(state: Any, index: int, count: int) -> dict[str, Any]:
    where = f"rank {index}'s loader state"
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a dict from ResumableLoader.state_dict(), got {type(state).__name__}")
    if state.get("version") == 1:
        raise ValueError(
            f"{where} has version 1, which does not record the ranks' shared position: resume with WORLD_SIZE={count}"
        )
    if state.get("version") != 2:
        raise ValueError(f"{where} has version {state.get('version')!r}, expected 2")
    for name in ("epoch", "batches_done"):
        value = state.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where} {name} must be a non-negative int, got {value!r}")
    if state.get("sharding") is None:
        raise ValueError(
            f"{where} comes from a loader without a DistributedSampler: each rank drew its own order, so the "
            f"position cannot be split over another number of ranks; resume with WORLD_SIZE={count}"
        )
    layout, start, consumed = parse(state["sharding"], f"{where} sharding")
    if layout.num_replicas != count:
        raise ValueError(f"{where} was saved by one of {layout.num_replicas} ranks, but {count} states were given")
    if layout.rank != index:
        raise ValueError(f"{where} is rank {layout.rank}'s: pass the saved states in rank order")
    check_position(layout, start, consumed, state["batches_done"], where)
    fields = dataclasses.asdict(layout)
    del fields["rank"], fields["batched"]
    return {
        "epoch": state["epoch"],
        "batches_done": state["batches_done"],
        **fields,
        "segment_start": start,
        "samples_consumed": consumed,
    }
