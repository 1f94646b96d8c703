"""botocore's side of S3: the library path, for where :mod:`sdk.stores._s3http` steps aside (proxies, FIPS or
dual-stack endpoints, a config file's S3 or endpoint settings, no region) and for the credentials only botocore
resolves (IRSA, SSO, instance profiles…).

:class:`BotocoreS3` has the lean client's methods, answers and errors' statuses, over botocore's synchronous
client, so :mod:`sdk.stores._s3` has one code path per operation — one multipart upload, one listing, one delete —
whichever client makes the requests; the S3 contract suite runs on both. The synchronous client, not s3fs's
aiobotocore one: botocore clients are thread-safe, and a thread that makes its own request costs ~0.6x the CPU of
one that hops into an event loop and back (measured: 1.9 vs 3.3 CPU-s for 492 MiB in 303 objects).

Everything here is made on first use: a pull or push with keys in the environment never imports botocore.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["BotocoreS3", "client_config", "parse_timestamp", "skip_response_validation", "sync_session"]

_DELETE_BATCH = 1000  # DeleteObjects' limit


def client_config(timeout: float) -> dict[str, Any]:
    """botocore settings: one try (the store's retry loop is the only one), the stall limit, no second checksum."""
    return {
        # total_max_attempts counts the first try; botocore's max_attempts counts retries only.
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "connect_timeout": timeout,
        "read_timeout": timeout,
        # Over plain http botocore would SHA256 every body to sign it (~0.75 CPU-s per GiB); each body
        # already carries its CRC32C, which the store checks, so the signature covers headers only.
        "s3": {"payload_signing_enabled": False},
        # podtrain sends its own CRC32C with every upload and checks every download against the store's
        # checksum itself; botocore's own pass over each body (CRC32 in Python wrappers) would be a second one.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }


@functools.lru_cache(maxsize=4)
def sync_session(aws_env: tuple[tuple[str, str], ...]) -> Any:
    """One botocore session per AWS_* environment: a session caches the parsed S3 service model, so each new
    store's client costs ~0.1 s instead of ~0.4 s. A changed environment gets a fresh session."""
    import botocore.session

    session = botocore.session.get_session()
    # botocore parses every timestamp (each listed object's LastModified, each answer's Last-Modified header) with
    # dateutil: ~8 % of a dataset pull's CPU. The standard library parses both formats S3 sends, ~20x faster.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    return session


def parse_timestamp(value: str) -> Any:
    """S3's ISO 8601 (listings) and RFC 1123 (headers) times, tz-aware; anything else through botocore's parser."""
    import datetime
    import email.utils

    from botocore.utils import parse_timestamp as botocore_parse

    try:
        if value[:4].isdigit():
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError):
        return botocore_parse(value)


def skip_response_validation(context: dict[str, Any], **kwargs: Any) -> None:
    """botocore checks a body against its checksum header whenever ``ChecksumMode`` is set, which podtrain
    sets to receive that header; podtrain then checks the body itself (CRC32C in hardware, pieces combined),
    so botocore's pass (a wrapper hashing every chunk in Python) would be a second one over every byte."""
    context.get("checksum", {}).pop("response_algorithms", None)


class BotocoreS3:
    """:class:`sdk.stores._s3http.S3HTTP`'s methods over botocore's synchronous client (thread-safe). Answers are
    botocore's dicts, which name their fields as the lean client's do; errors are botocore's ``ClientError``, which
    :func:`sdk.stores._fault.classify` sorts as it sorts :class:`~sdk.stores._s3http.S3Error`."""

    def __init__(self, aws_env: tuple[tuple[str, str], ...], *, timeout: float) -> None:
        from botocore.config import Config

        self.client = sync_session(aws_env).create_client(
            "s3", config=Config(**client_config(timeout), max_pool_connections=64)
        )
        self.client.meta.events.register("before-call.s3.GetObject", skip_response_validation)

    def get(
        self, bucket: str, key: str, start: int | None = None, end: int | None = None
    ) -> tuple[bytes, dict[str, Any]]:
        extra = {"ChecksumMode": "ENABLED"} if start is None else {"Range": f"bytes={start}-{(end or 0) - 1}"}
        response = self.client.get_object(Bucket=bucket, Key=key, **extra)
        body = response.pop("Body")
        try:
            return body.read(), response
        finally:
            body.close()

    def head(self, bucket: str, key: str, *, part: int | None = None) -> dict[str, Any]:
        extra = {} if part is None else {"PartNumber": part}
        return dict(self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **extra))

    def put(
        self, bucket: str, key: str, body: bytes | bytearray, *, crc32c_b64: str, if_none_match: bool = False
    ) -> dict[str, Any]:
        match = {"IfNoneMatch": "*"} if if_none_match else {}
        return dict(
            self.client.put_object(
                Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc32c_b64, **match
            )
        )

    def create_multipart(self, bucket: str, key: str) -> str:
        return str(self.client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C")["UploadId"])

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: bytes | memoryview, *, crc32c_b64: str
    ) -> dict[str, Any]:
        return dict(
            self.client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=bytes(body),
                ChecksumCRC32C=crc32c_b64,
            )
        )

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[tuple[int, str, str]], *, if_none_match: bool
    ) -> dict[str, Any]:
        listed = [{"PartNumber": n, "ETag": etag, "ChecksumCRC32C": crc} for n, etag, crc in parts]
        match = {"IfNoneMatch": "*"} if if_none_match else {}
        return dict(
            self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}, **match
            )
        )

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    def list(self, bucket: str, prefix: str, *, delimiter: str = "") -> Iterator[dict[str, Any]]:
        extra = {"Delimiter": delimiter} if delimiter else {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **extra):
            yield from page.get("Contents", [])
            yield from ({"Prefix": p["Prefix"]} for p in page.get("CommonPrefixes", []))

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def delete_many(self, bucket: str, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + _DELETE_BATCH]]
            answer = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            for error in answer.get("Errors", []):
                from sdk.stores._s3http import S3Error

                code = str(error.get("Code", ""))
                raise S3Error(403 if code == "AccessDenied" else 500, code, f"{error.get('Message')} ({error['Key']})")

    def head_bucket(self, bucket: str) -> None:
        self.client.head_bucket(Bucket=bucket)
