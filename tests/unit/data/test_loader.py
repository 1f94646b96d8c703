"""The data position: a resumed ResumableLoader hands out exactly the batches an uninterrupted one would."""

from __future__ import annotations

import io
import itertools
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from sdk.data.loader import ResumableLoader

N_SAMPLES = 22  # batches of 4: five full and one of 2, so 6 batches an epoch
BATCH = 4
PER_EPOCH = 6
TOTAL = 4 * PER_EPOCH


class CountingDataset(Dataset[int]):
    """Returns the index; counts every fetch in shared memory, so fetches in worker processes count too."""

    def __init__(self, n: int = N_SAMPLES) -> None:
        self.n = n
        self.fetches = torch.zeros(n, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.fetches[index] += 1
        return index


class _Stream(IterableDataset[int]):
    def __iter__(self) -> Any:
        return iter(range(3))


def _make(source: str, num_workers: int, seed: int = 0, **kwargs: Any) -> tuple[ResumableLoader, CountingDataset]:
    """A shuffling loader whose order comes from the DataLoader's generator, a sampler's, or the global RNG."""
    ds = CountingDataset()
    g = torch.Generator().manual_seed(seed)
    if source == "loader_generator":
        dl = DataLoader(ds, batch_size=BATCH, shuffle=True, generator=g, num_workers=num_workers, **kwargs)
    elif source == "sampler_generator":
        dl = DataLoader(ds, batch_size=BATCH, sampler=RandomSampler(ds, generator=g), num_workers=num_workers)
    else:
        dl = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=num_workers, **kwargs)
    return ResumableLoader(dl), ds


def _consume(batches: Any, count: int) -> list[tuple[list[int], float]]:
    """``count`` batches, each with a draw from the global RNG after it (as dropout would draw)."""
    return [(batch.tolist(), torch.rand(1).item()) for batch in itertools.islice(batches, count)]


