"""S3 and S3-compatible stores: conditional create, CRC32C on every upload, the lean request path.

:class:`S3Backend` makes GET, HEAD, ListObjectsV2, PUT and multipart uploads through :mod:`sdk.stores._s3http` (or,
where that steps aside, botocore's synchronous client, and s3fs's aiobotocore client for multipart uploads), and
everything else through s3fs, made on first use. See ``docs/design.md`` (Storage) for the measurements behind
each choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sdk.errors import PermanentStorageError
from sdk.stores import _s3botocore as botocore_side
from sdk.stores import checksum
from sdk.stores._fsspec import (
    Backend,
    Checksums,
    ObjectInfo,
    PartLayout,
    _fingerprint,
    _listed_checksums,
    _status,
    split_url,
)

__all__ = ["S3_MULTIPART_THRESHOLD", "S3_PART_SIZE", "S3Backend"]

S3_PART_SIZE = 8 * 2**20  # the floor; grown for big files so no upload needs more than S3's 10,000 parts
S3_MULTIPART_THRESHOLD = 32 * 2**20
S3_CONCURRENCY = 10
S3_MAX_PARTS = 10_000


class S3Backend(Backend):
    """S3 and S3-compatible stores (endpoint from ``AWS_ENDPOINT_URL``), through s3fs's aiobotocore client."""

    def __init__(self, aws_env: tuple[tuple[str, str], ...], timeout: float) -> None:
        self._aws_env, self._timeout = aws_env, timeout  # no fsspec filesystem until one is needed

    @classmethod
    def create(cls, timeout: float) -> S3Backend:
        return cls(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))), timeout)

    @functools.cached_property
    def fs(self) -> Any:
        """s3fs, made on first use: listing, reading and describing objects (all a dataset pull does) go
        through the synchronous client below and never import s3fs and aiobotocore (~0.5 s)."""
        import fsspec

        fs = fsspec.filesystem(
            "s3",
            skip_instance_cache=True,
            session=botocore_side.aio_session(self._aws_env),
            config_kwargs=botocore_side.client_config(self._timeout),
        )
        fs.retries = 1  # one retry loop: ours, with logging and an injectable sleep
        return fs

    def unstrip(self, path: str) -> str:
        return f"s3://{path}"

    def root_of(self, url: str) -> str:
        return split_url(url)[1]

    def invalidate(self, path: str) -> None:
        if "fs" in self.__dict__:
            self.fs.invalidate_cache(path)

    def _head(self, bucket: str, key: str, part: int | None = None) -> dict[str, Any]:
        if self._http is not None:
            return dict(self._http.head(bucket, key, part=part))
        extra = {} if part is None else {"PartNumber": part}
        return dict(self._client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **extra))

    def _list(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        if self._http is not None:
            yield from self._http.list(bucket, prefix)
            return
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    @functools.cached_property
    def _http(self) -> Any:
        """The lean client (:mod:`sdk.stores._s3http`) for GET, HEAD, listing and single-part PUT; None where the
        environment asks for something only botocore does (then :attr:`_client`)."""
        from sdk.stores import _s3http as s3http

        return s3http.create(timeout=self._timeout, session=lambda: botocore_side.sync_session(self._aws_env))

    @functools.cached_property
    def _client(self) -> Any:
        """A synchronous botocore client for single requests from worker threads (botocore clients are
        thread-safe): GET, HEAD, listing, single-part PUT. Only multipart uploads, whose parts overlap in one
        event loop, and the rest of fsspec's API go through s3fs.

        A dataset pull is a thousand GETs from sixteen threads: through the async client each one hops into
        fsspec's event loop and back, and costs ~1.7x the CPU of the same GET made by the thread itself
        (measured: 3.3 vs 1.9 CPU-s for 492 MiB in 303 objects).
        """
        from botocore.config import Config

        client = botocore_side.sync_session(self._aws_env).create_client(
            "s3", config=Config(**botocore_side.client_config(self._timeout), max_pool_connections=64)
        )
        client.meta.events.register("before-call.s3.GetObject", botocore_side.skip_response_validation)
        return client

    def _s3(self, method: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def put(self, path: str, data: bytes, *, crc32c: int | None, exclusive: bool) -> bool:
        crc = checksum.crc32c(data) if crc32c is None else crc32c
        try:
            self._put(path, data, crc, {"IfNoneMatch": "*"} if exclusive else {})
        except FileExistsError:
            return False
        except Exception as exc:
            if exclusive and _status(exc) == 412:  # If-None-Match: * and the object exists
                return False
            raise
        return True

    def upload(self, path: str, data: bytes, *, crc32c: int) -> ObjectInfo | None:
        answer = self._put(path, data, crc32c, {})
        # A PutObject answer echoes the CRC32C S3 checked and stored; a multipart completion has only the parts'.
        return None if answer is None else ObjectInfo(len(data), _fingerprint(answer), _s3_checksums(answer))

    def upload_file(self, path: str, local: Path, *, fd: int | None = None) -> tuple[ObjectInfo | None, int, int]:
        """A file over :data:`S3_MULTIPART_THRESHOLD` goes up in parts read from the disk as they are sent, so
        memory holds :data:`S3_CONCURRENCY` parts at most, whatever the file's size; smaller files in one PUT.
        ``fd``: the file already open (see :meth:`Backend.upload_file`), read by offset; left open."""
        size = local.stat().st_size if fd is None else os.fstat(fd).st_size
        if not self._streams(size):
            return super().upload_file(path, local, fd=fd)
        bucket, key = self._split(path)
        handle = os.open(local, os.O_RDONLY) if fd is None else fd
        try:

            def read(start: int, length: int) -> bytes:
                data = os.pread(handle, length, start)
                if len(data) != length:
                    raise PermanentStorageError(f"{local} changed while it was uploaded: {size} bytes expected")
                return data

            crc = self._multipart_http(bucket, key, size, read, if_none_match=False)
        finally:
            if fd is None:
                os.close(handle)
            self.invalidate(path)
        return None, crc, size

    def upload_memory(self, size: int) -> int:
        return min(size, S3_CONCURRENCY * _part_size(size)) if self._streams(size) else size

    def _streams(self, size: int) -> bool:
        """Whether :meth:`upload_file` sends a file of ``size`` in parts read as they go (not read whole)."""
        return size > S3_MULTIPART_THRESHOLD and self._http is not None

    def _put(self, path: str, data: bytes, crc: int, match: dict[str, str]) -> dict[str, Any] | None:
        """PutObject (its answer), or a multipart upload (None) above :data:`S3_MULTIPART_THRESHOLD`."""
        bucket, key = self._split(path)
        try:
            if len(data) > S3_MULTIPART_THRESHOLD and self._http is not None:
                whole = self._multipart_http(
                    bucket, key, len(data), lambda start, n: data[start : start + n], if_none_match=bool(match)
                )
                if whole != crc:  # the caller's CRC32C is of other bytes than those sent: never silently
                    raise PermanentStorageError(f"s3://{path}: CRC32C of the parts sent differs from the caller's")
                return None
            if len(data) > S3_MULTIPART_THRESHOLD:
                from fsspec.asyn import sync

                sync(self.fs.loop, self._multipart, bucket, key, data, crc, match)
                return None
            if self._http is not None:
                return dict(
                    self._http.put(bucket, key, data, crc32c_b64=checksum.to_b64(crc), if_none_match=bool(match))
                )
            return dict(  # one request: made by this thread (see _client)
                self._client.put_object(
                    Bucket=bucket,
                    Key=key,
                    Body=data,
                    ChecksumAlgorithm="CRC32C",
                    ChecksumCRC32C=checksum.to_b64(crc),
                    **match,
                )
            )
        finally:
            self.invalidate(path)

    def _multipart_http(
        self, bucket: str, key: str, size: int, read: Callable[[int, int], bytes], *, if_none_match: bool
    ) -> int:
        """A multipart upload through :mod:`sdk.stores._s3http`: ``read(start, length)`` supplies each part, sent from
        up to :data:`S3_CONCURRENCY` threads with its CRC32C (S3 checks each on arrival; the object gets the
        COMPOSITE checksum, see :meth:`_multipart`). Returns the whole object's CRC32C, combined from the parts'.
        Any failure aborts the upload, so no parts are left for S3 to bill."""
        http = self._http
        part_size = _part_size(size)
        starts = list(range(0, size, part_size))
        upload_id = http.create_multipart(bucket, key)

        def part(number: int, start: int) -> tuple[tuple[int, str, str], int, int]:
            body = read(start, min(part_size, size - start))
            crc = checksum.crc32c(body)
            b64 = checksum.to_b64(crc)
            answer = http.upload_part(bucket, key, upload_id, number, body, crc32c_b64=b64)
            return (number, str(answer.get("ETag", "")), b64), crc, len(body)

        pool = ThreadPoolExecutor(max_workers=min(S3_CONCURRENCY, len(starts)), thread_name_prefix="podtrain-s3-part")
        try:
            futures = [pool.submit(part, i + 1, start) for i, start in enumerate(starts)]
            parts = [f.result() for f in futures]  # the first failure raises; the rest are cancelled below
            http.complete_multipart(bucket, key, upload_id, [p[0] for p in parts], if_none_match=if_none_match)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(Exception):  # the original error is the one to report
                http.abort_multipart(bucket, key, upload_id)
            raise
        finally:
            pool.shutdown(wait=True)
        whole = parts[0][1]
        for _, crc, length in parts[1:]:
            whole = checksum.combine(whole, crc, length)
        return whole

    async def _multipart(self, bucket: str, key: str, data: bytes, crc: int, match: dict[str, str]) -> None:
        """Parallel parts, each sent with its CRC32C so S3 checks every part on arrival.

        The object gets S3's COMPOSITE checksum (a checksum of the part checksums), as boto3 does by default.
        A FULL_OBJECT checksum would let HEAD return the whole file's CRC32C, but S3-compatible servers such
        as moto then build and checksum a second copy of the object at completion (+5-9 s per GiB measured);
        the full CRC32C is checked by podtrain on every read instead.
        """
        call = self.fs._call_s3
        mpu = await call("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C")
        upload_id = mpu["UploadId"]
        limit = asyncio.Semaphore(S3_CONCURRENCY)
        part_size = _part_size(len(data))

        async def part(number: int, start: int) -> dict[str, Any]:
            body = data[start : start + part_size]  # botocore takes bytes, not memoryview
            async with limit:
                out = await call(
                    "upload_part",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumCRC32C=checksum.to_b64(checksum.crc32c(body)),
                )
            return {"PartNumber": number, "ETag": out["ETag"], "ChecksumCRC32C": out.get("ChecksumCRC32C")}

        try:
            parts = await asyncio.gather(
                *(part(i + 1, start) for i, start in enumerate(range(0, len(data), part_size)))
            )
            await call(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{k: v for k, v in p.items() if v is not None} for p in parts]},
                **match,
            )
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                await call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    def describe(self, path: str) -> ObjectInfo:
        bucket, key = self._split(path)
        head = self._head(bucket, key)
        return ObjectInfo(int(head["ContentLength"]), _fingerprint(head), _s3_checksums(head))

    def layout(self, path: str, size: int, *, exact: bool = False) -> PartLayout:
        """The part sizes of a multipart object from ``HEAD ?partNumber=1`` (that part's size and the part count),
        the others assumed the same but the last, as uploaders make them; ``exact``, or when the sizes cannot be
        so, every part asked for (from :data:`S3_CONCURRENCY` threads). This works on AWS and moto alike;
        GetObjectAttributes' ObjectParts would list the sizes in one request, but AWS lists parts only for objects
        with an additional checksum (not those with only an MD5 ETag), it needs the s3:GetObjectAttributes
        permission besides s3:GetObject, and moto 5.2.5 does not list them."""
        bucket, key = self._split(path)
        first = self._head(bucket, key, part=1)
        count, head = int(first.get("PartsCount") or 1), int(first["ContentLength"])
        if count <= 1:
            return PartLayout(sizes=(size,))
        last = size - head * (count - 1)
        if not exact and 0 < last <= head:
            return PartLayout(sizes=(head,) * (count - 1) + (last,), exact=count == 2)
        with ThreadPoolExecutor(
            max_workers=min(S3_CONCURRENCY, count - 1), thread_name_prefix="podtrain-s3-parts"
        ) as pool:
            rest = pool.map(lambda n: int(self._head(bucket, key, part=n)["ContentLength"]), range(2, count + 1))
            return PartLayout(sizes=(head, *rest))

    def objects(self, path: str) -> dict[str, ObjectInfo]:
        bucket, key = self._split(path)
        prefix = key + "/" if key else ""
        out = {}
        for item in self._list(bucket, prefix):
            rel = item["Key"][len(prefix) :]
            if rel and not rel.endswith("/"):  # "folder/" markers are not files
                out[rel] = ObjectInfo(int(item["Size"]), _fingerprint(item), _listed_checksums(item))
        if not out and key:  # the URL may name one object
            try:
                head = self._head(bucket, key)
            except Exception as exc:
                if _status(exc) == 404:
                    return {}
                raise
            out[""] = ObjectInfo(int(head["ContentLength"]), _fingerprint(head), {})
        return out

    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        # One GET, whose answer carries the object's checksums when it is the whole object: no HEAD needed.
        bucket, key = self._split(path)
        if self._http is not None:
            data, answer = self._http.get(bucket, key, start, end)
            return data, (_s3_checksums(answer) if start is None else {})
        extra = {"ChecksumMode": "ENABLED"} if start is None else {"Range": f"bytes={start}-{(end or 0) - 1}"}
        response = self._client.get_object(Bucket=bucket, Key=key, **extra)
        body = response["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        return data, (_s3_checksums(response) if start is None else {})

    def check_root(self, root: str) -> None:
        bucket = root.split("/", 1)[0]
        self._s3("head_bucket", Bucket=bucket)

    def get(self, path: str) -> bytes:
        # One GET on the same path as every other read (not s3fs's cat_file, which HEADs first and splits objects
        # over 50 MiB into concurrent ranges: servers that read the whole object per range, as moto does, then
        # read 1 GiB twenty times).
        return self.read(path)[0]


def _part_size(size: int) -> int:
    """:data:`S3_PART_SIZE`, grown for big objects so that none needs more than S3's 10,000 parts."""
    return max(S3_PART_SIZE, -(-size // S3_MAX_PARTS))


def _s3_checksums(response: dict[str, Any]) -> Checksums:
    """The checksums in an S3 HEAD or GET answer.

    A CRC is the whole object's unless the object is a multipart upload whose checksum is not FULL_OBJECT: then
    it is the COMPOSITE one (a CRC of the parts' CRCs; some servers, moto among them, omit its ``-N`` suffix),
    kept as ``crc32c_parts``/``crc32_parts``. A single-part ETag is the MD5 of the bytes (``md5``), a multipart
    one the MD5 of the parts' MD5s (``md5_parts``, ``<hex>-N``), unless the object is encrypted with KMS or a
    customer key, where neither is. ``parts``: the part count the answer gives.
    """
    sums: Checksums = {}
    etag = str(response.get("ETag", "")).strip('"')
    multipart = re.fullmatch(r"[0-9a-f]{32}-([0-9]+)", etag)
    for name, key in (("crc32c", "ChecksumCRC32C"), ("crc32", "ChecksumCRC32")):
        value, _, count = str(response.get(key) or "").partition("-")
        if not value:
            continue
        if count or (multipart and response.get("ChecksumType") != "FULL_OBJECT"):
            sums[f"{name}_parts"] = checksum.from_b64(value)
            if count.isdigit():
                sums["parts"] = int(count)
        else:
            sums[name] = checksum.from_b64(value)
    if multipart:
        sums["parts"] = int(multipart.group(1))
    kms = str(response.get("ServerSideEncryption", "")).startswith("aws:kms")
    encrypted = kms or bool(response.get("SSECustomerAlgorithm"))
    if re.fullmatch(r"[0-9a-f]{32}", etag) and not encrypted:
        sums["md5"] = etag
    elif multipart and not encrypted:
        sums["md5_parts"] = etag
    return sums
