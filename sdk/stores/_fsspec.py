"""Any fsspec file system as a :class:`sdk.stores.protocol.Backend`: the fallback for schemes podtrain has no module
of its own for (``memory://``, ``hf://``…), and the base of the local-disk and GCS stores, which are fsspec file
systems too and differ only in how they write (:mod:`sdk.stores._local`, :mod:`sdk.stores._gcs`).

fsspec has no conditional create: here an exclusive write checks for the object first — not atomic.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

from sdk.stores import _answers, checksum
from sdk.stores.protocol import Backend, Checksums, ObjectInfo, PartLayout

__all__ = ["FsspecBackend", "connect"]


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """The fsspec file system of ``url``'s scheme, made from the scheme alone (the registry refuses schemes that
    need more), and the root path in it. ``timeout`` is not applied: fsspec has no common setting for it."""
    import fsspec  # here, not at the top: S3 transfers never need it (~35-60 ms of every command's start)

    backend = FsspecBackend(fsspec.filesystem(url.partition("://")[0].lower()))
    return backend, backend.root_of(url)


class FsspecBackend:
    """Any fsspec filesystem. Methods take backend paths (no scheme)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def url(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def root_of(self, url: str) -> str:
        """The backend path of ``url``."""
        return str(self.fs._strip_protocol(url)).rstrip("/")

    def put(self, path: str, data: bytes | bytearray, *, crc32c: int | None, exclusive: bool) -> bool:
        if exclusive and self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def upload(self, path: str, data: bytes, *, crc32c: int) -> ObjectInfo | None:
        """Write ``data`` (not conditionally): what the store's answer says it stored, None when it says nothing
        (then :class:`~sdk.stores.store.Store` asks with :meth:`describe`). GCS answers with the new object."""
        self.put(path, data, crc32c=crc32c, exclusive=False)
        return None

    def upload_file(self, path: str, local: Path, *, fd: int | None = None) -> tuple[ObjectInfo | None, int, int]:
        """Here: read whole, then :meth:`upload` (fsspec has no streamed upload with a checksum)."""
        data = local.read_bytes() if fd is None else _answers.read_fd(fd)
        crc = checksum.crc32c(data)
        return self.upload(path, data, crc32c=crc), crc, len(data)

    def upload_memory(self, size: int) -> int:
        return size  # the whole file: see upload_file

    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        if start is None:
            return bytes(self.fs.cat_file(path)), {}
        return bytes(self.fs.cat_file(path, start=start, end=end)), {}

    def describe(self, path: str) -> ObjectInfo:
        self.invalidate(path)
        info = self.fs.info(path)
        return ObjectInfo(int(info.get("size") or 0), _answers.fingerprint(info), _answers.listed_checksums(info))

    def layout(self, path: str, size: int, *, exact: bool = False) -> PartLayout:
        return PartLayout(sizes=(size,))  # no fsspec store podtrain knows keeps checksums of parts

    def list(self, path: str) -> builtins.list[str]:
        self.invalidate(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        prefix = path.rstrip("/") + "/"
        return sorted({str(e)[len(prefix) :].split("/", 1)[0] for e in entries if str(e).startswith(prefix)} - {""})

    def objects(self, path: str) -> dict[str, ObjectInfo]:
        """The fingerprint changes whenever the content does: the generation (GCS), else the modification time and
        size. Checksums come with the listing where the store lists them (GCS)."""
        self.invalidate(path)
        found = self.fs.find(path, detail=True)
        prefix = path.rstrip("/") + "/"
        out = {}
        for found_path, info in found.items():
            full = str(found_path)
            rel = full[len(prefix) :] if full.startswith(prefix) else ""
            if info.get("type", "file") != "file":
                continue
            out[rel] = ObjectInfo(
                int(info.get("size") or 0), _answers.fingerprint(info), _answers.listed_checksums(info)
            )
        return out

    def delete(self, path: str, *, recursive: bool) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            return
        self.invalidate(path)

    def check_root(self, root: str) -> None:
        self.fs.ls(root.split("/", 1)[0] if "/" in root else root)

    def invalidate(self, path: str) -> None:
        """Forget fsspec's cached listing of ``path``: another process (another rank, a newer attempt) may have
        written since, and every answer podtrain acts on must be the store's, not the cache's."""
        self.fs.invalidate_cache(path)
