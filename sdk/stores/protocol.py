"""What a store must do for podtrain: the :class:`Backend` protocol, and the answers it gives.

:class:`~sdk.stores.store.Store` (the retry loop, the checksums, the one classifier of errors) is the only caller
of a backend, and it needs exactly the methods below — each says which of podtrain's callers needs it and why.
Everything else a store could offer (``exists``, ``size``, the store's own CRC32C, a recursive walk, reading a
whole object) is built by :class:`~sdk.stores.store.Store` from these, so a new store implements eleven methods
and nothing more. Its module is found by URL scheme in :mod:`sdk.stores.registry` (one line there) and gives a
``connect(url, *, timeout) -> (backend, root path)``; ``tests/integration/test_storage_contract.py`` holds the
suite every store passes (one ``StoreContract`` subclass).

Paths given to a backend are its own paths, without the scheme (``bucket/key`` for S3, an absolute path for a
local disk); :class:`~sdk.stores.store.Store` joins them from its root and a relative name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["Backend", "Checksums", "ObjectInfo", "PartLayout"]

# "crc32c" / "crc32": int; "md5" / "etag_md5": lowercase hex. Of a multipart upload (sdk.stores.integrity.PartCheck):
# "crc32c_parts" / "crc32_parts": the COMPOSITE CRC (int), "md5_parts": the ETag "<hex>-N", "parts": N.
Checksums = dict[str, int | str]


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its size, a fingerprint that changes with its content, and listed checksums."""

    size: int
    fingerprint: str
    checksums: Checksums = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PartLayout:
    """The parts an object was uploaded in, by size; ``exact`` False when only the first part was asked for and
    the others assumed the same size but the last (what every common uploader does: checked, not trusted)."""

    sizes: tuple[int, ...]
    exact: bool = True


@runtime_checkable
class Backend(Protocol):
    """One object store, as :class:`~sdk.stores.store.Store` uses it. Methods raise the store's own exceptions
    (``FileNotFoundError``, botocore's, ``S3Error``…): :func:`sdk.stores._fault.classify` sorts them, and the
    store's retry loop retries what is transient — a backend retries nothing itself where it can help it."""

    def url(self, path: str) -> str:
        """The full URL of ``path`` (scheme included): every message and error names the object it is about, and
        a run record or the checkpoint list gives users URLs they can paste."""
        ...

    def put(self, path: str, data: bytes | bytearray, *, crc32c: int | None, exclusive: bool) -> bool:
        """Write ``data``, checked by the store against ``crc32c`` on arrival where it can. ``exclusive``: a
        conditional create, False (nothing written) when the object exists — a checkpoint commits by creating its
        manifest so, and a stale attempt's claim or commit loses rather than overwrites (see docs/design.md,
        Checkpoints). Non-exclusive puts carry the state files, marks and the run record."""
        ...

    def upload_file(self, path: str, local: Path, *, fd: int | None = None) -> tuple[ObjectInfo | None, int, int]:
        """Upload the file ``local`` (``fd``: already open, read by offset; ``local`` then only names it), in parts
        where the store allows, so a push of a 100 GiB file never holds it in memory. Returns what the store's
        answer says it holds (None: :class:`~sdk.stores.store.Store` asks :meth:`describe`), and the CRC32C and size
        of the bytes sent — the push records those as what it uploaded."""
        ...

    def upload_memory(self, size: int) -> int:
        """The bytes :meth:`upload_file` holds in memory at once for a file of ``size``: the push's memory budget
        admits files by it, so many small files go in parallel and a huge one is not refused."""
        ...

    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        """Bytes ``[start, end)`` (the whole object when ``start`` is None) and, for a whole-object read, the
        checksums the answer carried (S3 sends them with a GET, saving a HEAD per file). A pull reads big objects
        in ranges from many threads; a checkpoint load reads state files whole."""
        ...

    def describe(self, path: str) -> ObjectInfo:
        """One metadata request: size, fingerprint and the store's own checksums. A pull checks a file against it
        when the listing carried no checksum; ``verify`` compares the size and the store's CRC32C with the
        manifest without reading data; :class:`~sdk.stores.store.Store` answers ``exists`` and ``size`` with it."""
        ...

    def layout(self, path: str, size: int, *, exact: bool = False) -> PartLayout:
        """The part sizes ``path`` (``size`` bytes) was uploaded in: a multipart object's checksums are of its parts
        (S3's COMPOSITE CRC, the multipart ETag), so a pull can check it only by cutting the file as it was cut
        (:class:`sdk.stores.integrity.PartCheck`). One part where the store has no such thing. ``exact``: every
        part asked for rather than the sizes assumed from the first."""
        ...

    def objects(self, path: str) -> dict[str, ObjectInfo]:
        """Every object under ``path`` by name relative to it (``""`` when ``path`` is one object), with size,
        fingerprint and the checksums the listing carries: a pull plans its transfers and skips files already on
        disk from one listing, not a request per file. Empty when nothing is there."""
        ...

    def list(self, path: str) -> list[str]:
        """The sorted names of ``path``'s direct children (objects and sub-folders), empty when nothing is there:
        the checkpoint list finds step folders, the fence its claims and the run record its attempts one level
        down, without listing every state file below them."""
        ...

    def delete(self, path: str, *, recursive: bool) -> None:
        """Remove the object ``path`` (and with ``recursive`` everything under ``path/``); nothing there is fine.
        Retention removes old step folders; a failed save removes its partial files; preflight its probe."""
        ...

    def check_root(self, root: str) -> None:
        """Fail when ``root``'s bucket is missing or not ours (a local folder: made, and writable): preflight and
        ``Checkpointer`` call it before a run's first write, so a typo fails in a second, not after an epoch."""
        ...
