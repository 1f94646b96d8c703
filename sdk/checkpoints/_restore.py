"""Putting one committed checkpoint back into a state: checked first, then applied.

:func:`prepare` decides what this rank needs from the checkpoint and checks it without changing anything: the
sharded entries (:mod:`sdk.checkpoints._sharded`) must be in the state as modules or optimizers, their index must
parse and agree with the manifest, each per-rank entry must have files this rank can restore — its own, or on a
different number of ranks the ones :func:`sdk.checkpoints._ranks.sources` picks — and those files are downloaded
and verified. :func:`apply` then loads the sharded entries (DCP, reading and verifying the saving ranks' payloads
it needs) and decodes the per-rank ones into their objects.

With several ranks, the caller agrees between the two (every rank either enters DCP's load, which runs
collectives, or none does) and after :func:`apply` (a checkpoint is taken, or skipped, by all ranks together).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.checkpoints import _ranks as ranks
from sdk.checkpoints import _state as trainstate
from sdk.checkpoints._verify import check_files
from sdk.checkpoints.manifest import Manifest, stem_of
from sdk.errors import CheckpointError, InvalidCheckpointError, StateMismatchError
from sdk.log import get_logger
from sdk.stores.store import Store

__all__ = ["Prepared", "apply", "load_candidate", "prepare"]

log = get_logger("podtrain.checkpoint")
INDEX_NAME = dcpmeta.INDEX_NAME
SHARDED_STEM = trainstate.SHARDED_STEM


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` found: the checkpoint, this rank's sources, and the downloaded per-rank files."""

    step: int
    url: str
    manifest: Manifest
    sources: ranks.Sources
    data: dict[str, bytes]
    index: dcpmeta.Index | None
    setup: Any = None  # sdk.checkpoints._sharded.LoadSetup of the sharded entries


def prepare(
    store: Store,
    step: int,
    url: str,
    manifest: Manifest,
    state: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    max_workers: int = 8,
) -> Prepared:
    """Check that the checkpoint fits ``state`` on this rank, and download this rank's per-rank files.

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
    setup = None
    if index_name is not None:
        index = dcpmeta.check(data.pop(index_name), location=url)
        if index.world_size != manifest.world_size:
            raise InvalidCheckpointError(
                url, f"{INDEX_NAME} is for {index.world_size} ranks, the manifest for {manifest.world_size}"
            )
        setup = _sharded().setup_load({name: state[name] for name in sharded}, index, location=url)
    return Prepared(step=step, url=url, manifest=manifest, sources=sources, data=data, index=index, setup=setup)


def apply(
    store: Store,
    prepared: Prepared,
    state: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    collective: Any,
    safe_globals: Iterable[Any] = (),
    max_workers: int = 8,
) -> None:
    """Load the checkpoint :func:`prepare` checked into ``state`` (sharded entries first, then per-rank ones)."""
    sharded = prepared.manifest.sharded
    if sharded:
        assert prepared.index is not None

        def fetch(saving_ranks: Iterable[int]) -> dict[int, dict[str, Any]]:
            return _payloads(store, prepared, set(saving_ranks), safe_globals, max_workers)

        _sharded().load(
            {name: state[name] for name in sharded},
            prepared.index,
            fetch,
            location=prepared.url,
            collective=collective,
            setup=prepared.setup,
        )
    sources = prepared.sources
    rest = {k: v for k, v in state.items() if k not in sharded and k not in sources.merged}
    own = {n: prepared.data[n] for n in sources.own}
    trainstate.restore(rest, own, location=prepared.url, safe_globals=safe_globals)
    for key, per in sources.merged.items():
        trainstate.restore_merged(
            key,
            state[key],
            [{n: prepared.data[n] for n in files} for files in per],
            rank=rank,
            world_size=world_size,
            location=prepared.url,
            safe_globals=safe_globals,
        )
    if sources.rng_missing:
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
) -> InvalidCheckpointError | None:
    """Load one checkpoint (``manifest`` None: not committed, for ``problem``) into ``state``.

    Returns None when it was loaded, or why it is skipped; raises a mismatch to fix. With a ``collective``, both
    are agreed: every rank enters the load or none does, and a checkpoint any rank found damaged is skipped by all.
    """
    unstepped = _unstepped_optimizers(state) if manifest is not None and manifest.sharded else []
    prepared, error = None, None
    try:
        if manifest is None:
            raise InvalidCheckpointError(url, problem or "no manifest")
        prepared = prepare(store, step, url, manifest, state, rank=rank, world_size=world_size, max_workers=max_workers)
    except CheckpointError as exc:
        error = exc
    try:
        skipped = _agreed(collective, error, url)  # every rank enters the load below, or none does
        if skipped is None:
            assert prepared is not None
            try:
                apply(
                    store,
                    prepared,
                    state,
                    rank=rank,
                    world_size=world_size,
                    collective=collective,
                    safe_globals=safe_globals,
                    max_workers=max_workers,
                )
                error = None
            except CheckpointError as exc:
                error = exc
            skipped = _agreed(collective, error, url)
    except CheckpointError:
        _forget(unstepped)
        raise
    if skipped is not None:
        _forget(unstepped)
    return skipped


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


def _payloads(
    store: Store, prepared: Prepared, wanted: set[int], safe_globals: Iterable[Any], max_workers: int
) -> dict[int, dict[str, Any]]:
    """The decoded ``sharded`` payloads of the saving ranks ``wanted`` (verified first)."""
    from sdk.checkpoints import serialization

    files = {
        n: e for n, e in prepared.manifest.files.items() if stem_of(n) == SHARDED_STEM and ranks.rank_of(n) in wanted
    }
    data = check_files(
        store, prepared.step, prepared.url, files, download=True, metadata=False, max_workers=max_workers
    )
    parts: dict[int, dict[str, Any]] = {r: {} for r in wanted}
    for name in sorted(data):
        rank = ranks.rank_of(name)
        assert rank is not None
        parts[rank][name] = serialization.decode(
            name, data.pop(name), location=prepared.url, safe_globals=safe_globals, zero_copy=True
        )
    out: dict[int, dict[str, Any]] = {}
    for rank, decoded in parts.items():
        try:
            payload = serialization.assemble(decoded) if decoded else {}
        except ValueError as exc:
            raise InvalidCheckpointError(prepared.url, f"the sharded payload of rank {rank}: {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidCheckpointError(prepared.url, f"the sharded payload of rank {rank} is not a mapping")
        out[rank] = payload
    return out


def _sharded() -> Any:
    """:mod:`sdk.checkpoints._sharded`, imported when a checkpoint has sharded state (it needs torch)."""
    from sdk.checkpoints import _sharded

    return _sharded
