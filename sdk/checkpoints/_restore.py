"""Putting one committed checkpoint back into a state: checked first, then applied.

:func:`prepare` decides what this rank needs from the checkpoint and checks it without changing anything: the
sharded entries must be in the state as modules or optimizers, their index must parse and agree with the manifest,
this rank's load plan must fit the state (:mod:`sdk.checkpoints._shardload`), the payload files of the saving ranks
it reads must match the manifest and hold every item the plan needs (:mod:`sdk.checkpoints._shardread`), and each
per-rank entry must have files this rank can restore — its own, or on a different number of ranks the ones
:func:`sdk.checkpoints._ranks.sources` picks — downloaded and verified. :func:`apply` then decodes the per-rank
entries into their objects and loads the sharded ones, reading their tensors by range.

With several ranks, the caller agrees between the two (every rank loads, or none does: damage or a misfit any rank
found in :func:`prepare` skips or stops the checkpoint everywhere before anything was written) and after
:func:`apply` (a checkpoint is taken, or skipped, by all ranks together). Damage :func:`apply` finds comes after
part of the state was written (a file changed since it was checked): :class:`Written` records that, and
:meth:`Checkpointer.load <sdk.checkpoints.checkpointer.Checkpointer.load>` then needs an older checkpoint to load
over it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.checkpoints import _ranks as ranks
from sdk.checkpoints import _state as trainstate
from sdk.checkpoints import invalidmark
from sdk.checkpoints._verify import check_files
from sdk.checkpoints.manifest import Manifest
from sdk.errors import CheckpointError, InvalidCheckpointError, StateMismatchError
from sdk.log import get_logger
from sdk.stores.store import Store

__all__ = ["Prepared", "Written", "apply", "load_candidate", "prepare"]

log = get_logger("podtrain.checkpoint")
INDEX_NAME = dcpmeta.INDEX_NAME
SHARDED_STEM = trainstate.SHARDED_STEM


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` found: the checkpoint, this rank's sources and per-rank values, the sharded plan."""

    step: int
    url: str
    manifest: Manifest
    sources: ranks.Sources
    values: dict[str, Any]  # the per-rank entries (and the RNG states), decoded, for sdk.checkpoints._state.put
    index: dcpmeta.Index | None
    setup: Any = None  # sdk.checkpoints._shardload.LoadSetup of the sharded entries
    payloads: Any = None  # sdk.checkpoints._shardread.StoredPayloads: the saving ranks' payloads it reads


@dataclass
class Written:
    """Whether loading a checkpoint has written into the live state (:func:`apply` sets it)."""

    state: bool = False


def prepare(
    store: Store,
    step: int,
    url: str,
    manifest: Manifest,
    state: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    safe_globals: Iterable[Any] = (),
    max_workers: int = 8,
) -> Prepared:
    """Check that the checkpoint fits ``state`` on this rank, download this rank's per-rank files, and check the
    sharded payloads it will read.

    Raises :class:`CheckpointError` for a mismatch to fix, :class:`InvalidCheckpointError` for damage.
    """
    sharded = manifest.sharded
    for name in sharded:
        obj = state.get(name)
        if obj is None:
            raise StateMismatchError(
                f"checkpoint {url} holds sharded state {name!r} and the state passed has none: pass the same "
                "state names that were saved"
            )
        if not _sharded().is_shardable(obj):
            raise StateMismatchError(
                f"state {name!r} of checkpoint {url} was saved sharded (a model or an optimizer); here it is a "
                f"{type(obj).__name__}"
            )
    per_rank = [k for k in state if k not in sharded]
    sources = ranks.sources(
        manifest.files,
        per_rank,
        rank=rank,
        world_size=world_size,
        saved_world=manifest.world_size,
        rng_stem=trainstate.RNG_STEM,
        skip=(SHARDED_STEM,),
    )
    for key in sources.merged:
        if not callable(getattr(state[key], "reshard_state_dict", None)):
            raise StateMismatchError(
                f"state {key!r} differs across the {manifest.world_size} ranks that saved checkpoint {url}, and "
                f"{type(state[key]).__name__} cannot merge them for {world_size} ranks: resume with "
                f"WORLD_SIZE={manifest.world_size}, or give it reshard_state_dict() (ResumableLoader has one for a "
                "DistributedSampler)"
            )
    wanted = dict(sources.own)
    for per in sources.merged.values():
        for files in per:
            wanted.update(files)
    index = None
    index_name = manifest.index_name
    if index_name is not None:
        wanted[index_name] = manifest.files[index_name]
    data = check_files(store, step, url, wanted, download=True, metadata=False, max_workers=max_workers)
    setup = payloads = None
    if index_name is not None:
        index = dcpmeta.check(data.pop(index_name), location=url)
        if index.world_size != manifest.world_size:
            raise InvalidCheckpointError(
                url, f"{INDEX_NAME} is for {index.world_size} ranks, the manifest for {manifest.world_size}"
            )
        from sdk.checkpoints import _shardload, _shardread

        still = _shardread.still_damaged(store, step, url, invalidmark.damaged_ranges(store, manifest))
        if still is not None:
            raise InvalidCheckpointError(url, still)
        setup = _shardload.setup_load({name: state[name] for name in sharded}, index, location=url)
        payloads = _shardread.open_payloads(
            store,
            step,
            url,
            manifest.files,
            setup.saving_ranks,
            safe_globals=safe_globals,
            max_workers=max_workers,
        )
        _shardload.check(setup, payloads, location=url)
    rest = {k: v for k, v in state.items() if k not in sharded and k not in sources.merged}
    values = trainstate.decode(rest, {n: data[n] for n in sources.own}, location=url, safe_globals=safe_globals)
    for key, per in sources.merged.items():
        values[key] = trainstate.merged(
            key,
            state[key],
            [{n: data[n] for n in files} for files in per],
            rank=rank,
            world_size=world_size,
            location=url,
            safe_globals=safe_globals,
        )
    return Prepared(
        step=step,
        url=url,
        manifest=manifest,
        sources=sources,
        values=values,
        index=index,
        setup=setup,
        payloads=payloads,
    )


