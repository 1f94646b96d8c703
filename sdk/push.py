"""Push a local folder (the run's outputs) to object storage: parallel, verified, never re-sending what is there.

``push("/output", "s3://bucket/artifacts/run-7")`` uploads every file under the folder to the same relative name
under the URL. Each upload carries its CRC32C, which S3 and GCS check on arrival; afterwards the object's size,
and the store's CRC32C where it keeps one, are compared with the local bytes. ``.podtrain-push.jsonl`` in the
folder records what was sent (name, size, mtime, URL), so pushing again — at a preemption, then at the end —
sends only new or changed files. Temporary files (``*.podtrain-partial``) and the records themselves stay local.

Several files go at once (``workers``), with at most ``max_bytes`` (1 GiB) of them in memory: a file is read
whole, except on S3, where one over 32 MiB is sent in parts read from the disk as they go (10 parts in memory at
most, whatever its size). A file larger than the whole budget goes alone. After each upload the object's size
and the store's CRC32C are compared with the local file's, from the store's answer (S3 PutObject echoes the
CRC32C it checked; GCS returns the new object's metadata) or, where the answer does not say (a multipart upload,
other stores), from one metadata request. Transient errors are retried by the store; a request that moves no
byte for ``stall_seconds`` is cut and retried; a permanent error fails the push with the store's message.
Progress: a bar on a terminal, ``push.progress`` log lines otherwise.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from sdk.errors import TransientStorageError
from sdk.log import get_logger
from sdk.progress import Progress
from sdk.storage import RetryPolicy, open_store
from sdk.warmcache import INDEX_NAME

__all__ = ["PUSH_INDEX", "PushResult", "default_url", "push"]

log = get_logger("podtrain.push")
PUSH_INDEX = ".podtrain-push.jsonl"
_LOCAL_ONLY = (PUSH_INDEX, INDEX_NAME)
MAX_BYTES = 1 << 30  # file bytes held in memory at once by the uploads in flight (one bigger file still goes)


class _Budget:
    """Bounds the bytes of the files being uploaded at once; a file over the whole budget goes alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


@dataclass(frozen=True)
class PushResult:
    """What a push did: files found, sent and already there, bytes sent, seconds, and where."""

    url: str
    files: int
    sent: int
    skipped: int
    bytes_sent: int
    seconds: float


def push(
    source: str | Path,
    url: str,
    *,
    workers: int = 16,
    max_bytes: int = MAX_BYTES,
    stall_seconds: float | None = None,
    retry: RetryPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
    progress: bool | None = None,
) -> PushResult:
    """Upload every file under ``source`` (a folder, or one file) to ``url``; see the module. ``progress``: a
    terminal bar (default: when stderr is a terminal), log lines every few seconds otherwise."""
    started = clock()
    if stall_seconds is not None:  # a request that moves no byte for this long is cut and retried
        retry = replace(retry or RetryPolicy(), timeout=stall_seconds)
    root = Path(source)
    if not root.exists():
        return PushResult(url, 0, 0, 0, 0, clock() - started)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and _pushable(p))
    base = root.parent if root.is_file() else root
    store = open_store(url, retry=retry)
    sent_before = _read_index(base / PUSH_INDEX, store.url)
    todo = []
    for path in files:
        rel = path.relative_to(base).as_posix()
        stat = path.stat()
        if sent_before.get(rel) != (stat.st_size, stat.st_mtime_ns):
            todo.append((path, rel, stat.st_size, stat.st_mtime_ns))
    lock = threading.Lock()
    bar = Progress("push", len(todo), sum(size for _, _, size, _ in todo), clock=clock, bar=progress)

    budget = _Budget(max_bytes)

    def send(item: tuple[Path, str, int, int]) -> int:
        path, rel, size, mtime_ns = item
        with budget.hold(store.upload_memory(size)):
            remote, crc, sent = store.upload_file(rel, path)  # what the store holds, from its answer or a HEAD
        native = remote.checksums.get("crc32c")
        if remote.size != sent or (native is not None and native != crc):
            raise TransientStorageError(f"{store.url_of(rel)} does not match {path} after upload", url=store.url)
        with lock:
            record.write(json.dumps({"rel": rel, "size": size, "mtime_ns": mtime_ns, "url": store.url}) + "\n")
            record.flush()
        bar.add_bytes(sent)
        bar.add_file()
        return sent

    try:
        with (
            (base / PUSH_INDEX).open("a") as record,
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="podtrain-push") as pool,
        ):
            sent_bytes = sum(pool.map(send, todo))
    finally:
        bar.close()
    result = PushResult(store.url, len(files), len(todo), len(files) - len(todo), sent_bytes, clock() - started)
    log.info("push.done", **result.__dict__)
    return result


def _pushable(path: Path) -> bool:
    return path.name not in _LOCAL_ONLY and not path.name.endswith(".podtrain-partial")


def _read_index(path: Path, url: str) -> dict[str, tuple[int, int]]:
    """What was already sent to ``url``: name → (size, mtime_ns); the last line for a name wins."""
    sent: dict[str, tuple[int, int]] = {}
    if not path.exists():
        return sent
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            if entry["url"] == url:
                sent[str(entry["rel"])] = (int(entry["size"]), int(entry["mtime_ns"]))
        except (ValueError, KeyError, TypeError):
            continue
    return sent


def default_url(artifact_uri: str, run_id: str) -> str:
    """``PODTRAIN_ARTIFACT_URI/<run_id>``: where a run's outputs go."""
    return f"{artifact_uri.rstrip('/')}/{run_id}"
