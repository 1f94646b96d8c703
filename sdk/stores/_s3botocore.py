"""botocore's side of S3: the sessions, client settings and event hooks, for where :mod:`sdk.stores._s3http` steps aside
(proxies, FIPS, config-file settings, credentials botocore must resolve) and for s3fs (the rest of the fsspec API,
multipart uploads without s3http).

Everything here is made on first use: a pull or push with keys in the environment never imports botocore.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "aio_session",
    "client_config",
    "drop_expect_continue",
    "parse_timestamp",
    "skip_response_validation",
    "sync_session",
]


def client_config(timeout: float) -> dict[str, Any]:
    """botocore settings shared by the async (s3fs) and the sync client."""
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
    """One botocore session per AWS_* environment, as :func:`aio_session`."""
    import botocore.session

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    return session


@functools.lru_cache(maxsize=4)
def aio_session(aws_env: tuple[tuple[str, str], ...]) -> Any:
    """One aiobotocore session per AWS_* environment: a session caches the parsed S3 service model, so each
    new store's client costs ~0.1 s instead of ~0.4 s. A changed environment gets a fresh session."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.register("before-send.s3", drop_expect_continue)
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


def drop_expect_continue(request: Any, **kwargs: Any) -> None:
    """botocore sends every PutObject/UploadPart with ``Expect: 100-continue``; aiohttp does not apply its read
    timeout while it waits for the ``100 Continue``, so a store that stalls there would hang the upload for
    good. Without the header the body goes at once and the read timeout bounds the wait for the answer."""
    if "Expect" in request.headers:
        del request.headers["Expect"]


def skip_response_validation(context: dict[str, Any], **kwargs: Any) -> None:
    """botocore checks a body against its checksum header whenever ``ChecksumMode`` is set, which podtrain
    sets to receive that header; podtrain then checks the body itself (CRC32C in hardware, pieces combined),
    so botocore's pass (a wrapper hashing every chunk in Python) would be a second one over every byte."""
    context.get("checksum", {}).pop("response_algorithms", None)