def apply(prepared: Prepared, state: Mapping[str, Any], *, rank: int, written: Written | None = None) -> None:
    """Load the checkpoint :func:`prepare` checked into ``state``: the sharded entries (their tensors read by range
    and copied in), then the per-rank values. ``written`` is set once part of ``state`` has changed."""
    written = written if written is not None else Written()
    sharded = prepared.manifest.sharded
    if sharded:
        from sdk.checkpoints import _shardload

        def writing() -> None:
            written.state = True

        _shardload.load(
            {name: state[name] for name in sharded},
            prepared.setup,
            prepared.payloads,
            location=prepared.url,
            before_write=writing,
        )
    written.state = True
    trainstate.put(state, prepared.values, location=prepared.url)
    if prepared.sources.rng_missing:
        log.info(
            "checkpoint.rng_kept",
            rank=rank,
            saved_by=prepared.manifest.world_size,
            reason="this rank did not exist in the saving job: its RNG streams stay as seeded",
        )


def load_candidate(
    store: Store,
    step: int,
    state: Mapping[str, Any],
    *,
    url: str,
    manifest: Manifest | None,
    problem: str | None,
    rank: int,
    world_size: int,
    collective: Any,
    safe_globals: Iterable[Any] = (),
    max_workers: int = 8,
    written: Written | None = None,
) -> InvalidCheckpointError | None:
    """Load one checkpoint (``manifest`` None: not committed, for ``problem``) into ``state``.

    Returns None when it was loaded, or why it is skipped; raises a mismatch to fix. With a ``collective``, both
    are agreed: every rank enters the load or none does, and a checkpoint any rank found damaged is skipped by all.
    ``written`` is set when a skipped checkpoint had already changed part of ``state`` on this rank.
    """
    unstepped = _unstepped_optimizers(state) if manifest is not None and manifest.sharded else []
    prepared, error = None, None
    try:
        if manifest is None:
            raise InvalidCheckpointError(url, problem or "no manifest")
        prepared = prepare(
            store,
            step,
            url,
            manifest,
            state,
            rank=rank,
            world_size=world_size,
            safe_globals=safe_globals,
            max_workers=max_workers,
        )
    except CheckpointError as exc:
        error = exc
    try:
        skipped = _agreed(collective, error, url)  # every rank enters the load below, or none does
        if skipped is None:
            assert prepared is not None
            try:
                apply(prepared, state, rank=rank, written=written)
                error = None
            except CheckpointError as exc:
                error = exc
                _remember(store, prepared, exc, rank)
            skipped = _agreed(collective, error, url)
    except CheckpointError:
        _forget(unstepped)
        raise
    if skipped is not None:
        _forget(unstepped)
    return skipped


def _remember(store: Store, prepared: Prepared, error: CheckpointError, rank: int) -> None:
    """Mark the checkpoint with the byte ranges found damaged during its load, so that the next load skips it
    before writing anything (:mod:`sdk.checkpoints.invalidmark`; best effort)."""
    damaged = getattr(prepared.payloads, "damaged", None)
    if damaged and isinstance(error, InvalidCheckpointError):
        invalidmark.mark(store, prepared.manifest, error.reason, by=f"a load on rank {rank}", ranges=damaged)


def _unstepped_optimizers(state: Mapping[str, Any]) -> list[Any]:
    """The optimizers of ``state`` without state yet: DCP's state dict steps them (zero gradients, lr 0)."""
    import torch

    return [obj for obj in state.values() if isinstance(obj, torch.optim.Optimizer) and not obj.state]


def _forget(unstepped: list[Any]) -> None:
    """After a checkpoint that was not loaded: the optimizers that had no state have none again (a run that then
    starts fresh must not count a step it never took)."""
    for optimizer in unstepped:
        optimizer.state.clear()


def _agreed(collective: Any, error: CheckpointError | None, url: str) -> InvalidCheckpointError | None:
    """This rank's outcome, agreed: raise a mismatch any rank found, skip damage any rank found, else None."""
    damaged = isinstance(error, InvalidCheckpointError)
    misfit = error is not None and not damaged
    if collective is not None:
        damaged, misfit = collective.any(damaged, misfit)
    if misfit:
        if error is not None and not isinstance(error, InvalidCheckpointError):
            raise error
        raise StateMismatchError(f"checkpoint {url} does not fit the state on another rank (see its log)")
    if damaged:
        if isinstance(error, InvalidCheckpointError):
            return error
        return InvalidCheckpointError(url, "another rank found it damaged (see its log)")
    return None


def _sharded() -> Any:
    """:mod:`sdk.checkpoints._sharded`, imported when a checkpoint has sharded state (it needs torch)."""
    from sdk.checkpoints import _sharded

    return _sharded
