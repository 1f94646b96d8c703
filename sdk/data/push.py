"""Push a local folder (the run's outputs) to object storage: parallel, verified, never re-sending what is there.

``push("/output", "s3://bucket/artifacts/run-7")`` uploads every file under the folder to the same relative name
under the URL. Each upload carries its CRC32C, which S3 and GCS check on arrival; afterwards the object's size,
and the store's CRC32C where it keeps one, are compared with the local bytes. ``.podtrain-push.jsonl`` in the
folder records what was sent (name, size, mtime, URL), so pushing again — at a preemption, then at the end —
sends only new or changed files. Temporary files (``*.podtrain-partial``) and the records themselves stay local.

**Links never carry a file in from outside.** A symlink whose target is outside the folder (absolute, ``../``,
through another link), a dangling one and a link to a directory are never followed: they are skipped and named,
with the reason, in :attr:`PushResult.links_skipped`, the ``push.done`` log line and ``podtrain push``'s summary;
skipping is not an error. A link to a regular file inside the folder is sent under its own name, as a copy of
its target (stores have no links). Files are opened from the folder one path component at a time without
following any link, so a link swapped in after the scan is refused, not followed (:mod:`sdk.data._pushtree`).

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
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from sdk.data._progress import Progress
from sdk.data._pushtree import REPLACED, Entry, Replaced, open_beneath, scan
from sdk.data._warmcache import INDEX_NAME
from sdk.errors import TransientStorageError
from sdk.log import get_logger
from sdk.redaction import redact
from sdk.stores.store import RetryPolicy, Store, open_store

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
    """What a push did: files found, sent and already there (``skipped``: unchanged since the last push), bytes
    sent, seconds, where; and ``links_skipped``: the symlinks not followed, name -> why (see the module)."""

    url: str
    files: int
    sent: int
    skipped: int
    bytes_sent: int
    seconds: float
    links_skipped: dict[str, str] = field(default_factory=dict)

    def links_note(self, shown: int = 10) -> str:
        """``"; N links skipped (not uploaded): a, b, ..."`` for a summary line, or "" when none was."""
        names = list(self.links_skipped)
        if not names:
            return ""
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        return f"; {len(names)} link{'s' if len(names) > 1 else ''} skipped (not uploaded, see the log): {listed}"


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
    base, folder, files, links = _found(root)
    for name, why in links.items():
        log.warning("push.link_skipped", name=name, reason=why, target=_target(base / name))
    store = open_store(url, retry=retry)  # after the scan: what is sent is what the scan found, opened below
    where = redact(store.url)  # as the index records it: a password in the URL never lands on disk
    sent_before = _read_index(base / PUSH_INDEX, where)
    todo = [entry for entry in files if sent_before.get(entry.rel) != (entry.size, entry.mtime_ns)]
    bar = Progress("push", len(todo), sum(entry.size for entry in todo), clock=clock, bar=progress)
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with (
            (base / PUSH_INDEX).open("a") as record,
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="podtrain-push") as pool,
        ):
            budget = _Budget(max_bytes)
            sender = _Sender(
                store=store,
                where=where,
                base=base,
                folder_fd=folder_fd,
                budget=budget,
                bar=bar,
                record=record,
                links=links,
            )
            sent_bytes = sum(pool.map(sender.send, todo))
    finally:
        os.close(folder_fd)
        bar.close()
    dropped = sender.dropped
    result = PushResult(
        store.url,
        len(files) - dropped,
        len(todo) - dropped,
        len(files) - len(todo),
        sent_bytes,
        clock() - started,
        dict(sorted(links.items())),
    )
    log.info("push.done", **result.__dict__)
    return result


def _found(root: Path) -> tuple[Path, str, list[Entry], dict[str, str]]:
    """Where the push records go, the real folder files are opened from, the files to send, the links skipped."""
    if root.is_file():  # one file named as the source: that name is followed, as the user gave it
        real = os.path.realpath(root)
        info = os.stat(real)
        entry = Entry(rel=root.name, source=os.path.basename(real), size=info.st_size, mtime_ns=info.st_mtime_ns)
        return root.parent, os.path.dirname(real), [entry], {}
    folder = os.path.realpath(root)  # the folder itself is followed; nothing under it is
    files, links = scan(folder, _pushable)
    return root, folder, files, links


@dataclass(kw_only=True)
class _Sender:
    """Uploads one file (in a pool's thread): opened without following links, sent from that descriptor, checked,
    recorded. A file replaced by a link (or gone) since the scan is not sent: counted in ``dropped``."""

    store: Store
    where: str  # the store's URL as the index records it (redacted)
    base: Path
    folder_fd: int
    budget: _Budget
    bar: Progress
    record: TextIO
    links: dict[str, str]  # the links skipped: a file replaced by one is added
    dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, entry: Entry) -> int:
        store, local = self.store, self.base / entry.rel
        try:
            fd, info = open_beneath(self.folder_fd, entry.source)
        except Replaced:
            log.warning("push.link_skipped", name=entry.rel, reason=REPLACED)
            with self._lock:
                self.dropped += 1
                self.links[entry.rel] = REPLACED
            return 0
        except FileNotFoundError:  # deleted since the scan: nothing to send
            log.warning("push.vanished", name=entry.rel)
            with self._lock:
                self.dropped += 1
            return 0
        try:
            with self.budget.hold(store.upload_memory(info.st_size)):  # the store's answer, or a HEAD
                remote, crc, sent = store.upload_file(entry.rel, local, fd=fd)
        finally:
            os.close(fd)
        native = remote.checksums.get("crc32c")
        if remote.size != sent or (native is not None and native != crc):
            raise TransientStorageError(f"{store.url_of(entry.rel)} does not match {local} after upload", url=store.url)
        line = {"rel": entry.rel, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "url": self.where}
        with self._lock:
            self.record.write(json.dumps(line) + "\n")
            self.record.flush()
        self.bar.add_bytes(sent)
        self.bar.add_file()
        return sent


def _target(link: Path) -> str | None:
    """What a link says it points to (for the log), or None when it is no longer a link."""
    try:
        return os.readlink(link)
    except OSError:
        return None


def _pushable(name: str) -> bool:
    return name not in _LOCAL_ONLY and not name.endswith(".podtrain-partial")


def _read_index(path: Path, url: str) -> dict[str, tuple[int, int]]:
    """What was already sent to ``url`` (redacted, as recorded): name → (size, mtime_ns); the last line for a name
    wins."""
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
