"""Sharded state in one process: DCP's save plan over a 1-rank gloo group, and the load by podtrain's steps
(:mod:`sdk.checkpoints._shardload`) from payloads in memory."""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import MetadataIndex

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.checkpoints import _sharded, _shardload
from sdk.errors import CheckpointError, InvalidCheckpointError

LOCATION = "mem://ckpt/step-0000000003"


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    """A process group of one gloo rank over an in-memory store (no port, no network)."""
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


class OneRank:
    """The collective of a job of one rank: the default group, every flag its own, rank 0's value its own."""

    def group(self) -> Any:
        return None

    def any(self, *flags: bool) -> tuple[bool, ...]:
        return tuple(flags)

    def broadcast(self, value: Any) -> Any:
        return value


def _trained(seed: int, lr: float) -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
    """A small model and an Adam that has stepped once (so it has moments and step counts)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _plan(state: Mapping[str, Any]) -> _sharded.Planned:
    return _sharded.plan(state, rank=0, world_size=1, collective=OneRank())


def _payload(planned: _sharded.Planned) -> dict[str, Any]:
    """The items as a load would get them back: copies, not the saved objects' own tensors."""
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else pickle.loads(pickle.dumps(v))
        for k, v in planned.items.items()
    }


class MemoryPayloads:
    """Rank 0's items in memory, as :class:`sdk.checkpoints._shardread.StoredPayloads` gives a store's."""

    def __init__(self, items: dict[str, Any], asked: list[int] | None = None) -> None:
        self.items, self.asked = items, asked if asked is not None else []

    def lookup(self, rank: int, key: str) -> Any:
        if rank != 0 or key not in self.items:
            raise InvalidCheckpointError(LOCATION, f"the files of rank {rank} hold no {key!r}")
        value = self.items[key]
        return _shardload.TensorSpec(value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value

    def tensors(self, wanted: Iterable[tuple[int, str]]) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
        for rank, key in wanted:
            self.asked.append(rank)
            yield (rank, key), self.items[key]


def _load(objects: dict[str, Any], planned: _sharded.Planned, payloads: MemoryPayloads) -> None:
    """The three steps of a load, as sdk.checkpoints._restore takes them."""
    setup = _shardload.setup_load(objects, _index(planned), location=LOCATION)
    assert setup.saving_ranks == [0]
    _shardload.check(setup, payloads, location=LOCATION)
    _shardload.load(objects, setup, payloads, location=LOCATION)


def _index(planned: _sharded.Planned) -> dcpmeta.Index:
    assert planned.index is not None
    return dcpmeta.check(planned.index, location=LOCATION)


def _same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa["param_groups"] != sb["param_groups"] or sa["state"].keys() != sb["state"].keys():
        return False
    return all(
        sa["state"][p].keys() == sb["state"][p].keys()
        and all(torch.equal(sa["state"][p][k], sb["state"][p][k]) for k in sa["state"][p])
        for p in sa["state"]
    )


def test_plan_names_every_item_by_item_key_and_its_index_checks(one_rank: None) -> None:
    """Rank 0 of 1 writes every item, each under item_key of its DCP index; the index names those places."""
    model, optimizer = _trained(0, 0.01)
    planned = _plan({"model": model, "optim": optimizer})
    index = _index(planned)
    assert index.world_size == 1
    places = {(c.rank, c.key) for t in index.tensors.values() for c in t.chunks} | set(index.objects.values())
    assert {key for _, key in places} == set(planned.items)
    assert {rank for rank, _ in places} == {0}
    for fqn, tensor in index.tensors.items():
        for chunk in tensor.chunks:
            assert chunk.key == _sharded.item_key(MetadataIndex(fqn, torch.Size(chunk.offsets)))
    for fqn, (_, key) in index.objects.items():
        assert key == _sharded.item_key(MetadataIndex(fqn))
    assert torch.equal(planned.items["model.0.weight@0.0"], model.state_dict()["0.weight"])
    assert planned.items["optim.param_groups.0.lr"] == 0.01


def test_item_key_is_the_name_and_the_chunks_offsets() -> None:
    assert _sharded.item_key(MetadataIndex("model.w", torch.Size([2, 0]))) == "model.w@2.0"
    assert _sharded.item_key(MetadataIndex("optim.param_groups.0.lr")) == "optim.param_groups.0.lr"


def test_load_restores_a_fresh_model_and_optimizer_exactly(one_rank: None) -> None:
    """Planned on one model and Adam, loaded into others: parameters, moments, steps and lr are the saved ones."""
    model, optimizer = _trained(0, 0.01)
    planned = _plan({"model": model, "optim": optimizer})
    fresh, fresh_optimizer = _trained(1, 0.5)
    assert not torch.equal(fresh.state_dict()["0.weight"], model.state_dict()["0.weight"])
    payloads = MemoryPayloads(_payload(planned))
    _load({"model": fresh, "optim": fresh_optimizer}, planned, payloads)
    assert payloads.asked and set(payloads.asked) == {0}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert _same_optimizer_state(optimizer, fresh_optimizer)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.01


def test_a_payload_without_a_key_of_the_index_is_invalid_before_anything_is_read(one_rank: None) -> None:
    model, optimizer = _trained(0, 0.01)
    planned = _plan({"model": model, "optim": optimizer})
    payload = _payload(planned)
    del payload["model.2.bias@0"]
    fresh, fresh_optimizer = _trained(1, 0.5)
    payloads = MemoryPayloads(payload)
    with pytest.raises(InvalidCheckpointError, match=r"the files of rank 0 hold no 'model\.2\.bias@0'"):
        _load({"model": fresh, "optim": fresh_optimizer}, planned, payloads)
    assert payloads.asked == []


@pytest.mark.parametrize(
    "wrong",
    [torch.zeros(3, 3), torch.zeros(3, 4, dtype=torch.float64), torch.zeros(12), "weights"],
    ids=["shape", "dtype", "flat", "not-a-tensor"],
)
def test_a_chunk_that_is_not_what_the_index_says_is_invalid_before_anything_is_read(one_rank: None, wrong: Any) -> None:
    """The saved [3, 4] float32 weight replaced by another shape, dtype or object: damage, named, found by the check
    before the load reads a tensor."""
    model, optimizer = _trained(0, 0.01)
    planned = _plan({"model": model, "optim": optimizer})
    payload = _payload(planned)
    payload["model.0.weight@0.0"] = wrong
    fresh, fresh_optimizer = _trained(1, 0.5)
    payloads = MemoryPayloads(payload)
    with pytest.raises(
        InvalidCheckpointError, match=r"'model.0.weight@0.0' is .*, the index says torch.float32 \[3, 4\]"
    ):
        _load({"model": fresh, "optim": fresh_optimizer}, planned, payloads)
    assert payloads.asked == []


def test_a_model_of_another_shape_does_not_fit_and_is_not_damage(one_rank: None) -> None:
    """A [3, 4] weight saved, a [5, 4] one to load into: CheckpointError (a mismatch to fix), not invalid."""
    model, _ = _trained(0, 0.01)
    planned = _plan({"model": model})
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match="does not fit") as info:
        _load({"model": other}, planned, MemoryPayloads(_payload(planned)))
    assert not isinstance(info.value, InvalidCheckpointError)


