"""Pull a dataset from object storage into a local folder: parallel, verified, resumable, never re-fetching.

``pull(["s3://bucket/data/"], "/data")`` lists every object under each URL (or takes the URL as one object),
keeps those the include/exclude globs allow, and fetches what the local folder does not already hold:

* **Never a half-file that looks whole.** Each file is written as ``<name>.podtrain-partial`` and renamed into
  place only when its size matches the listing and, where the store keeps one (S3 single-part objects, GCS),
  its CRC32C matches the store's. A mismatch is fetched again (up to 3 reads) before it fails.
* **Warm cache.** ``.podtrain-pull.jsonl`` in the folder records, per fetched file, the object's fingerprint
  (ETag, GCS generation, or mtime and size), its size and the local file's mtime. A file whose record matches
  the listing and the disk is not fetched again. Records are appended as files land, so an interrupted pull
  continues where it stopped. Nothing the user did not name is ever removed.
* **Space first.** Before fetching, the bytes to fetch are compared with the free space of the volume;
  :class:`~sdk.errors.InsufficientSpaceError` names both when they do not fit.
* **Progress** as structured log lines every few seconds: files, bytes, rate, ETA.

Transient errors are retried by the store's retry loop and a stalled read times out there
(:mod:`sdk.storage`); permanent ones fail fast with the store's message. Objects are fetched whole, several
at a time (``workers``). Not yet: parallel byte ranges within one large object, and a terminal progress bar.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sdk import checksum
from sdk.errors import InsufficientSpaceError, StorageNotFoundError, TransientStorageError
from sdk.log import get_logger
from sdk.storage import RetryPolicy, Store, open_store

__all__ = ["INDEX_NAME", "PARTIAL_SUFFIX", "PullCancelled", "PullResult", "pull"]

log = get_logger("podtrain.pull")
INDEX_NAME = ".podtrain-pull.jsonl"
PARTIAL_SUFFIX = ".podtrain-partial"
SPACE_MARGIN = 64 * 2**20  # bytes kept free on the volume beyond the dataset
_READS = 3


@dataclass(frozen=True)
class PullResult:
    """What a pull did: files listed, fetched and already present, bytes fetched, seconds."""

    files: int
    fetched: int
    skipped: int
    bytes_fetched: int
    seconds: float


@dataclass(frozen=True)
class _Wanted:
    store: Store
    rel: str  # in the store ("" when the URL is the object itself)
    name: str  # in the folder
    size: int
    fingerprint: str


def pull(
    sources: Sequence[str],
    dest: str | Path,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    workers: int = 16,
    retry: RetryPolicy | None = None,
    progress_every: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    cancel: threading.Event | None = None,
) -> PullResult:
    """Fetch every object under ``sources`` into ``dest`` that is not already there unchanged; see the module.

    ``cancel``: once set, no further object is started (those in flight finish) and :class:`PullCancelled` is
    raised.
    """
    started = clock()
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    include, exclude = list(include), list(exclude)
    wanted: list[_Wanted] = []
    for url in sources:
        store = open_store(url, retry=retry)
        listing = store.objects()
        if not listing:
            raise StorageNotFoundError(f"nothing to pull at {store.url}: check PODTRAIN_DATA_URI", url=store.url)
        for rel, (size, fingerprint) in sorted(listing.items()):
            name = rel or store.url.rstrip("/").rsplit("/", 1)[-1]
            if _selected(name, include, exclude):
                wanted.append(_Wanted(store, rel, name, size, fingerprint))
    index = _Index(target / INDEX_NAME)
    todo = [w for w in wanted if not index.current(w.name, target / w.name, w.size, w.fingerprint)]
    need = sum(w.size for w in todo)
    free = shutil.disk_usage(target).free
    if need + SPACE_MARGIN > free:
        raise InsufficientSpaceError(
            f"pulling {len(todo)} files needs {need / 2**30:.2f} GiB (+{SPACE_MARGIN // 2**20} MiB margin) in "
            f"{target}, which has {free / 2**30:.2f} GiB free: give PODTRAIN_DATA_DIR a bigger volume"
        )
    log.info("pull.start", files=len(wanted), to_fetch=len(todo), bytes=need, dest=str(target))
    progress = _Progress(len(todo), need, clock, progress_every)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="podtrain-pull") as pool:
        for _ in pool.map(lambda w: _fetch(w, target, index, progress, cancel), todo):
            pass
    result = PullResult(len(wanted), len(todo), len(wanted) - len(todo), need, clock() - started)
    log.info("pull.done", **result.__dict__)
    return result


def _selected(rel: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatch.fnmatch(rel, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatch(rel, pattern) for pattern in exclude)


class PullCancelled(Exception):
    """The pull was told to stop (a SIGTERM while it ran); the files fetched so far stay, recorded."""


def _fetch(wanted: _Wanted, target: Path, index: _Index, progress: _Progress, cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise PullCancelled(f"pull stopped before {wanted.name}")
    path = target / wanted.name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    problem = ""
    for read in range(1, _READS + 1):
        data = wanted.store.get(wanted.rel)
        problem = _problem(wanted, data)
        if not problem:
            break
        log.warning("pull.reread", url=wanted.store.url_of(wanted.rel), read=read, reason=problem)
    else:
        raise TransientStorageError(f"{wanted.store.url_of(wanted.rel)}: {problem}", url=wanted.store.url)
    with partial.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    index.record(path, wanted.name, wanted.size, wanted.fingerprint)
    progress.add(len(data))


def _problem(wanted: _Wanted, data: bytes) -> str:
    if len(data) != wanted.size:
        return f"{len(data)} bytes arrived, the store lists {wanted.size}"
    native = wanted.store.native_crc32c(wanted.rel)
    if native is not None and checksum.crc32c(data) != native:
        return f"CRC32C {checksum.to_hex(checksum.crc32c(data))} != the store's {checksum.to_hex(native)}"
    return ""


class _Index:
    """The warm-cache records: one JSON line per fetched file; the last line for a name wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, object]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[str(entry["rel"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted pull

    def current(self, rel: str, local: Path, size: int, fingerprint: str) -> bool:
        """Whether ``local`` holds exactly the listed object ``rel`` already."""
        entry = self.entries.get(rel)
        if entry is None or entry.get("fingerprint") != fingerprint or entry.get("size") != size:
            return False
        try:
            stat = local.stat()
        except FileNotFoundError:
            return False
        return stat.st_size == size and stat.st_mtime_ns == entry.get("mtime_ns")

    def record(self, local: Path, rel: str, size: int, fingerprint: str) -> None:
        entry = {"rel": rel, "size": size, "fingerprint": fingerprint, "mtime_ns": local.stat().st_mtime_ns}
        with self._lock, self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")
        self.entries[rel] = entry


class _Progress:
    """Periodic log lines: files and bytes done, rate, ETA."""

    def __init__(self, files: int, total: int, clock: Callable[[], float], every: float) -> None:
        self.files, self.total, self.clock, self.every = files, total, clock, every
        self.done_files = self.done_bytes = 0
        self.started = self.last = clock()
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done_files += 1
            self.done_bytes += nbytes
            now = self.clock()
            if now - self.last < self.every and self.done_files < self.files:
                return
            self.last = now
            rate = self.done_bytes / max(now - self.started, 1e-9)
            log.info(
                "pull.progress",
                files=f"{self.done_files}/{self.files}",
                bytes=self.done_bytes,
                total=self.total,
                mib_per_s=round(rate / 2**20, 1),
                eta_s=round((self.total - self.done_bytes) / rate, 1) if rate else None,
            )
