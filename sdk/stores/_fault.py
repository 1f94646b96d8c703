"""Sorting backend exceptions into podtrain's error tree: transient (retry) or permanent (fail fast).

fsspec file systems translate HTTP errors into Python ones (FileNotFoundError, PermissionError, OSError with an
errno, gcsfs's HttpError with a code; s3fs's shapes are still known, for an fsspec store built on it); the lean
S3 client raises :class:`sdk.stores._s3http.S3Error`, botocore ``ClientError``; botocore, http.client and aiohttp
raise their own connection and timeout errors.
Each is mapped once, here, to an error whose message names the URL and what to fix. Among the transient ones,
throttling — the store asking for fewer requests — is a :class:`~sdk.errors.ThrottledStorageError`, which the
retry loop answers with fewer requests in flight and a time budget (:mod:`sdk.stores._throttle`).
"""

from __future__ import annotations

import asyncio
import errno
import socket

from sdk.errors import (
    PermanentStorageError,
    StorageEndpointError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTrustError,
    ThrottledStorageError,
    TransientStorageError,
)

__all__ = ["classify"]

_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.EIO,
    getattr(errno, "EREMOTEIO", errno.EIO),
}
_TRANSIENT_NAMES = {
    # botocore / urllib3 / aiohttp / http.client, matched by class name so no backend must be importable
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "IncompleteRead",
    "ProtocolError",
    "ClientConnectionError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ClientPayloadError",
    "ConnectionError",
    "ProxyError",
    "ChecksumError",
    "ContentLengthError",
}
# A body the store refused because its checksum did not match what was sent with it (S3's BadDigest; a SigV4
# payload hash mismatch): damaged on the way, so sending it again from its source is the cure. A malformed digest
# header (InvalidDigest) is a client bug and stays permanent.
_TRANSIENT_TEXT = ("ServiceUnavailable", "InternalError", "BadDigest", "XAmzContentSHA256Mismatch")
# DNS says the endpoint's host does not exist (a misspelt endpoint): a setting to fix. EAI_AGAIN stays transient.
_NO_SUCH_HOST = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}
# No credentials anywhere in the cloud's chain (botocore; google-auth): a setting to fix, never worth a retry.
_NO_CREDENTIALS_NAMES = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
# Throttling: the store asks for fewer requests, not for the same ones again (sdk.stores._throttle). S3 documents
# SlowDown
# (503) for a request rate above a prefix's; the other codes are the throttling codes botocore's standard retry
# mode knows (S3-compatible stores use some). HTTP 429 is "Too Many Requests" everywhere; GCS documents 429
# (reason rateLimitExceeded) as its rate limit, while its 503 backendError is an ordinary server error.
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "ProvisionedThroughputExceededException",
    "EC2ThrottledException",
    "rateLimitExceeded",
    "userRateLimitExceeded",
}
_THROTTLE_TEXT = ("SlowDown", "Throttl", "TooManyRequests", "RequestLimitExceeded")  # s3fs keeps only the message


def classify(exc: BaseException, *, url: str, op: str = "access") -> StorageError:
    """The podtrain error for ``exc``, raised while doing ``op`` on ``url``."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    code = _http_code(exc)
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, FileExistsError):
        return PermanentStorageError(f"{op} {url}: already exists ({text})", url=url)
    if names & _NO_CREDENTIALS_NAMES:
        return StoragePermissionError(
            f"{op} {url}: no credentials found — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a "
            f"role (S3), or GOOGLE_APPLICATION_CREDENTIALS (GCS) ({text})",
            url=url,
        )
    if isinstance(exc, OSError) and exc.filename is not None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoragePermissionError(  # a local folder: its mode or a read-only mount, not credentials
            f"{op} {url}: permission denied on the local disk — check the folder's owner and mode, or a read-only "
            f"mount ({text})",
            url=url,
        )
    if isinstance(exc, FileNotFoundError) or code == 404:
        return StorageNotFoundError(
            f"{op} {url}: not found — check that the bucket exists and the URL is spelled right ({text})",
            url=url,
        )
    if isinstance(exc, PermissionError) or code in (401, 403) or "Forbidden" in str(exc):
        return StoragePermissionError(
            f"{op} {url}: access denied — check the credentials from the cloud's standard chain "
            f"(AWS_* / GOOGLE_APPLICATION_CREDENTIALS) and that they may use this bucket ({text})",
            url=url,
        )
    if isinstance(exc, socket.gaierror) and exc.errno in _NO_SUCH_HOST:
        return StorageEndpointError(
            f"{op} {url}: the endpoint's host name does not resolve — check AWS_ENDPOINT_URL (S3) or the URL ({text})",
            url=url,
        )
    if isinstance(exc, socket.gaierror):  # EAI_AGAIN and the like: the resolver did not answer this time
        return TransientStorageError(f"{op} {url}: the endpoint's host name could not be looked up ({text})", url=url)
    if "SSLCertVerificationError" in names:  # by name: ssl is imported only where HTTPS is used
        return StorageTrustError(
            f"{op} {url}: the endpoint's TLS certificate is not trusted — if it is signed by a private CA, point "
            f"AWS_CA_BUNDLE (S3) at that CA's PEM file ({text})",
            url=url,
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return PermanentStorageError(
            f"{op} {url}: no space left on device — free space or use a bigger volume ({text})", url=url
        )
    if _throttled(exc, code):
        return ThrottledStorageError(f"{op} {url}: {text}", url=url)
    transient = (
        isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError))
        or code in _TRANSIENT_HTTP
        or (isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS)
        or bool(names & _TRANSIENT_NAMES)
        or any(marker in str(exc) for marker in _TRANSIENT_TEXT)
    )
    if transient:
        return TransientStorageError(f"{op} {url}: {text}", url=url)
    return PermanentStorageError(f"{op} {url} failed: {text}", url=url)


def _throttled(exc: BaseException, code: int | None) -> bool:
    """Whether ``exc`` is the store asking for fewer requests: by HTTP status, error code, then message."""
    if code == 429:
        return True
    codes = {getattr(exc, "s3_code", None)}  # sdk.stores._s3http.S3Error
    for error in (exc, exc.__cause__):  # s3fs keeps botocore's ClientError as the cause of its OSError
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            codes.add(response.get("Error", {}).get("Code"))
    details = getattr(exc, "_error_response", None)  # gcsfs's HttpError keeps the JSON error, reasons included
    if isinstance(details, dict):
        codes.update(e.get("reason") for e in details.get("errors") or () if isinstance(e, dict))
    if codes & _THROTTLE_CODES:
        return True
    if code == 503 and "503" in codes:  # S3's answer to a HEAD has no body, so no code: its 503s say slow down
        return True
    text = str(exc)
    return any(marker in text for marker in _THROTTLE_TEXT) or "reduce your request rate" in text.lower()


def _http_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, str) and code.isdigit():  # gcsfs's HttpError keeps the code from the JSON body
        code = int(code)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None