def test_an_optimizer_stepping_parameters_of_no_model_in_the_state_is_refused() -> None:
    """Its state is keyed by parameter names, which only the model holding its parameters can give."""
    _, optimizer = _trained(0, 0.01)
    unrelated, _ = _trained(1, 0.01)
    with pytest.raises(CheckpointError, match="optimizer 'optim' steps parameters that no single model"):
        _sharded.state_dicts({"model": unrelated, "optim": optimizer})
    with pytest.raises(CheckpointError, match="no single model"):
        _sharded.state_dicts({"optim": optimizer})


def test_a_save_plan_with_an_optimizer_of_no_model_is_refused_on_every_rank(one_rank: None) -> None:
    """The rank that cannot plan still takes part in the collectives, then the plan raises, naming the rank."""
    _, optimizer = _trained(0, 0.01)
    unrelated, _ = _trained(1, 0.01)
    with pytest.raises(CheckpointError, match=r"could not be planned \(rank 0\): optimizer 'optim' steps parameters"):
        _plan({"model": unrelated, "optim": optimizer})


def test_objects_are_put_in_place_as_fetched_without_unpickling(
    one_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimizer's lr (a BYTE_IO item) comes back as the payload holds it, with torch.load and pickle disabled."""
    model, optimizer = _trained(0, 0.01)
    planned = _plan({"model": model, "optim": optimizer})
    payload = _payload(planned)
    payload["optim.param_groups.0.lr"] = 0.125

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an object of the checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    fresh, fresh_optimizer = _trained(1, 0.5)
    _load({"model": fresh, "optim": fresh_optimizer}, planned, MemoryPayloads(payload))
    assert fresh_optimizer.param_groups[0]["lr"] == 0.125


calls: list[str] = []


def _record(what: str) -> None:
    calls.append(what)


class _Crafted:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record, ("code ran",))


def test_the_safe_planner_decodes_bytes_with_weights_only() -> None:
    """Bytes handed to the planner (DCP's own path) never run a pickle's globals: refused before any code runs."""
    buffer = io.BytesIO()
    torch.save(_Crafted(), buffer)
    buffer.seek(0)
    calls.clear()
    with pytest.raises(pickle.UnpicklingError):
        _shardload._SafeLoadPlanner().load_bytes(None, buffer)
    assert calls == []


def test_a_save_whose_state_kept_its_layout_reuses_the_agreed_plan_without_planning_again(
    one_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second save of an unchanged layout makes no local plan and gathers nothing: the cached plan and index
    stand, while the items are the live state's (new values are saved); a changed layout plans again."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    made: list[int] = []
    original = DefaultSavePlanner.create_local_plan

    def counted(self: Any) -> Any:
        made.append(1)
        return original(self)

    monkeypatch.setattr(DefaultSavePlanner, "create_local_plan", counted)
    cache = _sharded.PlanCache()
    model, optimizer = _trained(seed=1, lr=0.1)
    state = {"model": model, "optimizer": optimizer}
    first = _sharded.plan(state, rank=0, world_size=1, collective=OneRank(), cache=cache)
    first_layer: Any = model[0]
    with torch.no_grad():
        first_layer.weight.add_(1.0)
    optimizer.param_groups[0]["lr"] = 0.05
    second = _sharded.plan(state, rank=0, world_size=1, collective=OneRank(), cache=cache)
    assert len(made) == 1, "the unchanged layout was planned again"
    assert second.index == first.index and second.items.keys() == first.items.keys()
    assert torch.equal(second.items["model.0.weight@0.0"], first_layer.weight.detach())
    assert second.items["optimizer.param_groups.0.lr"] == 0.05
    wider = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    _sharded.plan({"model": wider}, rank=0, world_size=1, collective=OneRank(), cache=cache)
    assert len(made) == 2, "a changed layout must be planned again"
