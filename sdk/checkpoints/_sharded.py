"""Sharded state: the models and optimizers of a job of several ranks, each piece saved once, loadable on any count.

**What is sharded.** In a job of several ranks with ``torch.distributed`` initialized, every ``nn.Module`` (an
FSDP2 ``fully_shard`` model, a DTensor/tensor-parallel one, a DDP model wrapped or not, a plain one) and every
optimizer of the state that has stepped (:func:`saves_sharded`) goes through torch.distributed.checkpoint (DCP):
their state dicts come from ``get_model_state_dict`` / ``get_optimizer_state_dict`` (keys by parameter name, so
they fit any sharding), and
DCP's planner cuts them into write items: each rank's own shards, and the tensors replicated across ranks (DDP's
whole model, a ``Replicate`` placement) given to one rank only, so they are written once. Everything else in the
state (RNG streams, the data position, a scheduler, plain dicts) stays per rank (:mod:`sdk.checkpoints._ranks`).
The one rule for users: build, shard or wrap the model and create the optimizer before ``resume``, and keep a
model that is not sharded the same on every rank (as DDP does), since one rank's copy stands for all.

**Save** (:func:`plan`): the planning is DCP's, run in the caller's thread on the checkpoint group: one
all-reduce when no rank's state changed its layout since the last save (:class:`PlanCache`), else each rank's
local plan gathered on rank 0 and the deduplicated plans scattered back. The data are
not written by DCP's storage layer: each rank's items become one ``sharded`` payload — a name per item — written
with the rank's other files by :meth:`Checkpointer.write <sdk.checkpoints.checkpointer.Checkpointer.write>`, and
rank 0 writes the index (:mod:`sdk.checkpoints._dcpmeta`) before the manifest. So the background write of an
asynchronous save needs no collective (ranks meet through the store, as for any save of several ranks), the
snapshot copies only what this rank writes, and every byte is checksummed in the manifest.

**Load** (:func:`load`): DCP's ``load`` with :class:`_Reader`, a ``StorageReader`` over the files a checkpoint's
manifest lists — downloaded and verified (size, CRC32C, structure) before any byte reaches the state — so a
checkpoint of N ranks loads on M: DCP works out which pieces of which saved chunks each rank needs. Objects
(optimizer hyperparameters) are decoded with ``weights_only``; DCP's own planner would unpickle them freely.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.futures import Future

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.errors import InvalidCheckpointError, PodtrainError, StateMismatchError

__all__ = [
    "Collective",
    "LoadSetup",
    "PlanCache",
    "Planned",
    "apply",
    "is_shardable",
    "item_key",
    "load",
    "plan",
    "saves_sharded",
    "setup_load",
    "state_dicts",
]


class Collective(Protocol):
    """The cross-rank operations a sharded save or load needs (:class:`sdk.lifecycle.agreement.Agreement`)."""

    def group(self) -> Any:
        """The gloo process group for checkpoint collectives (``None``: the default group)."""

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag: whether it is true on any rank."""

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""


@dataclass(frozen=True)
class Planned:
    """One rank's part of a sharded save: its items by name, and (rank 0) the index of the whole checkpoint."""

    items: dict[str, Any]
    index: bytes | None


def is_shardable(obj: Any) -> bool:
    """Whether ``obj`` is state DCP saves: a module or an optimizer."""
    return isinstance(obj, torch.nn.Module | torch.optim.Optimizer)


def saves_sharded(obj: Any) -> bool:
    """Whether a save now puts ``obj`` through DCP: a module, or an optimizer that has stepped.

    An optimizer without state holds only its hyperparameters, the same on every rank, so it is saved per rank;
    DCP's ``get_optimizer_state_dict`` would first make its state by running ``step()`` with zero gradients,
    which counts a step (Adam's bias correction) the loop never took.
    """
    return isinstance(obj, torch.nn.Module) or (isinstance(obj, torch.optim.Optimizer) and bool(obj.state))


def state_dicts(objects: Mapping[str, Any]) -> dict[str, Any]:
    """DCP state dicts of the modules and optimizers in ``objects`` (keys: parameter names, any sharding)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            out[name] = get_model_state_dict(obj)
        else:
            out[name] = get_optimizer_state_dict(_owner(name, obj, objects), obj)
    return out


def apply(objects: Mapping[str, Any], loaded: Mapping[str, Any]) -> None:
    """Put loaded state dicts back into their modules and optimizers."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, loaded[name])
        else:
            set_optimizer_state_dict(_owner(name, obj, objects), obj, loaded[name])


