"""A local directory (``file://`` or a plain path) as a store: atomic renames and hard links instead of conditional
requests.

Reads, ranged reads, listings and fingerprints (modification time and size) are fsspec's local file system's,
as for any fsspec store, so :class:`LocalBackend` extends :class:`sdk.stores._fsspec.FsspecBackend` and replaces
only what a disk does better or must do differently: writes (temporary file, fsync, then ``os.link`` — exclusive,
failing if the name exists — or ``os.replace``: a reader never sees a partial file), and listing and deleting,
which never follow a symbolic link below the root (:mod:`sdk.stores._locallinks`).
"""

from __future__ import annotations

import builtins
import os
import uuid
from pathlib import Path
from typing import Any

from sdk.stores import _locallinks
from sdk.stores._fsspec import FsspecBackend
from sdk.stores.protocol import Backend

__all__ = ["LocalBackend", "connect"]


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """The store for ``url``'s directory (``timeout`` does not apply to a local disk)."""
    import fsspec  # here, not at the top: S3 transfers never need it (~35-60 ms of every command's start)

    from sdk.stores.registry import split_url

    root = split_url(url)[1]
    return LocalBackend(fsspec.filesystem("file"), root=root), root


class LocalBackend(FsspecBackend):
    """A local directory. Symbolic links below ``root`` are not the store's: never listed, never deleted through."""

    def __init__(self, fs: Any, *, root: str) -> None:
        super().__init__(fs)
        self.root = root

    def put(self, path: str, data: bytes | bytearray, *, crc32c: int | None, exclusive: bool) -> bool:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if exclusive:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return True

    def list(self, path: str) -> builtins.list[str]:
        return _locallinks.names(path)

    def delete(self, path: str, *, recursive: bool) -> None:
        _locallinks.remove(self.root, path, recursive=recursive)
        self.invalidate(path)

    def check_root(self, root: str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"{root} is not writable")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