def _checkpoint(loader: ResumableLoader) -> dict[str, Any]:
    """The loader state and the global torch RNG, through torch.save and a weights_only load."""
    buf = io.BytesIO()
    torch.save({"loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resume(source: str, num_workers: int, saved: dict[str, Any]) -> tuple[ResumableLoader, CountingDataset]:
    """A 'fresh process': other seeds everywhere, then the checkpoint restored (loader first, RNG after)."""
    torch.manual_seed(12345)
    loader, ds = _make(source, num_workers, seed=999)
    loader.load_state_dict(saved["loader"])
    torch.set_rng_state(saved["torch_rng"])
    return loader, ds


_REFERENCE: dict[tuple[str, int], list[tuple[list[int], float]]] = {}


def _reference(source: str, num_workers: int) -> list[tuple[list[int], float]]:
    if (source, num_workers) not in _REFERENCE:
        torch.manual_seed(7)
        loader, _ = _make(source, num_workers)
        _REFERENCE[(source, num_workers)] = _consume(loader.batches(), TOTAL)
    return _REFERENCE[(source, num_workers)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("source", ["loader_generator", "sampler_generator", "global"])
@pytest.mark.parametrize("stop", [3, PER_EPOCH, 2 * PER_EPOCH + 3], ids=["mid_epoch", "epoch_boundary", "epoch_2"])
def test_resumed_loader_continues_the_uninterrupted_sequence(source: str, num_workers: int, stop: int) -> None:
    """Stopped after ``stop`` batches and resumed elsewhere: the rest of the epoch and later epochs match exactly."""
    expected = _reference(source, num_workers)
    torch.manual_seed(7)
    first, _ = _make(source, num_workers)
    before = _consume(first.batches(), stop)
    saved = _checkpoint(first)
    resumed, _ = _resume(source, num_workers, saved)
    after = _consume(resumed.batches(), TOTAL - stop)
    assert before == expected[:stop]
    assert after == expected[stop:]
    # Sanity: the epochs really are shuffled differently, so matching them is not a coincidence.
    epochs = [[b for b, _ in expected[i : i + PER_EPOCH]] for i in range(0, TOTAL, PER_EPOCH)]
    assert len({str(e) for e in epochs}) == len(epochs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_batches_are_never_fetched(num_workers: int) -> None:
    """Resuming mid-epoch asks the dataset only for the remaining samples, never for the consumed ones."""
    torch.manual_seed(7)
    first, _ = _make("loader_generator", num_workers)
    consumed = [b for b, _ in _consume(first.batches(), 4)]
    saved = _checkpoint(first)
    resumed, ds = _resume("loader_generator", num_workers, saved)
    rest = [b.tolist() for b in resumed]  # the rest of epoch 0
    assert len(rest) == PER_EPOCH - 4
    assert sorted(i for b in consumed + rest for i in b) == list(range(N_SAMPLES))
    fetched = ds.fetches.tolist()
    assert all(fetched[i] == 0 for b in consumed for i in b)
    assert all(fetched[i] == 1 for b in rest for i in b)


def test_position_after_last_batch_of_an_epoch_is_the_next_epoch() -> None:
    """Once the last batch of an epoch is handed out, the state already points at the next epoch."""
    loader, _ = _make("loader_generator", 0)
    batches = loader.batches()
    _consume(batches, PER_EPOCH - 1)
    assert (loader.epoch, loader.batches_done) == (0, PER_EPOCH - 1)
    assert loader.state_dict()["epoch_started"] is True
    _consume(batches, 1)
    state = loader.state_dict()
    assert (state["epoch"], state["batches_done"], state["epoch_started"]) == (1, 0, False)
    assert state["global_rng_state"] is None


def test_per_epoch_loop_resumes_with_the_interrupted_epoch() -> None:
    """The plain `for epoch...: for batch in loader` loop resumes with the rest of the epoch, then whole ones."""
    torch.manual_seed(7)
    loader, _ = _make("loader_generator", 0)
    expected = [(e, b.tolist()) for e in range(3) for b in loader]
    torch.manual_seed(7)
    first, _ = _make("loader_generator", 0)
    for batch in first:
        if first.batches_done == 2:
            break
        del batch
    saved = _checkpoint(first)
    resumed, _ = _resume("loader_generator", 0, saved)
    assert resumed.epoch == 0
    got = [(e, b.tolist()) for e in range(resumed.epoch, 3) for b in resumed]
    assert got == expected[2:]


def test_breaking_out_and_iterating_again_continues_the_same_epoch() -> None:
    """A new iteration after a break continues the epoch where the broken one stopped."""
    torch.manual_seed(7)
    reference, _ = _make("global", 0)
    expected = [b.tolist() for b in itertools.islice(reference.batches(), 2 * PER_EPOCH)]
    torch.manual_seed(7)
    loader, ds = _make("global", 0)
    got = [b.tolist() for b in itertools.islice(iter(loader), 2)]
    got += [b.tolist() for b in itertools.islice(loader.batches(), 2 * PER_EPOCH - 2)]
    assert got == expected
    assert int(ds.fetches.sum()) == 2 * N_SAMPLES


def test_unbatched_loader_resumes_exactly() -> None:
    """With batch_size=None (the sampler yields single indices) the position is exact too."""

    def make(seed: int) -> ResumableLoader:
        g = torch.Generator().manual_seed(seed)
        return ResumableLoader(DataLoader(CountingDataset(), batch_size=None, shuffle=True, generator=g))

    expected = [int(x) for x in itertools.islice(make(0).batches(), 3 * N_SAMPLES)]
    first = make(0)
    got = [int(x) for x in itertools.islice(first.batches(), 30)]
    resumed = make(1)
    resumed.load_state_dict(_checkpoint(first)["loader"])
    got += [int(x) for x in itertools.islice(resumed.batches(), 3 * N_SAMPLES - 30)]
    assert got == expected


def test_distributed_sampler_is_told_the_epoch() -> None:
    """A sampler with set_epoch (DistributedSampler) gets each epoch's number, also after a resume."""

    def make() -> ResumableLoader:
        ds = CountingDataset()
        sampler: DistributedSampler[int] = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3)
        return ResumableLoader(DataLoader(ds, batch_size=BATCH, sampler=sampler))

    per_epoch = len(make())
    expected = [b.tolist() for b in itertools.islice(make().batches(), 3 * per_epoch)]
    first = make()
    got = [b.tolist() for b in itertools.islice(first.batches(), per_epoch + 1)]
    resumed = make()
    resumed.load_state_dict(_checkpoint(first)["loader"])
    got += [b.tolist() for b in itertools.islice(resumed.batches(), 2 * per_epoch - 1)]
    assert got == expected
    assert expected[:per_epoch] != expected[per_epoch : 2 * per_epoch]


def test_state_dict_loads_with_weights_only() -> None:
    """The state holds only ints, bools, None, lists and tensors: weights_only loading accepts it as is."""
    loader, _ = _make("loader_generator", 0)
    _consume(loader.batches(), 2)
    state = _checkpoint(loader)["loader"]
    assert state["epoch"] == 0
    assert state["batches_done"] == 2
    assert all(isinstance(s, torch.Tensor) for s in state["generator_states"])


def test_load_refuses_a_state_for_another_epoch_length() -> None:
    """A position saved with another dataset size or batch size is refused: it would mean nothing here."""
    loader, _ = _make("loader_generator", 0)
    other = ResumableLoader(DataLoader(CountingDataset(40), batch_size=BATCH, shuffle=True))
    with pytest.raises(ValueError, match="batches per epoch"):
        other.load_state_dict(loader.state_dict())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 99}, "version"),
        ({"batches_done": -1}, "non-negative int"),
        ({"batches_done": PER_EPOCH, "epoch_started": True}, "impossible"),
        ({"generator_states": []}, "generator states"),
        ({"generator_states": [torch.zeros(3, dtype=torch.uint8)]}, "does not fit"),
        ({"epoch_started": True, "batches_done": 1}, "global_rng_state"),
    ],
)
def test_load_refuses_a_malformed_state(change: dict[str, Any], message: str) -> None:
    """A malformed state raises ValueError saying which part is wrong."""
    loader, _ = _make("loader_generator", 0)
    state = {**loader.state_dict(), **change}
    with pytest.raises(ValueError, match=message):
        loader.load_state_dict(state)


def test_iterable_dataset_and_persistent_workers_are_refused() -> None:
    """Positions that cannot be restored exactly are refused at construction with the reason."""
    with pytest.raises(TypeError, match="map-style"):
        ResumableLoader(DataLoader(_Stream(), batch_size=2))
    with pytest.raises(ValueError, match="persistent_workers"):
        ResumableLoader(DataLoader(CountingDataset(), batch_size=2, num_workers=1, persistent_workers=True))