def _owner(name: str, optimizer: torch.optim.Optimizer, objects: Mapping[str, Any]) -> torch.nn.Module:
    """The module of the state that holds every parameter ``optimizer`` steps (parameter names come from it)."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for obj in objects.values():
        if isinstance(obj, torch.nn.Module) and stepped <= {id(p) for p in obj.parameters()}:
            return obj
    raise StateMismatchError(
        f"optimizer {name!r} steps parameters that no single model of the state holds: put the model whose "
        "parameters it steps in the same state (its parameter names key the optimizer's state)"
    )


def item_key(index: Any) -> str:
    """The name of a DCP item in its rank's payload: the fully qualified name, and the chunk's offsets if any."""
    if index.offset is None:
        return str(index.fqn)
    return f"{index.fqn}@{'.'.join(str(o) for o in index.offset)}"


@dataclass
class PlanCache:
    """The last agreed plan of one job's saves: reused while no rank's local plan changed (one all-reduce to
    learn that, instead of gathering every rank's plan on rank 0 and scattering them back)."""

    signature: Any = None  # what this rank's local plan depends on (:func:`_signature`)
    local: Any = None  # this rank's local plan
    final: Any = None  # this rank's part of the agreed plan
    index: bytes | None = None  # rank 0: the checkpoint's index


def plan(
    objects: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    collective: Collective,
    cache: PlanCache | None = None,
) -> Planned:
    """DCP's save plan of the sharded entries ``objects``, agreed by all ranks; this rank's items, and rank 0's index.

    With a ``cache`` of the last plan, one all-reduce asks whether any rank's state changed in what its local plan
    depends on (:func:`_signature`: names, shapes, dtypes, shardings; rarely after the first save); if none did,
    the last agreed plan stands, and no rank even makes its local plan again (~40 ms for a few hundred DTensors).
    Otherwise two collectives, always both: the local plans gathered on rank 0, deduplicated, scattered back — a
    rank that fails to plan still takes part, and then every rank raises.
    """
    planner = DefaultSavePlanner()
    signature, why = None, None
    try:
        planner.set_up_planner(state_dicts(objects), is_coordinator=rank == 0)
        signature = _signature(planner)
    except PodtrainError as exc:
        why = str(exc)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        why = _line(exc)
    same = cache is not None and why is None and cache.final is not None and signature == cache.signature
    if cache is not None and not collective.any(not same)[0]:
        assert cache.final is not None
        return Planned(items=_items(planner, planner.finish_plan(cache.final)), index=cache.index)
    local = None
    if why is None:
        try:
            local = planner.create_local_plan()
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            why = _line(exc)
    final, index = _agree(planner, local, why, rank=rank, world_size=world_size, group=collective.group())
    if cache is not None:
        cache.signature, cache.local, cache.final, cache.index = signature, local, final, index
    return Planned(items=_items(planner, planner.finish_plan(final)), index=index)


def _signature(planner: Any) -> tuple[Any, ...]:
    """What this rank's local plan is made of (DCP's write items and the index hold nothing else): every flattened
    name with its shape, dtype and ``requires_grad``, a DTensor's placements and mesh, and where each name came from
    in the nested state. Equal signatures make equal local plans; computing one costs ~1 ms."""
    from torch.distributed.tensor import DTensor

    parts: list[Any] = []
    for key, value in planner.state_dict.items():
        if isinstance(value, DTensor):
            parts.append((key, value.shape, value.dtype, value.requires_grad, value.placements, id(value.device_mesh)))
        elif isinstance(value, torch.Tensor):
            parts.append((key, value.shape, value.dtype, value.requires_grad))
        else:
            parts.append((key, None))
    return (tuple(parts), tuple(sorted((k, tuple(p)) for k, p in getattr(planner, "mappings", {}).items())))


def _agree(planner: Any, local: Any, why: str | None, *, rank: int, world_size: int, group: Any) -> tuple[Any, Any]:
    """Gather the local plans (or why one failed) on rank 0, make the global plan and the index, scatter."""
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object((local, why), gathered, dst=0, group=group)
    answers: list[Any] | None = None
    index = None
    if rank == 0:
        assert gathered is not None
        failed = [(r, w) for r, (_, w) in enumerate(gathered) if w is not None]
        plans: list[Any] = []
        if not failed:
            try:
                plans, metadata = planner.create_global_plan([p for p, _ in gathered])
                places = {item.index: (r, item_key(item.index)) for r, p in enumerate(plans) for item in p.items}
                index = dcpmeta.dumps(dcpmeta.from_metadata(metadata, places, world_size))
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                failed = [(0, _line(exc))]
        answers = [(None, failed)] * world_size if failed else [(p, []) for p in plans]
    mine: list[Any] = [None]
    dist.scatter_object_list(mine, answers, src=0, group=group)
    final, failed = mine[0]
    if failed:
        where, reason = failed[0]
        raise StateMismatchError(f"the sharded save could not be planned (rank {where}): {reason}")
    return final, index


def _items(planner: Any, final: Any) -> dict[str, Any]:
    """This rank's items of the plan, by name: the tensors (views of the live state) and the objects."""
    items: dict[str, Any] = {}
    for item in final.items:
        if item.type == WriteItemType.BYTE_IO:
            items[item_key(item.index)] = planner.lookup_object(item.index)
        else:
            items[item_key(item.index)] = planner.resolve_data(item)
    return items


@dataclass(frozen=True)
class LoadSetup:
    """What a load needs before its collectives: the state dicts to load into and DCP's metadata."""

    state_dicts: dict[str, Any]
    metadata: Any


def setup_load(objects: Mapping[str, Any], index: dcpmeta.Index, *, location: str) -> LoadSetup:
    """The state dicts of ``objects`` and the metadata of ``index``; run it before the ranks agree to load (a
    failure here must stop every rank, not leave the others inside DCP's collectives)."""
    try:
        loaded = state_dicts(objects)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise StateMismatchError(f"the sharded state of checkpoint {location} cannot be loaded: {_line(exc)}") from None
    return LoadSetup(loaded, dcpmeta.to_metadata(index, location=location))


def load(
    objects: Mapping[str, Any],
    index: dcpmeta.Index,
    fetch: Callable[[Iterable[int]], Mapping[int, Mapping[str, Any]]],
    *,
    location: str,
    collective: Collective | None,
    setup: LoadSetup | None = None,
) -> None:
    """Load the sharded entries ``objects`` from a checkpoint whose checked index is ``index``.

    ``fetch(ranks)`` returns the verified, decoded payloads of the saving ranks asked for. With a ``collective``
    the ranks load together (the same checkpoint, at the same time); without one, this process loads alone.
    Raises :class:`InvalidCheckpointError` for damage (the caller falls back) and :class:`CheckpointError` when
    the state does not fit (a mismatch to fix).
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException

    setup = setup or setup_load(objects, index, location=location)
    loaded = setup.state_dicts
    reader = _Reader(setup.metadata, fetch, location)
    distributed = collective is not None
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(
                loaded,
                storage_reader=reader,
                planner=_SafeLoadPlanner(),
                process_group=collective.group() if collective is not None else None,
                no_dist=not distributed,
            )
    except CheckpointException as exc:
        raise _cause(exc, location) from None
    except PodtrainError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise StateMismatchError(f"the sharded state of checkpoint {location} does not fit: {_line(exc)}") from None
    try:
        apply(objects, loaded)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise StateMismatchError(f"the sharded state of checkpoint {location} does not fit: {_line(exc)}") from None


def _cause(exc: Any, location: str) -> PodtrainError:
    """The first rank's failure inside DCP, as podtrain's error (damage stays damage, the rest is a misfit)."""
    for rank in sorted(exc.failures):
        failure = exc.failures[rank][0]
        if isinstance(failure, PodtrainError):
            return failure
    rank = min(exc.failures)
    failure = exc.failures[rank][0]
    return StateMismatchError(
        f"the sharded state of checkpoint {location} does not fit (rank {rank}): {_line(failure)}"
    )


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but objects are put in place as decoded (``weights_only``), never unpickled freely."""

    def load_object(self, read_item: Any, value: Any) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.load_object(read_item, torch.load(value, weights_only=True))


class _Reader(StorageReader):
    """A DCP ``StorageReader`` over one checkpoint's verified payloads (one per saving rank)."""

    def __init__(
        self, metadata: Any, fetch: Callable[[Iterable[int]], Mapping[int, Mapping[str, Any]]], location: str
    ) -> None:
        super().__init__()
        self.metadata = metadata
        self._fetch = fetch
        self._location = location
        self._sizes = {  # each saved chunk's sizes by (name, offsets): looked up once per piece read
            (fqn, tuple(chunk.offsets)): tuple(chunk.sizes)
            for fqn, meta in metadata.state_dict_metadata.items()
            for chunk in getattr(meta, "chunks", ())
        }

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return self.metadata

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_data(self, plan: Any, planner: Any) -> Future[None]:
        places = self.metadata.storage_data
        payloads = self._fetch(sorted({places[item.storage_index][0] for item in plan.items}))
        for item in plan.items:
            rank, key = places[item.storage_index]
            if key not in payloads[rank]:
                raise InvalidCheckpointError(self._location, f"the files of rank {rank} hold no {key!r}")
            value = payloads[rank][key]
            if item.type == LoadItemType.BYTE_IO:
                if isinstance(planner, _SafeLoadPlanner):
                    planner.load_object(item, value)
                else:
                    buffer = io.BytesIO()
                    torch.save(value, buffer)
                    buffer.seek(0)
                    planner.load_bytes(item, buffer)
                continue
            source = self._chunk(item, key, value)
            for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                source = source.narrow(dim, offset, length)
            target = planner.resolve_tensor(item).detach()
            if target.size() != source.size():
                raise InvalidCheckpointError(
                    self._location, f"{key!r}: a piece of {list(source.size())} for a place of {list(target.size())}"
                )
            target.copy_(source)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _chunk(self, item: Any, key: str, value: Any) -> torch.Tensor:
        """The saved chunk ``value`` for ``item``, checked against the index: a tensor of its dtype and sizes."""
        meta = self.metadata.state_dict_metadata[item.storage_index.fqn]
        sizes = self._sizes.get((item.storage_index.fqn, tuple(item.storage_index.offset or ())))
        if not isinstance(value, torch.Tensor) or value.dtype != meta.properties.dtype or tuple(value.shape) != sizes:
            found = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            expected = f"{meta.properties.dtype} {list(sizes or ())}"
            raise InvalidCheckpointError(self._location, f"{key!r} is {found}, the index says {expected}")
        return value
