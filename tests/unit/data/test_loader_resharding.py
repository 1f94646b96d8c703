"""Resuming on another number of ranks: the interrupted epoch is finished without loss or repeat, later epochs are
exactly those of an uninterrupted run on the new number of ranks."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from sdk.data.loader import ResumableLoader

N_SAMPLES = 48  # 4, 3 and 2 ranks split it evenly
BATCH = 2
SEED = 5


class Indices(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _loaders(world: int, *, n: int = N_SAMPLES, seed: int = SEED, **options: Any) -> list[ResumableLoader]:
    """One loader per rank of a ``world``-rank job, each with its DistributedSampler (shuffled, seeded)."""
    drop_last = options.pop("drop_last", False)
    options.setdefault("batch_size", BATCH)
    dataset = Indices(n)
    return [
        ResumableLoader(
            DataLoader(
                dataset,
                sampler=DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=drop_last),
                **options,
            )
        )
        for rank in range(world)
    ]


def _flat(batches: list[Any]) -> list[int]:
    return [i for b in batches for i in (b if isinstance(b, list) else [b])]


def _plain(batch: Any) -> Any:
    return batch.tolist() if isinstance(batch, torch.Tensor) else batch


def _take(loaders: list[ResumableLoader], k: int) -> list[list[Any]]:
    """Every rank takes ``k`` batches, in lockstep; each rank's batches as lists."""
    return [[_plain(b) for b in itertools.islice(iter(loader), k)] for loader in loaders]


def _epoch(loaders: list[ResumableLoader]) -> list[list[Any]]:
    """Every rank's rest of its current epoch."""
    return [[_plain(b) for b in loader] for loader in loaders]


