"""The warm cache of a pulled folder: ``.podtrain-pull.jsonl``, what was fetched, and proof it is on disk.

One JSON line per landed file: its name, size, the object's fingerprint (ETag, GCS generation, or mtime and
size) and the local file's mtime. A file whose line matches both the store's listing and the disk is current
(:meth:`WarmCache.current`) and is not fetched again. Lines are written only once their files are on disk:
landed files are made durable together — one ``syncfs`` of the volume every :data:`DURABLE_BYTES` or
:data:`DURABLE_SECONDS`, an ``fsync`` per file where libc has no ``syncfs`` — and then their lines go out. A
crash in between leaves files in place without a line, which the next pull checks against the store's checksum
(adoption) or fetches again, and never trusts.

A pull that is stopped (Ctrl-C, SIGTERM) with part of a large object landed notes, in the same way, a line with
that object's kept pieces (:meth:`WarmCache.keep_pieces`): its ``<name>.podtrain-partial`` is made durable with
the batch, then the line names the piece size and each landed piece's CRC. The next pull of the same object,
unchanged in the store, fetches only the other pieces (:class:`sdk.data._transfer.Transfer` reads the kept ones back
and keeps each whose CRC still matches). A pull killed outright writes no such line and starts the object over.

The index is opened with ``O_NOFOLLOW`` (a link planted at its name is an error, never read or appended
through), a line after a torn last one starts on a line of its own, and a record's mtime comes from the
descriptor the file was checked through (:meth:`~sdk.data._landing.LandingFile.finish`).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from sdk.data._localpath import INDEX_NAME

__all__ = ["BY_PARTS", "DURABLE_BYTES", "DURABLE_SECONDS", "INDEX_NAME", "WarmCache"]

DURABLE_BYTES = 256 * 2**20  # landed files are synced to disk, and their lines written, after this many bytes
DURABLE_SECONDS = 2.0  # … or this long
BY_PARTS = "parts"  # kept pieces of an object checked by its parts: no CRC of their own, read back and checked whole


class WarmCache:
    """The records: one JSON line per fetched file; the last line for a name wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._out: TextIO | None = None  # opened at the first record, kept open: one open for a thousand lines
        self._pending: list[tuple[Path, dict[str, object]]] = []  # landed, not yet known to be on disk
        self._pending_bytes = 0
        self._committed_at = time.monotonic()
        self.entries: dict[str, dict[str, object]] = {}
        text = _read(path)
        self._torn = bool(text) and not text.endswith("\n")  # the next line must not be glued onto a torn one
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                self.entries[str(entry["rel"])] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from an interrupted pull (or a full disk)

    def current(self, rel: str, local: str | os.PathLike[str], size: int, fingerprint: str) -> bool:
        """Whether ``local`` holds exactly the listed object ``rel`` already (a ``str`` path is cheapest: a warm
        pull asks this of every file)."""
        entry = self.entries.get(rel)
        if entry is None or entry.get("fingerprint") != fingerprint or entry.get("size") != size:
            return False
        try:
            stat = os.stat(local)
        except OSError:  # missing, or a path that no longer leads to a file
            return False
        return stat.st_size == size and stat.st_mtime_ns == entry.get("mtime_ns")

    def record(self, local: Path, rel: str, size: int, fingerprint: str, *, mtime_ns: int | None = None) -> None:
        """Note a landed file (``mtime_ns``: its modification time, from the descriptor it was checked through;
        else read from ``local``); its line is written once its bytes are on disk (:meth:`commit`)."""
        if mtime_ns is None:
            mtime_ns = local.stat().st_mtime_ns
        entry = {"rel": rel, "size": size, "fingerprint": fingerprint, "mtime_ns": mtime_ns}
        with self._lock:
            self._pending.append((local, entry))
            self._pending_bytes += size
            due = self._pending_bytes >= DURABLE_BYTES or time.monotonic() - self._committed_at >= DURABLE_SECONDS
        if due:
            self.commit()

    def keep_pieces(
        self,
        partial: Path,
        rel: str,
        size: int,
        fingerprint: str,
        *,
        piece_size: int,
        crcs: dict[int, int | None],
        digest: str,
    ) -> None:
        """Note the pieces of ``rel`` (the listed ``size`` and ``fingerprint``) that landed in ``partial`` before the
        pull stopped: piece start -> its ``digest`` (``crc32c`` or ``crc32``) value, or None (``digest``
        :data:`BY_PARTS`: the object is checked by its parts, from the bytes read back). Written with the next
        :meth:`commit`, once ``partial`` is on disk; :meth:`kept_pieces` reads it back."""
        kept = {"piece_size": piece_size, "digest": digest, "crcs": {str(at): crc for at, crc in sorted(crcs.items())}}
        entry = {"rel": rel, "size": size, "fingerprint": fingerprint, "partial": kept}
        with self._lock:
            self._pending.append((partial, entry))

    def kept_pieces(self, rel: str, size: int, fingerprint: str, piece_size: int) -> tuple[str, dict[int, int | None]]:
        """``(digest, {piece start: value})`` of the pieces an earlier, stopped pull kept of ``rel`` as it is listed
        now (same size, fingerprint and piece size); ``("", {})`` when there are none."""
        entry = self.entries.get(rel) or {}
        kept = entry.get("partial")
        if not isinstance(kept, dict) or entry.get("size") != size or entry.get("fingerprint") != fingerprint:
            return "", {}
        try:
            if kept["piece_size"] != piece_size or kept["digest"] not in ("crc32c", "crc32", BY_PARTS):
                return "", {}
            crcs = dict(kept["crcs"]).items()
            return str(kept["digest"]), {int(at): None if crc is None else int(crc) for at, crc in crcs}
        except (KeyError, TypeError, ValueError):
            return "", {}

    def commit(self) -> None:
        """Make the noted files durable (one ``syncfs`` of the volume, not one ``fsync`` per file), then write
        their lines. A crash in between leaves files in place without a line: the next pull checks them against
        the store's checksum (adoption) or fetches them again, never trusts them."""
        with self._lock:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self._committed_at = time.monotonic()
        if not pending:
            return
        _sync(self.path.parent, [local for local, _ in pending])
        with self._lock:
            if self._out is None:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                self._out = os.fdopen(os.open(self.path, flags, 0o644), "a")
                if self._torn:
                    self._out.write("\n")
                    self._torn = False
            for _, entry in pending:
                self._out.write(json.dumps(entry) + "\n")
                self.entries[str(entry["rel"])] = entry
            self._out.flush()

    def close(self) -> None:
        try:
            self.commit()
        finally:
            with self._lock:
                out, self._out = self._out, None
            if out is not None:
                out.close()


def _read(path: Path) -> str:
    """The index's text ("" when there is none), never read through a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    with os.fdopen(fd, "rb") as index:
        return index.read().decode("utf-8", "replace")


def _sync(folder: Path, files: list[Path]) -> None:
    """Flush ``files`` (and their renames) to disk: ``syncfs`` on the folder's volume where libc has it (Linux),
    else an ``fsync`` per file and one of the folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _SYNCFS is not None and _SYNCFS(fd) == 0:
            return
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                file_fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(file_fd)
                finally:
                    os.close(file_fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc_syncfs()
