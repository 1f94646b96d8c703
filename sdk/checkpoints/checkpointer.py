"""Checkpoints that either exist completely and verifiably, or do not exist at all.

A save writes one folder ``step-<10 digits>/``: the state files under the writer's own ``attempt-<n>-<writer>/``
(serialized one after another, each uploaded as soon as it is serialized, in parallel), then ``MANIFEST.json`` —
last, and with a conditional create, so two writers can never both commit one step. Because every writer (a
process, or the ranks of one job) has its own sub-folder (:mod:`sdk.checkpoints._fence`), no other writer — a stale
attempt,
or a second process given the same attempt number — can ever overwrite the files a committed manifest lists;
the loser of a commit race removes its own folder.
A checkpoint is found by reading manifests, never by trusting folder names, and loading verifies every
file's size and CRC32C; on any mismatch it logs why and falls back to the previous valid checkpoint.

Listing and verifying need no torch (the ``podtrain checkpoints`` commands start fast); saving and loading
import it on first use.

What a state may hold, and how it is put back, is :mod:`sdk.checkpoints._state`: anything with ``state_dict()`` and
``load_state_dict()``, or a plain dict; RNG states (python, numpy, torch CPU and CUDA) are saved unasked.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sdk.checkpoints import _fence as fence
from sdk.checkpoints import _ranks as ranks
from sdk.checkpoints import _state as trainstate
from sdk.checkpoints._buffers import FileBuffers
from sdk.checkpoints._dcpmeta import INDEX_NAME
from sdk.checkpoints._prepare import Prepared, ShardedPart, distributed, prepare
from sdk.checkpoints._retention import Committed, Uncommitted, plan_deletions
from sdk.checkpoints._verify import check_files
from sdk.checkpoints.invalidmark import MARK_NAME
from sdk.checkpoints.manifest import MANIFEST_NAME, FileEntry, Manifest, parse, parse_step_dir, step_dir
from sdk.config import Config
from sdk.errors import (
    CommitConflictError,
    InvalidCheckpointError,
    NoCheckpointError,
    PartlyLoadedError,
    PodtrainError,
    StaleAttemptError,
    StorageNotFoundError,
)
from sdk.log import get_logger
from sdk.stores import checksum
from sdk.stores.store import RetryPolicy, Store, open_store

__all__ = ["CheckpointInfo", "Checkpointer", "Prepared", "ScanEntry", "ShardedPart"]

log = get_logger("podtrain.checkpoint")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its step, URL and manifest."""

    step: int
    url: str
    manifest: Manifest


@dataclass(frozen=True)
class ScanEntry:
    """One step folder as found in the store: its manifest when it parses, or why it does not."""

    step: int
    url: str
    manifest: Manifest | None
    problem: str | None
    attempts: frozenset[int]
    marked: bool = False  # an earlier full check left its finding here (sdk.checkpoints.invalidmark)


