"""A checkpoint's files checked against its manifest: by the store's metadata, or byte by byte.

A stored object that is intact can still arrive damaged (a proxy, a flaky NIC): a file whose bytes do not match
is read again, up to :data:`READS` times, before the checkpoint counts as corrupt — reading it again costs one
transfer, falling back to an older checkpoint costs training steps. Bytes that match are then checked for
structure (:mod:`sdk.checkpoints._statefile`): intact bytes can still be damaged or crafted.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from sdk.checkpoints import _statefile as statefile
from sdk.checkpoints.manifest import FileEntry, step_dir
from sdk.errors import InvalidCheckpointError, StorageNotFoundError
from sdk.log import get_logger
from sdk.stores import checksum
from sdk.stores.store import Store

__all__ = ["READS", "check_files", "check_metadata", "read_verified"]

log = get_logger("podtrain.checkpoint")
READS = 3  # reads of a file whose bytes do not match the manifest before the checkpoint counts as corrupt


def check_files(
    store: Store,
    step: int,
    url: str,
    files: Mapping[str, FileEntry],
    *,
    download: bool,
    metadata: bool = True,
    max_workers: int = 8,
) -> dict[str, bytes]:
    """Check every file of ``files`` (name → manifest entry) of the checkpoint of ``step`` at ``url``.

    ``metadata``: its size, and the store's own CRC32C where the store keeps one (S3, GCS) — no data read.
    ``download``: read it and check the bytes' size and CRC32C; returns the bytes (else empty bytes).
    """
    folder = step_dir(step)

    def check(name: str, entry: FileEntry) -> tuple[str, bytes]:
        rel = f"{folder}/{name}"
        try:
            if metadata:
                check_metadata(store, url, name, rel, entry)
            return name, read_verified(store, url, name, rel, entry) if download else b""
        except StorageNotFoundError:
            raise InvalidCheckpointError(url, f"{name} is listed in the manifest but missing") from None

    if not files:
        return {}
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="podtrain-download") as pool:
        return dict(pool.map(lambda item: check(*item), files.items()))


def check_metadata(store: Store, url: str, name: str, rel: str, entry: FileEntry) -> int | None:
    """Check the file's size, and the store's own CRC32C where it keeps one (returned; None where it keeps none),
    against the manifest's entry without reading data. A missing file raises :class:`StorageNotFoundError`."""
    size = store.size(rel)
    if size != entry.size:
        raise InvalidCheckpointError(url, f"{name} is {size} bytes, manifest says {entry.size}")
    native = store.native_crc32c(rel)
    if native is not None and checksum.to_hex(native) != entry.crc32c:
        raise InvalidCheckpointError(
            url, f"{name}: the store's CRC32C {checksum.to_hex(native)} != manifest {entry.crc32c}"
        )
    return native


def read_verified(store: Store, url: str, name: str, rel: str, entry: FileEntry) -> bytes:
    """The file's bytes, checked against the manifest; a mismatch is read again before it counts."""
    problem = ""
    for read in range(1, READS + 1):
        data = store.get(rel)
        if len(data) != entry.size:
            problem = f"{name} is {len(data)} bytes, manifest says {entry.size}"
        elif (actual := checksum.to_hex(checksum.crc32c(data))) != entry.crc32c:
            problem = f"{name} has CRC32C {actual}, manifest says {entry.crc32c} (corrupt)"
        else:
            statefile.check(name, data, location=url)
            return data
        if read < READS:
            log.warning("checkpoint.reread", url=url, file=name, read=read, reason=problem)
    raise InvalidCheckpointError(url, problem)
