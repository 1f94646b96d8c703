"""Pull a dataset from object storage into a local folder: parallel, verified, resumable, never re-fetching.

``pull(["s3://bucket/data/"], "/data")`` lists every object under each URL (or takes the URL as one object),
keeps those the include/exclude globs allow, and fetches what the local folder does not already hold:

* **Parallel, bounded memory.** Objects up to ``piece_size`` (16 MiB) are one GET each; larger ones are split
  into ``piece_size`` byte ranges. ``workers`` pieces are in flight at once, each written to its place in the
  file (``pwrite``) as it arrives, so at most ``workers x piece_size`` bytes are in memory (256 MiB by default)
  whatever the dataset. Why 16 MiB: on real S3 one connection moves ~50-100 MB/s after ~10-50 ms to the first
  byte, so a 16 MiB range spends under a tenth of its time waiting, and 16 of them fill a 10-25 Gb/s NIC.
* **Never a half-file that looks whole.** Each file is written as ``<name>.podtrain-partial`` and renamed into
  place only when its size matches the listing and its checksum matches the store's, where the store keeps one:
  CRC32C or CRC32 (S3 sends them with a whole-object GET; GCS lists CRC32C; for ranged objects the pieces'
  CRCs are combined, the data is never read twice), else an S3 ETag (MD5); an S3 multipart upload's COMPOSITE
  CRC or ETag is checked through its part layout (one more request, :class:`sdk.stores.integrity.PartCheck`). A
  mismatch is fetched again (up to 3 reads) before it fails. An object the store keeps no checksum for is
  counted in ``unverified`` or, with ``require_checksums``, refused.
* **Warm cache.** ``.podtrain-pull.jsonl`` in the folder records, per fetched file, the object's fingerprint
  (ETag, GCS generation, or mtime and size), its size and the local file's mtime. A file whose record matches
  the listing and the disk is not fetched again. Lines are written only once their files are on disk: landed
  files are synced together (one ``syncfs`` every 256 MiB or 2 s, not an ``fsync`` per file), so after a crash a
  file is either recorded and whole, or unrecorded and checked again. A file put there another way (a copy, an
  earlier tool) is adopted without a download when its size and checksum match the store's. Records are
  appended as files land, so an interrupted pull continues where it stopped. Nothing the user did not name is
  ever removed.
* **Names are untrusted.** Every local path is the key itself, checked by :func:`sdk.data._localpath.local_name`
  (no ``..``, ``.``, empty or absolute component, nothing over the file system's limits, none of podtrain's own
  names, no key that is also another's folder): a key that cannot land stops the pull before anything is written
  (exit 2, naming it). Files are created and renamed relative to folder descriptors opened without following a
  link (:mod:`sdk.data._destination`), and one pull at a time holds the folder (a lock; a second one waits).
* **Space first.** Before fetching, the bytes to fetch are compared with the free space of the volume;
  :class:`~sdk.errors.InsufficientSpaceError` names both when they do not fit. A disk that fills anyway (another
  writer, a quota, a file-size limit) is one :class:`~sdk.errors.LocalDiskError`; every write is checked whole
  and every file's length on disk before it is renamed and recorded (:mod:`sdk.data._landing`).
* **Progress**: a tqdm bar on a terminal, structured log lines every few seconds otherwise (files, bytes, rate,
  ETA) — :mod:`sdk.data._progress`.

Transient errors are retried by the store's retry loop; a transfer that receives no byte for
``stall_seconds`` is cut there and retried (:mod:`sdk.stores.store`); permanent errors fail fast with the store's
message.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from sdk.data._destination import LOCK_WAIT, Destination
from sdk.data._localpath import INDEX_NAME, PARTIAL_SUFFIX, find_clash, refused_message
from sdk.data._progress import Progress
from sdk.data._transfer import Transfer, Wanted
from sdk.data._warmcache import WarmCache
from sdk.errors import InsufficientSpaceError, StorageNotFoundError, UnsafeKeyError
from sdk.log import get_logger
from sdk.stores.integrity import Digest, matches
from sdk.stores.store import RetryPolicy, open_store

__all__ = ["INDEX_NAME", "PARTIAL_SUFFIX", "PIECE_SIZE", "PullCancelled", "PullResult", "pull"]

log = get_logger("podtrain.pull")
PIECE_SIZE = 16 * 2**20
SPACE_MARGIN = 64 * 2**20  # bytes kept free on the volume beyond the dataset


@dataclass(frozen=True)
class PullResult:
    """What a pull did: files listed, fetched, already present (``adopted``: found on disk without a record and
    matched by checksum), bytes fetched, seconds; ``unverified``: files fetched that the store keeps no checksum
    for (only their size was checked)."""

    files: int
    fetched: int
    skipped: int
    bytes_fetched: int
    seconds: float
    adopted: int = 0
    unverified: int = 0


class PullCancelled(Exception):
    """The pull was told to stop (a SIGTERM while it ran); the files fetched so far stay, recorded."""


def pull(
    sources: Sequence[str],
    dest: str | Path,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    workers: int = 16,
    piece_size: int = PIECE_SIZE,
    stall_seconds: float | None = None,
    retry: RetryPolicy | None = None,
    progress: bool | None = None,
    progress_every: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    cancel: threading.Event | None = None,
    direct: bool = True,
    require_checksums: bool = False,
    lock_wait: float = LOCK_WAIT,
) -> PullResult:
    """Fetch every object under ``sources`` into ``dest`` that is not already there unchanged; see the module.

    ``stall_seconds``: a transfer receiving nothing for this long is aborted and retried (default: the retry
    policy's timeout, 60 s). ``progress``: a terminal bar (default: when stderr is a terminal). ``cancel``:
    once set, no further piece is started and :class:`PullCancelled` is raised. ``direct``: write files around
    the page cache where the file system allows (:mod:`sdk.data._landing`); False leaves them cached in memory.
    ``require_checksums``: an object the store keeps no checksum for is an :class:`UnverifiedObjectError`
    (nothing of it lands) rather than a file counted in ``unverified``. ``lock_wait``: how long to wait for
    another pull into the same folder to finish (:mod:`sdk.data._destination`).

    Every local path comes from :func:`sdk.data._localpath.local_name`: a key that cannot land stops the pull before
    anything is written (:class:`~sdk.errors.UnsafeKeyError`); nothing below ``dest`` is reached through a
    symbolic link; a full disk is one :class:`~sdk.errors.LocalDiskError`, the files there before left intact.
    """
    started = clock()
    if stall_seconds is not None:
        retry = replace(retry or RetryPolicy(), timeout=stall_seconds)
    folder = _locked(dest, lock_wait, cancel)
    target = folder.root
    with folder, folder.landing_errors() as load, contextlib.closing(WarmCache(target / INDEX_NAME)) as index:
        wanted = _list(sources, list(include), list(exclude), retry, folder)
        base = str(target)
        unknown = [
            w for w in wanted if not index.current(w.name, os.path.join(base, w.name), w.info.size, w.info.fingerprint)
        ]
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="podtrain-pull") as pool:
            adopted = {n for n in pool.map(lambda w: _adopt(w, folder, index), unknown) if n}
        todo = [w for w in unknown if w.name not in adopted]
        need = sum(w.info.size for w in todo)
        _check_space(target, len(todo), need)
        load.need, load.files = need, len(todo)
        log.info("pull.start", files=len(wanted), to_fetch=len(todo), adopted=len(adopted), bytes=need, dest=str(dest))
        bar = Progress("pull", len(todo), need, clock=clock, every=progress_every, bar=progress)
        transfers = [Transfer(w, folder, index, piece_size, direct=direct, require=require_checksums) for w in todo]
        _fetch_all(transfers, bar, workers=workers, cancel=cancel)
    unverified = sum(1 for t in transfers if not t.verified)
    result = PullResult(
        len(wanted), len(todo), len(wanted) - len(todo), need, clock() - started, len(adopted), unverified
    )
    log.info("pull.done", **result.__dict__)
    return result


def _fetch_all(transfers: list[Transfer], progress: Progress, *, workers: int, cancel: threading.Event | None) -> None:
    """Every piece of every transfer through one pool; the first failure stops the pieces not yet started."""
    failed = threading.Event()

    def run(transfer: Transfer, start: int) -> None:
        if failed.is_set() or (cancel is not None and cancel.is_set()):
            raise PullCancelled(f"pull stopped before {transfer.wanted.name}")
        transfer.fetch(start, progress)

    pieces = [(t, start) for t in transfers for start in t.starts]
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="podtrain-pull") as pool:
            try:
                for _ in pool.map(run, [t for t, _ in pieces], [start for _, start in pieces]):
                    pass
            except BaseException:
                failed.set()
                raise
    finally:
        progress.close()
        stopped = cancel is not None and cancel.is_set()  # stopped, not failed: keep the pieces that landed
        for transfer in transfers:
            transfer.abandon(keep=stopped)


def _locked(dest: str | Path, wait: float, cancel: threading.Event | None) -> Destination:
    """The folder, created if need be and locked for this pull (waiting up to ``wait`` s for another one)."""
    folder = Destination(dest)
    try:
        stopped = cancel.is_set if cancel is not None else (lambda: False)
        if not folder.lock(wait=wait, stopped=stopped, sleep=cancel.wait if cancel is not None else time.sleep):
            raise PullCancelled(f"pull stopped while waiting for another pull into {folder.root}")
    except BaseException:
        folder.close()
        raise
    return folder


def _list(
    sources: Sequence[str], include: list[str], exclude: list[str], retry: RetryPolicy | None, folder: Destination
) -> list[Wanted]:
    """Every object to pull, named in the folder by :func:`sdk.data._localpath.local_name`; a key that cannot land
    (unsafe, or clashing with another) fails the pull here, before anything is written."""
    wanted = []
    for url in sources:
        store = open_store(url, retry=retry)
        listing = store.objects()
        if not listing:
            raise StorageNotFoundError(f"nothing to pull at {store.url}: check PODTRAIN_DATA_URI", url=store.url)
        root = store.url.rstrip("/")
        for rel, info in sorted(listing.items()):
            key = rel or root.rsplit("/", 1)[-1]
            if _selected(key, include, exclude):
                wanted.append(Wanted(store, rel, folder.name_of(key, f"{root}/{rel}" if rel else root), info))
    clash = find_clash(w.name for w in wanted)
    if clash is not None:
        first, second = clash
        why = (
            "it is listed twice (two URLs give the same name)"
            if first == second
            else f"{first!r} and {second!r} are both objects, so {first!r} would have to be a file and a folder"
        )
        raise UnsafeKeyError(refused_message(first, why, dest=str(folder.root)), key=first)
    return wanted


def _selected(rel: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatch.fnmatch(rel, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatch(rel, pattern) for pattern in exclude)


def _check_space(target: Path, files: int, need: int) -> None:
    free = shutil.disk_usage(target).free
    if need + SPACE_MARGIN > free:
        raise InsufficientSpaceError(
            f"pulling {files} files needs {need / 2**30:.2f} GiB (+{SPACE_MARGIN // 2**20} MiB margin) in "
            f"{target}, which has {free / 2**30:.2f} GiB free: give PODTRAIN_DATA_DIR a bigger volume"
        )


def _adopt(wanted: Wanted, folder: Destination, index: WarmCache) -> str:
    """The name, when a regular file of the right size is already there (no record), reached without following a
    link, and matches the store's checksum."""
    path = folder.root / wanted.name
    try:
        if os.stat(path).st_size != wanted.info.size:  # the cheap look first: most unknown files are missing
            return ""
    except OSError:
        return ""
    fd = folder.open_existing(wanted.name)
    if fd is None:
        return ""  # a link, or not a regular file: fetched, and a link replaced, never written through
    with os.fdopen(fd, "rb") as src:
        status = os.fstat(src.fileno())
        if status.st_size != wanted.info.size:
            return ""
        sums = wanted.info.checksums or wanted.store.describe(wanted.rel).checksums
        digest = Digest.for_checksums(sums)
        if digest is None:
            return ""  # nothing to compare with: fetch it
        while chunk := src.read(8 * 2**20):
            digest.update(chunk)
    if not matches(digest, sums):
        return ""
    index.record(path, wanted.name, wanted.info.size, wanted.info.fingerprint, mtime_ns=status.st_mtime_ns)
    log.debug("pull.adopted", name=wanted.name)
    return wanted.name