class Checkpointer:
    """Save, list, verify, load and prune the checkpoints of one run under ``url``."""

    def __init__(
        self,
        url: str | Store,
        *,
        run_id: str = "local",
        attempt: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        keep_last: int = 3,
        keep_every: int | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_workers: int = 8,
        safe_globals: Iterable[Any] = (),
        writer: str | None = None,
    ) -> None:
        self.store = url if isinstance(url, Store) else open_store(url, retry=retry, sleep=sleep)
        self.run_id = run_id
        self._attempt = attempt
        self.world_size = world_size
        self.rank = rank
        self.rank_timeout = ranks.RANK_TIMEOUT
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.max_workers = max_workers
        self.safe_globals = list(safe_globals)
        self.resumed_from: int | None = None
        self.resumed_url: str | None = None  # the checkpoint load() restored
        self.claimed: fence.Claim | None = None
        self.last_save_seconds: float | None = None
        self._root_checked = False
        # This writer's id (its files go under attempt-<n>-<writer>/): random for one rank; several ranks must share
        # one, so there it is given, or agreed by them (``shared_writer``, set by sdk.run from sdk.lifecycle.agreement).
        self.writer = writer if writer is not None or world_size > 1 else fence.new_writer()
        self.shared_writer: Callable[[], str | None] | None = None
        # The ranks' agreement (sdk.lifecycle.agreement.Agreement, set by sdk.run): the collectives of sharded
        # saves and of loads with several ranks. Made on first use when the job has several ranks and none is set.
        self.collective: Any = None
        self._plans: dict[str, Any] = {}  # the last agreed plan of sharded saves (sdk.checkpoints._sharded.PlanCache)
        self._buffers = FileBuffers()  # the last save's file buffers, for the next one

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> Checkpointer:
        """A checkpointer for the run ``config`` describes."""
        return cls(
            config.checkpoint_uri,
            run_id=config.run_id,
            attempt=config.attempt,
            world_size=config.world_size,
            rank=config.rank,
            keep_last=config.keep_last,
            keep_every=config.keep_every,
            **kwargs,
        )

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def attempt(self) -> int:
        """This writer's attempt number: as configured, or derived once — the next number after the newest attempt
        in the store (folders, manifests, claims, reservations), reserved there so no other process gets it."""
        if self._attempt is None:
            entries = self.scan()
            seen = [a for entry in entries for a in entry.attempts]
            seen += [e.manifest.attempt for e in entries if e.manifest]
            self._attempt = fence.reserve_attempt(self.store, max(seen, default=0))
            log.info("checkpoint.attempt_derived", attempt=self._attempt, url=self.url)
        return self._attempt

    def writer_id(self) -> str | None:
        """This writer's id: given or random, or the one its ranks agreed on (None: they agreed on none yet)."""
        return self.writer if self.writer is not None or self.shared_writer is None else self.shared_writer()

    def claim(self, resumed_from: int | None = None) -> fence.Claim:
        """Take over the run after ``resumed_from`` (default: the newest committed step) for this attempt.

        Older attempts still running are fenced from then on (see :mod:`sdk.checkpoints._fence`). Claiming twice is a
        no-op.
        """
        if self.claimed is None:
            if resumed_from is None:
                committed = self.list(verify=False)
                resumed_from = committed[0].step if committed else 0
            self.claimed = fence.claim(self.store, self.attempt, resumed_from)
            log.info("checkpoint.claimed", attempt=self.claimed.attempt, resumed_from=self.claimed.resumed_from)
        return self.claimed

    def _check_not_superseded(self, doing: str) -> list[fence.Claim]:
        claims = fence.read_claims(self.store)
        newer = fence.superseding(claims, self.attempt)
        if newer is not None:
            log.error("checkpoint.superseded", attempt=self.attempt, by=newer.attempt, doing=doing)
            raise StaleAttemptError(
                f"attempt {self.attempt} of this run was superseded by attempt {newer.attempt} (which resumed from "
                f"step {newer.resumed_from}); not {doing}: this attempt must stop (if it is in fact a new attempt, "
                "give it a higher PODTRAIN_ATTEMPT, or leave it unset to derive the next number)"
            )
        return claims

    def _clear_superseded(self, folder: str, claims: builtins.list[fence.Claim], location: str) -> None:
        """Remove a superseded commit of this step (a zombie's) so ours can take its place; else conflict."""
        try:
            existing = parse(self.store.get(f"{folder}/{MANIFEST_NAME}"), location=location)
        except StorageNotFoundError:
            return
        except InvalidCheckpointError:
            existing = None
        if existing is not None and fence.superseded_by(claims, existing.attempt, existing.step) is None:
            raise CommitConflictError(f"checkpoint {location} is already committed; not writing it again")
        self.store.delete(f"{folder}/{MANIFEST_NAME}")
        log.warning("checkpoint.superseded_removed", url=location, attempt=existing.attempt if existing else None)

    # -- save ------------------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None) -> CheckpointInfo:
        """Save ``state`` as the checkpoint of ``step`` and commit it; then apply retention.

        Returns when the checkpoint is committed. Raises :class:`CommitConflictError` when another writer
        already committed this step.
        """
        prepared = self.prepare(state)
        return self.write(step, prepared.payloads, meta=meta, sharded=prepared.sharded)

    def prepare(self, state: Mapping[str, Any]) -> Prepared:
        """What a save of ``state`` writes (:func:`sdk.checkpoints._prepare.prepare`); on every rank at once."""
        return prepare(
            state, rank=self.rank, world_size=self.world_size, collective=self._collective, plans=self._plans
        )

    def write(
        self,
        step: int,
        payloads: Iterable[tuple[str, Any]],
        *,
        meta: Mapping[str, Any] | None = None,
        sharded: ShardedPart | None = None,
    ) -> CheckpointInfo:
        """Serialize, upload and commit ``(name, payload)`` pairs as the checkpoint of ``step``; then prune.

        :meth:`save` passes the live state's payloads; an asynchronous save passes a snapshot of them
        (:mod:`sdk.checkpoints._snapshot`) from a background thread. ``sharded``: the plan :meth:`prepare` made;
        rank 0 writes its index once every rank's files are in, before the manifest.
        """
        from sdk.checkpoints import serialization

        started = time.monotonic()
        folder = step_dir(step)
        attempt = self.attempt
        location = self.store.url_of(folder)
        writer = self.writer_id()
        own = fence.writer_dir(attempt, writer)  # this writer's folder: no other writer ever puts a file there
        claims = self._check_not_superseded(f"writing step {step}")
        if self.store.exists(f"{folder}/{MANIFEST_NAME}"):
            self._clear_superseded(folder, claims, location)
        prefix = ranks.rank_prefix(own, self.rank, self.world_size)
        entries: dict[str, FileEntry] = {}
        used: list[bytearray] = []
        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="podtrain-upload") as pool:
            uploads: list[Future[bool]] = []
            for stem, payload in payloads:
                split = 0 if stem == trainstate.SHARDED_STEM else serialization.SPLIT_BYTES
                for encoded in serialization.encode(stem, payload, split_bytes=split, buffers=self._buffers):
                    name = f"{prefix}/{encoded.name}"
                    entries[name] = FileEntry(size=encoded.size, crc32c=checksum.to_hex(encoded.crc32c))
                    uploads.append(pool.submit(self.store.put, f"{folder}/{name}", encoded.data, crc32c=encoded.crc32c))
                    if isinstance(encoded.data, bytearray):
                        used.append(encoded.data)
                    del encoded
            for upload in uploads:
                upload.result()
        self._buffers.keep(used)
        if self.world_size > 1:
            ranks.write_record(self.store, folder, own, self.rank, entries)
            if self.rank != 0:  # rank 0 commits once every rank's record is in
                log.info("checkpoint.rank_written", step=step, url=location, files=len(entries))
                manifest = self._manifest(step, attempt, entries, meta, sharded.names if sharded else ())
                return CheckpointInfo(step, location, manifest)
            entries = ranks.gather(
                self.store,
                folder,
                own,
                self.world_size,
                timeout=self.rank_timeout,
                own_seconds=time.monotonic() - started,
            )
        if sharded is not None and sharded.index is not None:
            index, crc = f"{own}/{INDEX_NAME}", checksum.crc32c(sharded.index)
            self.store.put(f"{folder}/{index}", sharded.index, crc32c=crc)
            entries[index] = FileEntry(size=len(sharded.index), crc32c=checksum.to_hex(crc))
        manifest = self._manifest(step, attempt, entries, meta, sharded.names if sharded else ())
        try:
            return self._commit(folder, location, manifest, started)
        except CommitConflictError:
            if writer:  # a folder without a writer id may be another job's (the same attempt): never removed
                self._remove_own(f"{folder}/{own}", location)
            raise

    def _remove_own(self, rel: str, location: str) -> None:
        """After losing the commit: remove this writer's files (nobody else writes there; nothing lists them)."""
        try:
            self.store.delete(rel, recursive=True)
        except PodtrainError as exc:  # left for retention; the conflict is what the caller must hear about
            log.warning("checkpoint.loser_not_removed", url=location, folder=rel, error=str(exc))

    def _manifest(
        self,
        step: int,
        attempt: int,
        entries: dict[str, FileEntry],
        meta: Mapping[str, Any] | None,
        sharded: tuple[str, ...] = (),
    ) -> Manifest:
        import torch

        return Manifest(
            run_id=self.run_id,
            attempt=attempt,
            step=step,
            world_size=self.world_size,
            files=entries,
            torch=torch.__version__.split("+")[0],
            meta=dict(meta or {}),
            sharded=sharded,
        )

    def _commit(self, folder: str, location: str, manifest: Manifest, started: float) -> CheckpointInfo:
        step = manifest.step
        claims = self._check_not_superseded(f"committing step {step}")
        committed = self.store.put(f"{folder}/{MANIFEST_NAME}", manifest.to_json(), exclusive=True)
        if not committed:  # another writer committed first: a superseded one gives way, anyone else wins
            self._clear_superseded(folder, claims, location)
            committed = self.store.put(f"{folder}/{MANIFEST_NAME}", manifest.to_json(), exclusive=True)
        if not committed:
            raise CommitConflictError(
                f"checkpoint {location} was already committed by another writer; this save was not committed"
            )
        self.last_save_seconds = time.monotonic() - started
        log.info(
            "checkpoint.committed",
            step=step,
            url=location,
            bytes=manifest.total_bytes,
            files=len(manifest.files),
            seconds=round(self.last_save_seconds, 3),
        )
        self._prune()  # the claims were checked just before the commit: no second look
        return CheckpointInfo(step=step, url=location, manifest=manifest)

    def _collective(self) -> Any:
        if self.collective is None:
            from sdk.lifecycle.agreement import Agreement

            self.collective = Agreement(self.world_size)
        return self.collective

    # -- find ------------------------------------------------------------------------------------------
    def scan(self) -> list[ScanEntry]:
        """Every step folder with its manifest or the reason it has none, newest step first."""
        if not self._root_checked:
            self.store.ensure_root()  # a missing bucket or denied access fails here, with a message
            self._root_checked = True
        names = self.store.list()
        claims = fence.read_claims(self.store) if fence.CLAIMS_DIR in names else []
        entries = []
        for name in names:
            step = parse_step_dir(name)
            if step is None:
                continue
            children = self.store.list(name)
            attempts = frozenset(a for c in children if (a := fence.attempt_of_dir(c)) is not None)
            location = self.store.url_of(name)
            manifest: Manifest | None = None
            problem: str | None = None
            if MANIFEST_NAME not in children:
                problem = "no manifest (never committed, or still being written)"
            else:
                try:
                    parsed = parse(self.store.get(f"{name}/{MANIFEST_NAME}"), location=location)
                    newer = fence.superseded_by(claims, parsed.attempt, step)
                    if parsed.step != step:
                        problem = f"manifest says step {parsed.step}, folder says {step}"
                    elif newer is not None:
                        problem = (
                            f"superseded: committed by attempt {parsed.attempt} after attempt {newer.attempt} took "
                            f"over from step {newer.resumed_from} (a stale attempt's work, never loaded)"
                        )
                    else:
                        manifest = parsed
                except InvalidCheckpointError as exc:
                    problem = exc.reason
            entries.append(ScanEntry(step, location, manifest, problem, attempts, MARK_NAME in children))
        return sorted(entries, key=lambda e: e.step, reverse=True)

    def list(self, *, verify: bool = True, download: bool = False) -> list[CheckpointInfo]:
        """Committed checkpoints, newest first; with ``verify``, only those :meth:`problem` finds nothing wrong with."""
        found = []
        for entry in self.scan():
            if entry.manifest is None or (verify and self.problem(entry, download=download)):
                continue
            found.append(CheckpointInfo(entry.step, entry.url, entry.manifest))
        return found

    def problem(self, entry: ScanEntry, *, download: bool = False) -> str | None:
        """Why ``entry`` is not a valid checkpoint, or None when it is.

        Every listed file must exist with the manifest's size and, where the store records a CRC32C (S3, GCS),
        the manifest's CRC32C; with ``download``, every byte is read and checksummed too.
        """
        if entry.manifest is None:
            return entry.problem or "no manifest"
        try:
            self._check_files(CheckpointInfo(entry.step, entry.url, entry.manifest), download=download)
        except InvalidCheckpointError as exc:
            log.warning("checkpoint.invalid", url=entry.url, reason=exc.reason)
            return exc.reason
        return None

    def verify(self, step: int | None = None, *, download: bool = True) -> CheckpointInfo:
        """Check the checkpoint of ``step`` (default: the newest committed) completely; raise why it fails."""
        entries = self.scan()
        if step is not None:
            entries = [e for e in entries if e.step == step]
        if not entries:
            what = f"step {step}" if step is not None else "any checkpoint"
            raise NoCheckpointError(f"no checkpoint folder for {what} under {self.url}")
        entry = next((e for e in entries if e.manifest), entries[0]) if step is None else entries[0]
        if entry.manifest is None:
            raise InvalidCheckpointError(entry.url, entry.problem or "no manifest")
        info = CheckpointInfo(entry.step, entry.url, entry.manifest)
        self._check_files(info, download=download)
        return info

    # -- load ------------------------------------------------------------------------------------------
    def load(self, state: Mapping[str, Any], *, step: int | None = None) -> int | None:
        """Restore the newest valid checkpoint (or ``step``) into ``state`` and the RNGs; return its step.

        Invalid checkpoints are skipped with a warning saying why, falling back to the previous one. Returns
        None when there is no checkpoint at all. With ``step`` given, that checkpoint must be valid.

        A checkpoint saved by another number of ranks loads when its state can be resharded
        (:mod:`sdk.checkpoints._restore`). With several ranks and a :attr:`collective`, the ranks take the same
        checkpoint: rank 0's list of candidates, and every decision to skip one or to fail, are agreed.
        """
        trainstate.check(state)
        collective = self._collective() if distributed(self.world_size) else None
        scanned = {e.step: e for e in self.scan()}
        order = sorted(scanned, reverse=True)
        if collective is not None:
            order = collective.broadcast(order)
        candidates = [s for s in order if step is None or s == step]
        if step is not None and not candidates:
            raise NoCheckpointError(f"no checkpoint for step {step} under {self.url}")
        from sdk.checkpoints import _restore

        written = _restore.Written()  # whether a skipped checkpoint changed part of the state on this rank
        for candidate in candidates:
            entry = scanned.get(candidate)
            location = entry.url if entry else self.store.url_of(step_dir(candidate))
            skipped = _restore.load_candidate(
                self.store,
                candidate,
                state,
                url=location,
                manifest=entry.manifest if entry else None,
                problem=entry.problem if entry else "no step folder on this rank",
                rank=self.rank,
                world_size=self.world_size,
                collective=collective,
                safe_globals=self.safe_globals,
                max_workers=self.max_workers,
                written=written,
            )
            if skipped is None:
                assert entry is not None and entry.manifest is not None
                self.resumed_from, self.resumed_url = entry.step, entry.url
                log.info("checkpoint.resumed", step=entry.step, url=entry.url, attempt=entry.manifest.attempt)
                return entry.step
            if step is not None:
                raise skipped
            log.warning("checkpoint.skipped", url=skipped.location, reason=skipped.reason)
        if collective is not None:
            written.state = collective.any(written.state)[0]
        if written.state:
            raise PartlyLoadedError(
                f"a checkpoint under {self.url} was found damaged after part of it had been loaded, and no older "
                "checkpoint loaded over it (see the skipped ones above): the state is neither a checkpoint nor the "
                "one this run built; start the run again (the next attempt checks every file before loading)"
            )
        if candidates:
            log.warning("checkpoint.none_valid", url=self.url, folders=len(candidates))
        return None

    def _check_files(
        self,
        info: CheckpointInfo,
        *,
        download: bool,
        metadata: bool = True,
        files: Mapping[str, FileEntry] | None = None,
    ) -> dict[str, bytes]:
        """Check the files of ``info`` (all, or ``files``) against its manifest (:func:`sdk.checkpoints._verify`)."""
        listed = info.manifest.files if files is None else files
        return check_files(
            self.store, info.step, info.url, listed, download=download, metadata=metadata, max_workers=self.max_workers
        )

    # -- retention ---------------------------------------------------------------------------------------
    def prune(self) -> builtins.list[int]:
        """Delete what the retention rules allow (see :mod:`sdk.checkpoints._retention`); return the deleted steps.

        A superseded attempt deletes nothing (it raises :class:`StaleAttemptError`).
        """
        self._check_not_superseded("deleting old checkpoints")
        return self._prune()

    def _prune(self) -> builtins.list[int]:
        """:meth:`prune` once this attempt is known not to be superseded."""
        entries = self.scan()
        doomed = plan_deletions(
            [Committed(e.step, e.manifest.attempt) for e in entries if e.manifest],
            [Uncommitted(e.step, e.attempts) for e in entries if e.manifest is None],
            attempt=self.attempt,
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            resumed_from=self.resumed_from,
        )
        for step in doomed:
            folder = step_dir(step)
            # The manifest goes first: a half-deleted folder is then an uncommitted one, never a broken commit.
            self.store.delete(f"{folder}/{MANIFEST_NAME}")
            self.store.delete(folder, recursive=True)
            log.info("checkpoint.deleted", step=step, url=self.store.url_of(folder))
        return doomed
