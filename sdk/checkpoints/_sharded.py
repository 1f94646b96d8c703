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

**Load**: :mod:`sdk.checkpoints._shardload`, with :func:`state_dicts` and :func:`apply` from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.errors import PodtrainError, StateMismatchError

__all__ = [
    "Collective",
    "PlanCache",
    "Planned",
    "apply",
    "is_shardable",
    "item_key",
    "line",
    "plan",
    "saves_sharded",
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
        why = line(exc)
    same = cache is not None and why is None and cache.final is not None and signature == cache.signature
    if cache is not None and not collective.any(not same)[0]:
        assert cache.final is not None
        return Planned(items=_items(planner, planner.finish_plan(cache.final)), index=cache.index)
    local = None
    if why is None:
        try:
            local = planner.create_local_plan()
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            why = line(exc)
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
                failed = [(0, line(exc))]
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


def line(exc: BaseException) -> str:
    """``exc`` in one line: its type and the first line of its message (at most 500 characters)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
