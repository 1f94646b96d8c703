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
  CRCs are combined, the data is never read twice), else a single-part S3 ETag (MD5). A mismatch is fetched
  again (up to 3 reads) before it fails.
* **Warm cache.** ``.podtrain-pull.jsonl`` in the folder records, per fetched file, the object's fingerprint
  (ETag, GCS generation, or mtime and size), its size and the local file's mtime. A file whose record matches
  the listing and the disk is not fetched again. Lines are written only once their files are on disk: landed
  files are synced together (one ``syncfs`` every 256 MiB or 2 s, not an ``fsync`` per file), so after a crash a
  file is either recorded and whole, or unrecorded and checked again. A file put there another way (a copy, an
  earlier tool) is adopted without a download when its size and checksum match the store's. Records are
  appended as files land, so an interrupted pull continues where it stopped. Nothing the user did not name is
  ever removed.
* **Space first.** Before fetching, the bytes to fetch are compared with the free space of the volume;
  :class:`~sdk.errors.InsufficientSpaceError` names both when they do not fit.
* **Progress**: a tqdm bar on a terminal, structured log lines every few seconds otherwise (files, bytes, rate,
  ETA) — :mod:`sdk.progress`.

Transient errors are retried by the store's retry loop; a transfer that receives no byte for
``stall_seconds`` is cut there and retried (:mod:`sdk.storage`); permanent errors fail fast with the store's
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

from sdk.errors import InsufficientSpaceError, StorageNotFoundError, TransientStorageError
from sdk.integrity import Digest, matches
from sdk.landing import LandingFile
from sdk.log import get_logger
from sdk.progress import Progress
from sdk.storage import ObjectInfo, RetryPolicy, Store, open_store
from sdk.warmcache import INDEX_NAME, WarmCache

__all__ = ["INDEX_NAME", "PARTIAL_SUFFIX", "PIECE_SIZE", "PullCancelled", "PullResult", "pull"]

log = get_logger("podtrain.pull")
PARTIAL_SUFFIX = ".podtrain-partial"
PIECE_SIZE = 16 * 2**20
SPACE_MARGIN = 64 * 2**20  # bytes kept free on the volume beyond the dataset
_READS = 3


@dataclass(frozen=True)
class PullResult:
    """What a pull did: files listed, fetched, already present (``adopted``: found on disk without a record and
    matched by checksum), bytes fetched, seconds."""

    files: int
    fetched: int
    skipped: int
    bytes_fetched: int
    seconds: float
    adopted: int = 0


@dataclass(frozen=True)
class _Wanted:
    store: Store
    rel: str  # in the store ("" when the URL is the object itself)
    name: str  # in the folder
    info: ObjectInfo


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
) -> PullResult:
    """Fetch every object under ``sources`` into ``dest`` that is not already there unchanged; see the module.

    ``stall_seconds``: a transfer receiving nothing for this long is aborted and retried (default: the retry
    policy's timeout, 60 s). ``progress``: a terminal bar (default: when stderr is a terminal). ``cancel``:
    once set, no further piece is started and :class:`PullCancelled` is raised. ``direct``: write files around
    the page cache where the file system allows (:mod:`sdk.landing`); False leaves them cached in memory.
    """
    started = clock()
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    if stall_seconds is not None:
        retry = replace(retry or RetryPolicy(), timeout=stall_seconds)
    index = WarmCache(target / INDEX_NAME)  # read first: it overlaps the listing's round trip (sdk.listing)
    with contextlib.closing(index):
        wanted = _list(sources, list(include), list(exclude), retry)
        base = str(target)
        unknown = [
            w for w in wanted if not index.current(w.name, os.path.join(base, w.name), w.info.size, w.info.fingerprint)
        ]
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="podtrain-pull") as pool:
            adopted = {n for n in pool.map(lambda w: _adopt(w, target, index), unknown) if n}
        todo = [w for w in unknown if w.name not in adopted]
        need = sum(w.info.size for w in todo)
        _check_space(target, len(todo), need)
        log.info("pull.start", files=len(wanted), to_fetch=len(todo), adopted=len(adopted), bytes=need, dest=str(dest))
        bar = Progress("pull", len(todo), need, clock=clock, every=progress_every, bar=progress)
        transfers = [_Transfer(w, target, index, piece_size, direct=direct) for w in todo]
        _fetch_all(transfers, bar, workers=workers, cancel=cancel)
    result = PullResult(len(wanted), len(todo), len(wanted) - len(todo), need, clock() - started, len(adopted))
    log.info("pull.done", **result.__dict__)
    return result


def _fetch_all(transfers: list[_Transfer], progress: Progress, *, workers: int, cancel: threading.Event | None) -> None:
    """Every piece of every transfer through one pool; the first failure stops the pieces not yet started."""
    failed = threading.Event()

    def run(transfer: _Transfer, start: int) -> None:
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
        for transfer in transfers:
            transfer.abandon()


def _list(sources: Sequence[str], include: list[str], exclude: list[str], retry: RetryPolicy | None) -> list[_Wanted]:
    wanted = []
    for url in sources:
        store = open_store(url, retry=retry)
        listing = store.objects()
        if not listing:
            raise StorageNotFoundError(f"nothing to pull at {store.url}: check PODTRAIN_DATA_URI", url=store.url)
        for rel, info in sorted(listing.items()):
            name = rel or store.url.rstrip("/").rsplit("/", 1)[-1]
            if _selected(name, include, exclude):
                wanted.append(_Wanted(store, rel, name, info))
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


