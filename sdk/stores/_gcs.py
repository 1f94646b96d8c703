"""Google Cloud Storage (the emulator from ``STORAGE_EMULATOR_HOST``): CRC32C in the upload's metadata.

gcsfs is an fsspec file system, and reads, listings (which carry each object's ``crc32c`` and generation),
metadata and deletes go through its API as for any fsspec store: :class:`GCSBackend` extends
:class:`sdk.stores._fsspec.FsspecBackend` and replaces only the writes (a JSON-API multipart upload whose metadata
carries ``crc32c``, which GCS checks, and ``ifGenerationMatch=0`` for a conditional create) and the bucket check.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from fsspec.asyn import sync

from sdk.stores import _answers, checksum
from sdk.stores._fsspec import FsspecBackend
from sdk.stores.protocol import Backend, ObjectInfo

__all__ = ["GCSBackend", "connect"]


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """A GCS store (``timeout`` bounds connecting and each read) and the root path of ``url`` in it."""
    backend = GCSBackend.create(timeout)
    return backend, backend.root_of(url)


class GCSBackend(FsspecBackend):
    """Google Cloud Storage (emulator from ``STORAGE_EMULATOR_HOST``), through gcsfs's session."""

    @classmethod
    def create(cls, timeout: float) -> GCSBackend:
        # The plain GCSFileSystem: gcsfs >= 2026.3 exports a subclass that probes every bucket for zonal/HNS
        # features over gRPC, which stalls for a minute per call against an emulator; podtrain needs neither.
        import aiohttp
        from gcsfs.core import GCSFileSystem

        # Bound connecting and each read, not the whole request: a plain number would be aiohttp's total
        # timeout, failing any upload or download that takes longer than ``timeout`` however fast it flows.
        per_read = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        options: dict[str, Any] = {"skip_instance_cache": True, "requests_timeout": per_read}
        if os.environ.get("STORAGE_EMULATOR_HOST") and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            options["token"] = "anon"  # noqa: S105 - the emulator takes no credentials
        return cls(GCSFileSystem(**options))

    def put(self, path: str, data: bytes | bytearray, *, crc32c: int | None, exclusive: bool) -> bool:
        try:
            self._post(path, data, checksum.crc32c(data) if crc32c is None else crc32c, exclusive)
        except FileExistsError:
            return False
        return True

    def upload(self, path: str, data: bytes, *, crc32c: int) -> ObjectInfo | None:
        answer = self._post(path, data, crc32c, False)  # the new object's metadata: size, crc32c, generation
        return ObjectInfo(int(answer.get("size") or 0), _answers.fingerprint(answer), _answers.listed_checksums(answer))

    def _post(self, path: str, data: bytes | bytearray, crc: int, exclusive: bool) -> dict[str, Any]:
        bucket, key, _ = self.fs.split_path(path)
        metadata = json.dumps({"name": key, "crc32c": checksum.to_b64(crc)})
        body = (
            b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n"
            + metadata.encode()
            + b"\n--==0==\nContent-Type: application/octet-stream\n\n"
            + data
            + b"\n--==0==--"
        )
        kw = {"ifGenerationMatch": "0"} if exclusive else {}
        try:
            return dict(
                sync(
                    self.fs.loop,
                    self.fs._call,
                    "POST",
                    f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                    uploadType="multipart",
                    headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                    data=body,
                    json_out=True,
                    **kw,
                )
            )
        finally:
            self.invalidate(path)

    def check_root(self, root: str) -> None:
        bucket = root.split("/", 1)[0]
        sync(self.fs.loop, self.fs._call, "GET", "b/{}", bucket, json_out=True)