def _saved(loaders: list[ResumableLoader]) -> list[dict[str, Any]]:
    """Each rank's loader state, through torch.save and a weights_only load (as a checkpoint stores it)."""
    buf = io.BytesIO()
    torch.save([loader.state_dict() for loader in loaders], buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resharded(states: list[dict[str, Any]], world: int, **options: Any) -> list[ResumableLoader]:
    """Fresh loaders of a ``world``-rank job, each loading what reshard_state_dict makes of ``states``."""
    loaders = _loaders(world, **options)
    for rank, loader in enumerate(loaders):
        loader.load_state_dict(loader.reshard_state_dict(states, rank=rank, world_size=world))
    return loaders


def _permutation(epoch: int, n: int = N_SAMPLES) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


def _split(rest: list[int], world: int, batch: int | None = BATCH) -> list[list[Any]]:
    """DistributedSampler's rule applied to ``rest``: padded with its start to a multiple of ``world``, rank ``r``
    taking ``r::world``; then batched (``batch=None``: unbatched)."""
    total = -(-len(rest) // world) * world
    shares = [(rest * world)[:total][r::world] for r in range(world)]
    if batch is None:
        return shares
    return [[share[i : i + batch] for i in range(0, len(share), batch)] for share in shares]


_REFERENCE: dict[int, list[list[list[Any]]]] = {}


def _uninterrupted(world: int) -> list[list[list[Any]]]:
    """Epochs 0, 1, 2 of an uninterrupted ``world``-rank run: [epoch][rank] -> batches."""
    if world not in _REFERENCE:
        loaders = _loaders(world)
        _REFERENCE[world] = [_epoch(loaders) for _ in range(3)]
    return _REFERENCE[world]


@pytest.mark.parametrize(("old", "new"), [(4, 2), (4, 3), (2, 4), (3, 2)])
@pytest.mark.parametrize("where", ["start", "first", "middle", "last", "end"])
def test_interrupted_epoch_is_finished_on_the_new_ranks_and_later_epochs_match(old: int, new: int, where: str) -> None:
    """N ranks stop after k batches; M ranks hand out the rest of the epoch's permutation split r::M, so each
    sample of the epoch is seen exactly once (plus DistributedSampler's padding of the rest when M does not
    divide it), then the next epoch is the uninterrupted M-rank run's, rank by rank."""
    per_epoch = N_SAMPLES // old // BATCH
    k = {"start": 0, "first": 1, "middle": per_epoch // 2, "last": per_epoch - 1, "end": per_epoch}[where]
    first = _loaders(old)
    consumed = _flat([b for rank in _take(first, k) for b in rank])
    resumed = _resharded(_saved(first), new)
    reference = _uninterrupted(new)
    if k == per_epoch:  # the epoch was finished: the new ranks start the next one whole
        assert sorted(consumed) == list(range(N_SAMPLES))
        assert [loader.epoch for loader in resumed] == [1] * new
        assert _epoch(resumed) == reference[1]
        assert _epoch(resumed) == reference[2]
        return
    perm = _permutation(0)
    assert sorted(consumed) == sorted(perm[: old * k * BATCH])
    rest = perm[old * k * BATCH :]
    remainder = _epoch(resumed)
    assert remainder == _split(rest, new)
    seen = Counter(consumed + _flat([b for rank in remainder for b in rank]))
    padding = Counter(rest[: -len(rest) % new])
    assert seen == Counter(range(N_SAMPLES)) + padding
    if len(rest) % new == 0:
        assert sorted(seen.elements()) == list(range(N_SAMPLES))
    if k == 0:
        assert remainder == reference[0]
    assert [loader.epoch for loader in resumed] == [1] * new
    assert _epoch(resumed) == reference[1]


def test_rest_of_a_non_divisible_epoch_is_padded_like_distributed_sampler() -> None:
    """50 samples, 4 ranks stop after 3 batches of 2 (24 samples); 3 ranks split the 26 left, 9 each: the rest's
    first sample is handed out twice (DistributedSampler's padding), every other sample of the epoch once."""
    first = _loaders(4, n=50)
    consumed = _flat([b for rank in _take(first, 3) for b in rank])
    resumed = _resharded(_saved(first), 3, n=50)
    remainder = _epoch(resumed)
    rest = _permutation(0, 50)[24:]
    assert [len(_flat(rank)) for rank in remainder] == [9, 9, 9]
    assert remainder == _split(rest, 3)
    seen = Counter(consumed + _flat([b for rank in remainder for b in rank]))
    assert seen == Counter(range(50)) + Counter([rest[0]])


def test_rest_of_an_epoch_with_drop_last_loses_only_the_new_ranks_tail() -> None:
    """With drop_last the new ranks cut the rest to a multiple of their number, as DistributedSampler cuts an
    epoch: 50 samples, 24 consumed on 4 ranks, 26 left over 3 ranks: 8 each, the rest's last 2 are not seen."""
    first = _loaders(4, n=50, drop_last=True)
    consumed = _flat([b for rank in _take(first, 3) for b in rank])
    resumed = _resharded(_saved(first), 3, n=50, drop_last=True)
    remainder = _epoch(resumed)
    perm = _permutation(0, 50)
    assert [len(_flat(rank)) for rank in remainder] == [8, 8, 8]
    assert sorted(consumed + _flat([b for rank in remainder for b in rank])) == sorted(perm[:48])
    uninterrupted = _loaders(3, n=50, drop_last=True)
    _epoch(uninterrupted)
    assert _epoch(resumed) == _epoch(uninterrupted)


def test_resharded_epoch_can_be_saved_and_resharded_again() -> None:
    """4 ranks → 3 ranks → (saved, resumed on 3 ranks) → 2 ranks within one epoch: every sample once, the
    same-size resume inside the remainder is exact, and the next epoch is the 2-rank run's."""
    perm = _permutation(0)
    first = _loaders(4)
    seen = _flat([b for rank in _take(first, 2) for b in rank])  # 16 consumed, 32 left: 11 each on 3 ranks
    second = _resharded(_saved(first), 3)
    seen += _flat([b for rank in _take(second, 1) for b in rank])  # 22 consumed
    saved = _saved(second)
    assert [s["sharding"]["samples_consumed"] for s in saved] == [22] * 3
    continued = _take(second, 2)
    again = _loaders(3)
    for loader, state in zip(again, saved, strict=True):
        loader.load_state_dict(state)
    assert _take(again, 2) == continued
    seen += _flat([b for rank in continued for b in rank])  # 34 consumed, 14 left: 7 each on 2 ranks
    third = _resharded(_saved(again), 2)
    remainder = _epoch(third)
    assert remainder == _split(perm[34:], 2)
    seen += _flat([b for rank in remainder for b in rank])
    assert sorted(seen) == list(range(N_SAMPLES))
    assert sorted(seen[:34]) == sorted(perm[:34])
    assert _epoch(third) == _uninterrupted(2)[1]


def test_same_number_of_ranks_gets_each_rank_its_own_state() -> None:
    """Asked for the same number of ranks, the hook returns each rank's own saved state: the exact path."""
    first = _loaders(2)
    _take(first, 3)
    states = _saved(first)
    again = _loaders(2)
    for rank, loader in enumerate(again):
        returned = loader.reshard_state_dict(states, rank=rank, world_size=2)
        assert returned.keys() == states[rank].keys()
        assert returned["sharding"] == states[rank]["sharding"]
        loader.load_state_dict(returned)
    assert _epoch(again) == _epoch(first)


@pytest.mark.parametrize("options", [{"num_workers": 2}, {"batch_size": None}], ids=["workers", "unbatched"])
def test_resharding_works_with_workers_and_unbatched_loaders(options: dict[str, Any]) -> None:
    """The remainder replaces the sampler's order also through worker processes and without batching."""
    batch = options.get("batch_size", BATCH)
    first = _loaders(4, **options)
    consumed = _flat([b for rank in _take(first, 3) for b in rank])
    resumed = _resharded(_saved(first), 3, **options)
    remainder = _epoch(resumed)
    assert remainder == _split(_permutation(0)[4 * 3 * (batch or 1) :], 3, batch)
    assert sorted(consumed + _flat([b for rank in remainder for b in rank])) == list(range(N_SAMPLES))
    reference = _loaders(3, **options)
    _epoch(reference)
    assert _epoch(resumed) == _epoch(reference)


def test_version_1_state_still_loads_on_the_same_ranks() -> None:
    """A state saved before the sharding record (version 1) continues as before on the same number of ranks,
    and is refused, with the way out, for another number."""
    first = _loaders(2)
    _take(first, 2)
    states = _saved(first)
    for state in states:
        state["version"] = 1
        del state["sharding"]
    again = _loaders(2)
    for loader, state in zip(again, states, strict=True):
        loader.load_state_dict(state)
    assert _epoch(again) == _epoch(first)
    with pytest.raises(ValueError, match=r"version 1.*WORLD_SIZE=2"):
        _loaders(3)[0].reshard_state_dict(states, rank=0, world_size=3)


def _tamper(states: list[dict[str, Any]], rank: int, key: str, value: Any) -> list[dict[str, Any]]:
    if key.startswith("sharding."):
        states[rank]["sharding"][key.split(".", 1)[1]] = value
    else:
        states[rank][key] = value
    return states


@pytest.mark.parametrize(
    ("rank", "key", "value", "message"),
    [
        (1, "epoch", 1, "disagree: rank 1 has epoch=1"),
        (2, "batches_done", 3, "rank 2's loader state samples_consumed"),
        (3, "sharding.seed", 6, "disagree: rank 3 has seed=6"),
        (0, "sharding.rank", 1, "pass the saved states in rank order"),
        (0, "sharding.samples_consumed", 10**9, "samples_consumed 1000000000 does not add up"),
        (0, "sharding.segment_start", 48, "beyond the epoch"),
        (0, "sharding.segment_start", -1, "non-negative int"),
        (0, "batches_done", 6, "impossible"),
        (0, "batches_done", "2", "non-negative int"),
        (0, "sharding.shuffle", 1, "must be a bool"),
        (0, "sharding", "x", "must be a dict"),
        (0, "sharding", None, "without a DistributedSampler"),
        (0, "version", 99, "version 99"),
    ],
)
def test_inconsistent_or_malformed_states_are_refused(rank: int, key: str, value: Any, message: str) -> None:
    """States that disagree or are malformed raise ValueError saying what is wrong, never a crash."""
    first = _loaders(4)
    _take(first, 2)
    states = _tamper(_saved(first), rank, key, value)
    with pytest.raises(ValueError, match=message):
        _loaders(2)[0].reshard_state_dict(states, rank=0, world_size=2)


@pytest.mark.parametrize(
    ("states", "message"),
    [(None, "non-empty list"), ([], "non-empty list"), ([None, None], "must be a dict"), ("abc", "non-empty list")],
)
def test_states_that_are_not_a_list_of_states_are_refused(states: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _loaders(2)[0].reshard_state_dict(states, rank=0, world_size=2)


def test_ranks_saved_at_different_steps_are_refused() -> None:
    """Rank 1's state from one batch later than the others': the ranks were not in lockstep, so no position."""
    first = _loaders(4)
    _take(first, 2)
    states = _saved(first)
    _take(first[1:2], 1)
    states[1] = _saved(first[1:2])[0]
    with pytest.raises(ValueError, match="disagree: rank 1 has batches_done=3, rank 0 batches_done=2"):
        _loaders(2)[0].reshard_state_dict(states, rank=0, world_size=2)


def test_states_of_fewer_ranks_than_saved_are_refused() -> None:
    first = _loaders(4)
    _take(first, 1)
    with pytest.raises(ValueError, match="one of 4 ranks, but 3 states"):
        _loaders(2)[0].reshard_state_dict(_saved(first)[:3], rank=0, world_size=2)


def test_another_order_or_another_rank_is_refused() -> None:
    """A new sampler that orders epochs differently, or that is not the rank asked for, is refused."""
    first = _loaders(4)
    _take(first, 1)
    states = _saved(first)
    with pytest.raises(ValueError, match=r"order epochs differently \(seed=5 vs seed=9\)"):
        _loaders(2, seed=9)[0].reshard_state_dict(states, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"dataset_len=48 vs dataset_len=40"):
        _loaders(2, n=40)[0].reshard_state_dict(states, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 0 of 2, asked for rank 1 of 3"):
        _loaders(2)[0].reshard_state_dict(states, rank=1, world_size=3)


def test_loader_without_distributed_sampler_cannot_be_resharded() -> None:
    """Each rank of a RandomSampler job draws its own order: the position is refused, with what to do."""
    dataset = Indices(N_SAMPLES)
    saved = [ResumableLoader(DataLoader(dataset, batch_size=BATCH, shuffle=True)).state_dict() for _ in range(4)]
    loader = ResumableLoader(DataLoader(dataset, batch_size=BATCH, sampler=RandomSampler(dataset)))
    with pytest.raises(ValueError, match=r"not a DistributedSampler: each rank draws its own order.*WORLD_SIZE=4"):
        loader.reshard_state_dict(saved, rank=0, world_size=2)
    with pytest.raises(ValueError, match="without a DistributedSampler"):
        _loaders(2)[0].reshard_state_dict(saved, rank=0, world_size=2)


def test_same_size_state_of_another_rank_is_refused() -> None:
    """Loading rank 1's state into rank 0 (a checkpoint layer mix-up) is refused, not silently misplaced."""
    first = _loaders(2)
    _take(first, 1)
    with pytest.raises(ValueError, match="rank=1 vs rank=0"):
        _loaders(2)[0].load_state_dict(_saved(first)[1])