def _adopt(wanted: _Wanted, target: Path, index: WarmCache) -> str:
    """The name, when a file of the right size is already there (no record) and matches the store's checksum."""
    path = target / wanted.name
    try:
        if path.stat().st_size != wanted.info.size:
            return ""
    except OSError:
        return ""
    sums = wanted.info.checksums or wanted.store.describe(wanted.rel).checksums
    digest = Digest.for_checksums(sums)
    if digest is None:
        return ""  # nothing to compare with: fetch it
    with path.open("rb") as src:
        while chunk := src.read(8 * 2**20):
            digest.update(chunk)
    if not matches(digest, sums):
        return ""
    index.record(path, wanted.name, wanted.info.size, wanted.info.fingerprint)
    log.debug("pull.adopted", name=wanted.name)
    return wanted.name


class _Transfer:
    """One object on its way: its pieces land in ``<name>.podtrain-partial``; the last one verifies and renames."""

    def __init__(self, wanted: _Wanted, target: Path, index: WarmCache, piece_size: int, *, direct: bool) -> None:
        self.wanted, self.index, self.direct = wanted, index, direct
        self.path = target / wanted.name
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        size = wanted.info.size
        self.piece_size = piece_size if size > piece_size else max(size, 1)
        self.starts = list(range(0, size, self.piece_size)) or [0]
        self.ranged = len(self.starts) > 1
        self._lock = threading.Lock()
        self._file: LandingFile | None = None
        self._parts: dict[int, tuple[Digest, int]] = {}  # piece start -> (its digest, its length)
        self._sums = dict(wanted.info.checksums)
        self._sums.pop("etag_md5", None)  # a hint, never a reason to fail
        self.done = False

    def open(self) -> LandingFile:
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = LandingFile(
                    self.partial, self.wanted.info.size, direct=self.direct, preallocate=self.ranged
                )
                if self.ranged and not self._sums:  # ranged GETs carry no checksum: ask once
                    self._sums = dict(self.wanted.store.describe(self.wanted.rel).checksums)
                    self._sums.pop("md5", None)  # MD5 cannot be combined from pieces
                    self._sums.pop("etag_md5", None)
            return self._file

    def fetch(self, start: int, progress: Progress) -> None:
        """Read one piece, checked, and write it at its offset; the last piece completes the file."""
        file = self.open()
        end = min(start + self.piece_size, self.wanted.info.size)
        data, digest = self._read_checked(start, end)
        file.write(data, start)
        progress.add_bytes(len(data))
        with self._lock:
            self._parts[start] = (digest, len(data))
            last = len(self._parts) == len(self.starts)
        if last:
            self._complete()
            progress.add_file()

    def _read_checked(self, start: int, end: int) -> tuple[bytes, Digest]:
        """The piece's bytes, of the right length; a whole object also matching the store's checksum."""
        problem = ""
        for read in range(1, _READS + 1):
            if self.ranged:
                data, _ = self.wanted.store.read(self.wanted.rel, start, end)
            else:
                data, sums = self.wanted.store.read(self.wanted.rel)
                self._sums.update(sums)
            digest = Digest.of(data, self._sums)
            problem = "" if len(data) == end - start else f"{len(data)} bytes arrived, {end - start} expected"
            if not problem and not self.ranged:
                problem = self._mismatch(digest)
            if not problem:
                return data, digest
            log.warning("pull.reread", url=self.wanted.store.url_of(self.wanted.rel), read=read, reason=problem)
        raise TransientStorageError(f"{self.wanted.store.url_of(self.wanted.rel)}: {problem}", url=self.url)

    @property
    def url(self) -> str:
        return self.wanted.store.url

    def _complete(self) -> None:
        if self.ranged:
            combined = Digest.combine([self._parts[s] for s in self.starts])
            problem = self._mismatch(combined)
            if problem:  # pieces were each the right length, yet the whole is wrong: fetch it again, in order
                log.warning("pull.reread", url=self.wanted.store.url_of(self.wanted.rel), read=1, reason=problem)
                self._refetch_sequentially()
        assert self._file is not None
        self._file.close()  # made durable with others before its index line is written (see sdk.warmcache)
        self._file = None
        os.replace(self.partial, self.path)
        self.index.record(self.path, self.wanted.name, self.wanted.info.size, self.wanted.info.fingerprint)
        self.done = True

    def _refetch_sequentially(self) -> None:
        assert self._file is not None
        for read in range(2, _READS + 1):
            parts = []
            for start in self.starts:
                end = min(start + self.piece_size, self.wanted.info.size)
                data, _ = self.wanted.store.read(self.wanted.rel, start, end)
                self._file.write(data, start)
                parts.append((Digest.of(data, self._sums), len(data)))
            problem = self._mismatch(Digest.combine(parts))
            if not problem:
                return
            log.warning("pull.reread", url=self.wanted.store.url_of(self.wanted.rel), read=read, reason=problem)
        raise TransientStorageError(f"{self.wanted.store.url_of(self.wanted.rel)}: {problem}", url=self.url)

    def _mismatch(self, digest: Digest) -> str:
        if matches(digest, self._sums):
            return ""
        theirs = self._sums.get(digest.name)
        shown = f"{theirs:08x}" if isinstance(theirs, int) else theirs
        return f"{digest.name} {digest.hexdigest()} != the store's {shown}"

    def abandon(self) -> None:
        """After a failure or a cancel: close and remove what was not completed (it is fetched again next time)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.done:
            self.partial.unlink(missing_ok=True)
