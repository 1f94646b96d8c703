"""Checkpoints of several ranks: each rank's files, its record, and the one commit after all of them are in.

With ``world_size > 1`` every rank saves its own state (its RNG streams and data position differ, and so may its
shard of the model) under ``step-N/<writer folder>/rank-<r>/``. When its uploads are done it writes
``<writer folder>/rank-<r>.json`` — the names, sizes and CRC32Cs of its files. Rank 0 waits until the record of
every rank is there, merges them, and creates ``MANIFEST.json`` once, conditionally, as for one rank.
The writer folder (``attempt-<a>-<writer>``, :func:`sdk.checkpoints._fence.writer_dir`) is the job's own: its ranks
agree on
the writer id with their first collective (:mod:`sdk.lifecycle.agreement`), so another job given the same attempt number
never mixes its ranks' records or files with theirs (ranks that agreed on none — ``Checkpointer`` objects used
directly without ``writer=`` — share ``attempt-<a>/`` as before). The ranks talk only through
the store: no collective runs in the background thread, so the save cannot deadlock against the training loop's
own collectives, and a rank that dies leaves a step that is simply never committed.

A checkpoint of N ranks is loaded by N ranks, each reading only its own files. On M ranks (:func:`sources`),
an entry every rank saved alike (same files, sizes and CRC32Cs: a scheduler, a replicated model saved per rank)
is loaded from rank 0's files; the RNG streams of ranks that existed are restored to them (new ranks keep their
own); an entry that differs across ranks needs its object to merge the ranks' states
(``reshard_state_dict``, as :class:`~sdk.data.loader.ResumableLoader` does for a ``DistributedSampler``) and is
otherwise refused, naming it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from sdk.checkpoints.manifest import FileEntry, rank_of, stem_of, without_rank_dir
from sdk.errors import CheckpointError, StorageNotFoundError
from sdk.stores import boundedjson
from sdk.stores.store import Store

__all__ = [
    "POLL_SHARE",
    "RANK_TIMEOUT",
    "Sources",
    "files_of_rank",
    "gather",
    "rank_of",
    "rank_prefix",
    "sources",
    "write_record",
]

RANK_TIMEOUT = 600.0  # seconds rank 0 waits for the other ranks' records of a step before giving up on it
POLL_SHARE = 0.05  # rank 0 looks for the other ranks' records at least this often, as a share of its own write


def rank_prefix(writer_dir: str, rank: int, world_size: int) -> str:
    """Where a rank's files go inside the step folder, under the writer's folder ``writer_dir``."""
    return writer_dir if world_size == 1 else f"{writer_dir}/rank-{rank}"


def files_of_rank(files: Mapping[str, FileEntry], rank: int, world_size: int) -> dict[str, FileEntry]:
    """The files of a manifest that ``rank`` loads: all of them for one rank, else those under its folder."""
    if world_size == 1:
        return dict(files)
    marker = f"/rank-{rank}/"
    return {name: entry for name, entry in files.items() if marker in f"/{name}"}


@dataclass(frozen=True)
class Sources:
    """The files a rank restores: ``own`` as its own state, ``merged`` stem by stem with every saving rank's files."""

    own: dict[str, FileEntry]
    merged: dict[str, list[dict[str, FileEntry]]] = field(default_factory=dict)
    rng_missing: bool = False  # a rank the saving job did not have: its RNG streams stay as they are


def sources(
    files: Mapping[str, FileEntry],
    stems: Collection[str],
    *,
    rank: int,
    world_size: int,
    saved_world: int,
    rng_stem: str,
    skip: Collection[str] = (),
) -> Sources:
    """Which files ``rank`` of ``world_size`` restores the per-rank entries ``stems`` from (see the module's doc).

    ``skip``: stems restored otherwise (the sharded payload).
    """
    if saved_world == world_size:
        mine = files_of_rank(files, rank, world_size)
        return Sources({n: e for n, e in mine.items() if stem_of(n) not in skip})
    per_rank = [files_of_rank(files, r, saved_world) for r in range(saved_world)]
    own: dict[str, FileEntry] = {}
    merged: dict[str, list[dict[str, FileEntry]]] = {}
    for stem in stems:
        of_stem = [{n: e for n, e in mine.items() if stem_of(n) == stem} for mine in per_rank]
        if len({_fingerprint(f) for f in of_stem}) == 1:
            own.update(of_stem[0])
        else:
            merged[stem] = of_stem
    if rank < saved_world:
        own.update({n: e for n, e in per_rank[rank].items() if stem_of(n) == rng_stem})
    return Sources(own, merged, rng_missing=rank >= saved_world)


def _fingerprint(files: Mapping[str, FileEntry]) -> tuple[tuple[str, int, str], ...]:
    """What a rank saved of one entry, without its folder: equal on two ranks when they saved the same bytes."""
    return tuple(sorted((without_rank_dir(n), e.size, e.crc32c) for n, e in files.items()))


def write_record(store: Store, folder: str, writer_dir: str, rank: int, files: Mapping[str, FileEntry]) -> None:
    """Record that ``rank`` finished uploading ``files`` for the step in ``folder``."""
    body = {"rank": rank, "files": {n: {"size": e.size, "crc32c": e.crc32c} for n, e in files.items()}}
    store.put(f"{folder}/{writer_dir}/rank-{rank}.json", json.dumps(body).encode())


def gather(
    store: Store,
    folder: str,
    writer_dir: str,
    world_size: int,
    *,
    timeout: float = RANK_TIMEOUT,
    own_seconds: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, FileEntry]:
    """Wait for every rank's record of this step; return all their files. Raises CheckpointError on timeout.

    The store is looked at again after pauses that double from 10 ms up to :data:`POLL_SHARE` of
    ``own_seconds`` (how long this rank took to write its own files; the others have as much to write), within
    [10 ms, 0.5 s]: the commit then follows the last rank's record by at most ~5 % of a save, where pauses
    growing to half a second once added a second to every save of a few seconds.
    """
    wanted = {f"rank-{r}.json" for r in range(world_size)}
    give_up = clock() + timeout
    longest = min(max(own_seconds * POLL_SHARE, 0.01), 0.5)
    pause = 0.01
    while True:
        try:
            present = wanted & set(store.list(f"{folder}/{writer_dir}"))
        except StorageNotFoundError:
            present = set()
        if present == wanted:
            break
        if clock() >= give_up:
            missing = sorted(int(n[5:-5]) for n in wanted - present)
            raise CheckpointError(
                f"{folder}: rank(s) {missing} did not finish writing within {timeout:.0f}s; the step is not committed"
            )
        sleep(pause)
        pause = min(pause * 2, longest)
    files: dict[str, FileEntry] = {}
    for name in sorted(wanted):
        rel = f"{folder}/{writer_dir}/{name}"
        body = boundedjson.loads(store.get(rel), what=store.url_of(rel), max_bytes=16 * 2**20, max_depth=4)
        try:
            for file, entry in body["files"].items():
                files[str(file)] = FileEntry(size=int(entry["size"]), crc32c=str(entry["crc32c"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{store.url_of(rel)} is not a rank record ({type(exc).__name__}: {exc}); the step is not committed"
            ) from exc
    return files
