"""Loading sharded state: DCP's load planner, run by each rank alone, over payloads checked before the load.

A checkpoint of N ranks loads on M: DCP's ``DefaultLoadPlanner`` works out, from the checkpoint's index
(:mod:`sdk.checkpoints._dcpmeta`) and this rank's state dicts (:func:`sdk.checkpoints._sharded.state_dicts`: any
sharding), which pieces of which saved chunks this rank needs. The load runs in three steps, the first two before the
ranks agree to load (:mod:`sdk.checkpoints._restore`), so that a misfit or damage any rank finds stops or skips the
checkpoint on every rank before anything was written:

1. :func:`setup_load`: the plan. A state that does not fit (a name, a shape) is a :class:`StateMismatchError`.
2. :func:`check`: every item of the plan is in the saving rank's payload, as the index says (an object, or a tensor
   of its dtype and sizes), without reading tensor data (:mod:`sdk.checkpoints._shardread` has checked the files).
3. :func:`load`: the tensors are read (by range, checked) and copied into the state, the objects put in place
   as decoded (``weights_only``: DCP's own planner would unpickle them freely), and the state dicts applied.

This is DCP's ``load`` without its collectives: it gathers every rank's plan on rank 0 and scatters it back (the
default planner changes nothing in a load plan) and gathers every rank's errors after reading, where podtrain's own
agreement already decides, once, whether every rank loads. Each rank plans alone, so a load needs no process group
at all (one process loading a checkpoint of several ranks).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadItemType

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.checkpoints._sharded import apply, line, state_dicts
from sdk.errors import InvalidCheckpointError, PodtrainError, StateMismatchError

__all__ = ["LoadSetup", "Payloads", "TensorSpec", "check", "load", "setup_load"]


@dataclass(frozen=True)
class TensorSpec:
    """A saved tensor's dtype and shape, known before its bytes are read."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class Payloads(Protocol):
    """The saving ranks' items of one checkpoint (:class:`sdk.checkpoints._shardread.StoredPayloads`)."""

    def lookup(self, rank: int, key: str) -> Any:
        """The saved value ``key`` of ``rank``: the object, or a tensor's :class:`TensorSpec` (nothing read).
        Raises :class:`InvalidCheckpointError` when the rank's files hold no ``key``."""

    def tensors(self, wanted: Iterable[tuple[int, str]]) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
        """Each of ``wanted`` (rank, key) as a tensor whose bytes were checked, in that order."""


@dataclass(frozen=True)
class LoadSetup:
    """This rank's load plan: the state dicts it fills, DCP's metadata, the planner and its plan."""

    state_dicts: dict[str, Any]
    metadata: Any
    planner: Any
    plan: Any

    @property
    def saving_ranks(self) -> list[int]:
        """The ranks of the saving job whose payloads this rank's plan reads."""
        places = self.metadata.storage_data
        return sorted({places[item.storage_index][0] for item in self.plan.items})


def setup_load(objects: Mapping[str, Any], index: dcpmeta.Index, *, location: str) -> LoadSetup:
    """The state dicts of ``objects`` and this rank's plan to load them from the checkpoint of ``index`` (no
    collective; a state that does not fit raises :class:`StateMismatchError`)."""
    metadata = dcpmeta.to_metadata(index, location=location)
    try:
        loaded = state_dicts(objects)
        planner = _SafeLoadPlanner()
        planner.set_up_planner(loaded, metadata, is_coordinator=True)
        plan = planner.finish_plan(planner.create_global_plan([planner.create_local_plan()])[0])
    except PodtrainError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise StateMismatchError(f"the sharded state of checkpoint {location} does not fit: {line(exc)}") from None
    return LoadSetup(loaded, metadata, planner, plan)


def check(setup: LoadSetup, payloads: Payloads, *, location: str) -> None:
    """Every item of the plan is in its saving rank's payload as the index says; raises
    :class:`InvalidCheckpointError` naming the first that is not."""
    places = setup.metadata.storage_data
    sizes_of = {  # each saved chunk's sizes by (name, offsets): one look-up per item, not a search of the chunks
        (fqn, tuple(chunk.offsets)): tuple(chunk.sizes)
        for fqn, meta in setup.metadata.state_dict_metadata.items()
        for chunk in getattr(meta, "chunks", ())
    }
    for item in setup.plan.items:
        rank, key = places[item.storage_index]
        found = payloads.lookup(rank, key)
        if item.type == LoadItemType.BYTE_IO:
            if isinstance(found, TensorSpec):
                raise InvalidCheckpointError(location, f"{key!r} of rank {rank} is a tensor, the index says an object")
            continue
        meta = setup.metadata.state_dict_metadata[item.storage_index.fqn]
        sizes = sizes_of.get((item.storage_index.fqn, tuple(item.storage_index.offset or ())))
        if not isinstance(found, TensorSpec) or found.dtype != meta.properties.dtype or found.shape != sizes:
            what = f"{found.dtype} {list(found.shape)}" if isinstance(found, TensorSpec) else type(found).__name__
            raise InvalidCheckpointError(
                location, f"{key!r} is {what}, the index says {meta.properties.dtype} {list(sizes or ())}"
            )


def load(
    objects: Mapping[str, Any],
    setup: LoadSetup,
    payloads: Payloads,
    *,
    location: str,
    before_write: Callable[[], None] = lambda: None,
) -> None:
    """Load the sharded entries ``objects`` by ``setup``'s plan from ``payloads`` (:func:`check`-ed).

    ``before_write`` is called before the first byte reaches the live state: damage found after that (a file
    changed since it was checked) leaves the state partly loaded. Raises :class:`InvalidCheckpointError` for damage
    and :class:`StateMismatchError` where the state does not fit.
    """
    try:
        _read(setup, payloads, location, before_write)
        before_write()
        apply(objects, setup.state_dicts)
    except PodtrainError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise StateMismatchError(f"the sharded state of checkpoint {location} does not fit: {line(exc)}") from None


def _read(setup: LoadSetup, payloads: Payloads, location: str, before_write: Callable[[], None]) -> None:
    """DCP's ``StorageReader.read_data`` for this rank's plan: objects first (nothing of the live state changes),
    then each tensor as it arrives, narrowed to the pieces the plan wants and copied into place."""
    planner, places = setup.planner, setup.metadata.storage_data
    pieces: dict[tuple[int, str], list[Any]] = {}
    written = False
    for item in setup.plan.items:
        rank, key = places[item.storage_index]
        if item.type == LoadItemType.BYTE_IO:
            planner.load_object(item, payloads.lookup(rank, key))
        else:
            pieces.setdefault((rank, key), []).append(item)
    for place, source in payloads.tensors(pieces):
        for item in pieces[place]:
            piece = source
            if any(item.storage_offsets) or tuple(item.lengths) != tuple(source.shape):  # part of the saved chunk
                for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                    piece = piece.narrow(dim, offset, length)
            target = planner.resolve_tensor(item).detach()
            if target.size() != piece.size():
                raise InvalidCheckpointError(
                    location, f"{place[1]!r}: a piece of {list(piece.size())} for a place of {list(target.size())}"
                )
            if not written:
                before_write()
                written = True
            target.copy_(piece)
            planner.commit_tensor(item, target)


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but objects are put in place as decoded (``weights_only``), never unpickled freely."""

    def load_object(self, read_item: Any, value: Any) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        """Not called by :func:`load` (objects come decoded); kept safe for anything that drives the planner."""
        self.load_object(read_item, torch.load(value, weights_only=True))
