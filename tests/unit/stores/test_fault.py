"""classify(): which backend exceptions are retried, which fail fast, and what each message tells the user.

The table uses the real exception types of botocore, aiohttp and gcsfs where they are installed, and look-alike
classes where classify matches by class name, so it holds with or without a backend package.
"""

from __future__ import annotations

import asyncio
import errno

import aiohttp
import botocore.exceptions
import pytest
from gcsfs.retry import ChecksumError, HttpError

from sdk.errors import (
    PermanentStorageError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    ThrottledStorageError,
    TransientStorageError,
    exit_code,
)
from sdk.outcomes import EXIT_UNAVAILABLE
from sdk.stores._fault import classify
from sdk.stores._s3http import S3Error

URL = "s3://bucket/run/step-10/model.safetensors"


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "PutObject")


class ReadTimeoutError(Exception):
    """Stands in for urllib3's class of the same name: classify matches it by name."""


class IncompleteRead(Exception):
    """Stands in for http.client's class of the same name."""


TRANSIENT = [
    pytest.param(TimeoutError("timed out"), id="TimeoutError"),
    pytest.param(asyncio.TimeoutError(), id="asyncio.TimeoutError"),
    pytest.param(ConnectionResetError(errno.ECONNRESET, "reset by peer"), id="ConnectionResetError"),
    pytest.param(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), id="ConnectionRefusedError"),
    pytest.param(BrokenPipeError(errno.EPIPE, "broken pipe"), id="BrokenPipeError"),
    pytest.param(OSError(errno.EBUSY, "Please reduce your request rate."), id="s3fs SlowDown as EBUSY"),
    pytest.param(OSError(errno.EIO, "I/O error"), id="EIO"),
    pytest.param(OSError(errno.ETIMEDOUT, "timed out"), id="ETIMEDOUT"),
    pytest.param(_client_error("SlowDown", 503), id="botocore 503 SlowDown"),
    pytest.param(_client_error("InternalError", 500), id="botocore 500"),
    pytest.param(_client_error("RequestTimeout", 408), id="botocore 408"),
    pytest.param(_client_error("TooManyRequests", 429), id="botocore 429"),
    pytest.param(_client_error("BadGateway", 502), id="botocore 502"),
    pytest.param(_client_error("GatewayTimeout", 504), id="botocore 504"),
    pytest.param(botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), id="EndpointConnectionError"),
    pytest.param(botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"), id="botocore ReadTimeoutError"),
    pytest.param(botocore.exceptions.ConnectTimeoutError(endpoint_url="http://s3"), id="ConnectTimeoutError"),
    pytest.param(botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"), id="ConnectionClosedError"),
    pytest.param(botocore.exceptions.ResponseStreamingError(error="reset"), id="ResponseStreamingError"),
    pytest.param(aiohttp.ServerDisconnectedError(), id="aiohttp ServerDisconnectedError"),
    pytest.param(aiohttp.ClientPayloadError("payload not completed"), id="aiohttp ClientPayloadError"),
    pytest.param(aiohttp.ClientOSError(errno.ECONNRESET, "reset"), id="aiohttp ClientOSError"),
    pytest.param(HttpError({"code": 503, "message": "backendError"}), id="gcsfs 503"),
    pytest.param(HttpError({"code": "429", "message": "rateLimitExceeded"}), id="gcsfs 429 as text"),
    pytest.param(ChecksumError("md5 mismatch"), id="gcsfs ChecksumError"),
    pytest.param(ReadTimeoutError("read timed out"), id="urllib3 ReadTimeoutError by name"),
    pytest.param(IncompleteRead("3 bytes read"), id="http.client IncompleteRead by name"),
    pytest.param(RuntimeError("ServiceUnavailable: try again"), id="ServiceUnavailable in the text"),
    pytest.param(
        S3Error(400, "BadDigest", "The Content-MD5 you specified did not match what we received. (PUT u)"),
        id="s3http 400 BadDigest (a body damaged on the way)",
    ),
    pytest.param(_client_error("BadDigest", 400), id="botocore 400 BadDigest"),
    pytest.param(_client_error("XAmzContentSHA256Mismatch", 400), id="botocore 400 payload hash mismatch"),
]

NOT_FOUND = [
    pytest.param(FileNotFoundError("bucket/key"), id="FileNotFoundError"),
    pytest.param(_client_error("NoSuchBucket", 404), id="botocore 404"),
    pytest.param(HttpError({"code": 404, "message": "Not Found"}), id="gcsfs 404"),
]

DENIED = [
    pytest.param(PermissionError("Access Denied"), id="PermissionError"),
    pytest.param(OSError(errno.EACCES, "Permission denied"), id="EACCES"),
    pytest.param(_client_error("AccessDenied", 403), id="botocore 403"),
    pytest.param(_client_error("InvalidAccessKeyId", 401), id="botocore 401"),
    pytest.param(OSError("Forbidden: https://storage.googleapis.com/b/o\nForbidden"), id="gcsfs 403 text"),
]

PERMANENT = [
    pytest.param(FileExistsError("bucket/key"), id="FileExistsError (precondition failed)"),
    pytest.param(ValueError("Bad Request: invalid bucket name"), id="ValueError"),
    pytest.param(_client_error("InvalidRequest", 400), id="botocore 400"),
    pytest.param(_client_error("InvalidDigest", 400), id="botocore 400 InvalidDigest (a malformed header)"),
    pytest.param(HttpError({"code": 400, "message": "Invalid argument"}), id="gcsfs 400"),
    pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="ENOSPC"),
    pytest.param(OSError(errno.EROFS, "Read-only file system"), id="EROFS"),
    pytest.param(RuntimeError("something odd"), id="anything else"),
]


@pytest.mark.parametrize("exc", TRANSIENT)
def test_transient_failures_are_retryable_platform_faults(exc: BaseException) -> None:
    """Throttling, 5xx, timeouts, resets and broken streams map to TransientStorageError."""
    error = classify(exc, url=URL, op="put")
    assert isinstance(error, TransientStorageError)
    assert error.transient
    assert error.fault == "platform"


@pytest.mark.parametrize("exc", NOT_FOUND)
def test_missing_objects_and_buckets_are_not_found(exc: BaseException) -> None:
    """A 404 in any form is StorageNotFoundError, a user fault that says to check the bucket and URL."""
    error = classify(exc, url=URL, op="get")
    assert type(error) is StorageNotFoundError
    assert isinstance(error, FileNotFoundError)
    assert not error.transient
    assert error.fault == "user"
    assert "check that the bucket exists" in str(error)


@pytest.mark.parametrize("exc", DENIED)
def test_denied_access_is_a_permission_error_naming_the_credentials(exc: BaseException) -> None:
    """401/403 and local permission errors are StoragePermissionError, pointing at the credential chain."""
    error = classify(exc, url=URL, op="put")
    assert type(error) is StoragePermissionError
    assert isinstance(error, PermissionError)
    assert not error.transient
    assert "credentials" in str(error)
    assert "AWS_*" in str(error)


@pytest.mark.parametrize("exc", PERMANENT)
def test_other_failures_are_permanent(exc: BaseException) -> None:
    """What retrying cannot fix fails fast as PermanentStorageError."""
    error = classify(exc, url=URL, op="put")
    assert type(error) is PermanentStorageError
    assert not error.transient


@pytest.mark.parametrize("exc", TRANSIENT + NOT_FOUND + DENIED + PERMANENT)
def test_every_classified_error_names_the_url_the_operation_and_the_cause(exc: BaseException) -> None:
    """The message carries the op, the URL and the original exception's type; ``.url`` is set."""
    error = classify(exc, url=URL, op="checksum")
    assert isinstance(error, StorageError)
    assert error.url == URL
    assert str(error).startswith(f"checksum {URL}")
    assert type(exc).__name__ in str(error)


def test_no_space_left_says_to_free_space() -> None:
    """ENOSPC tells the user the disk is full rather than a generic failure."""
    error = classify(OSError(errno.ENOSPC, "No space left on device"), url="file:///ckpt", op="put")
    assert "no space left on device" in str(error)


def test_an_exception_without_a_message_is_named_cleanly() -> None:
    """An empty exception message leaves just the type name, with no dangling colon."""
    error = classify(TimeoutError(), url=URL, op="get")
    assert str(error) == f"get {URL}: TimeoutError"


def test_an_untrusted_certificate_is_a_setting_to_fix_naming_aws_ca_bundle() -> None:
    """A failed TLS verification is never retried: exit 2, and the message says which variable takes a CA."""
    import ssl

    from sdk.errors import StorageTrustError, exit_code
    from sdk.outcomes import EXIT_CONFIG

    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    error = classify(cause, url=URL, op="list")
    assert isinstance(error, StorageTrustError) and not error.transient
    assert "AWS_CA_BUNDLE" in str(error) and exit_code(error) == EXIT_CONFIG


def _s3fs_error(code: str, status: int, message: str) -> OSError:
    """What s3fs raises for a botocore ClientError: an OSError with the server's message, the ClientError as cause."""
    error = OSError(errno.EBUSY, message)
    error.__cause__ = _client_error(code, status)
    return error


THROTTLED = [
    pytest.param(S3Error(503, "SlowDown", "Please reduce your request rate. (GET u)"), id="s3http 503 SlowDown"),
    pytest.param(S3Error(429, "TooManyRequests", "Too Many Requests (GET u)"), id="s3http 429"),
    pytest.param(S3Error(503, "503", "(HEAD u)"), id="s3http bodiless 503 on a HEAD"),
    pytest.param(S3Error(400, "RequestLimitExceeded", "slow down (GET u)"), id="s3http RequestLimitExceeded"),
    pytest.param(_client_error("SlowDown", 503), id="botocore 503 SlowDown"),
    pytest.param(_client_error("TooManyRequests", 429), id="botocore 429"),
    pytest.param(_client_error("ThrottlingException", 400), id="botocore ThrottlingException"),
    pytest.param(_client_error("503", 503), id="botocore bodiless 503 on a HEAD"),
    pytest.param(_s3fs_error("SlowDown", 503, "Please reduce your request rate."), id="s3fs SlowDown"),
    pytest.param(OSError(errno.EBUSY, "Please reduce your request rate."), id="s3fs SlowDown without its cause"),
    pytest.param(HttpError({"code": 429, "message": "Too Many Requests"}), id="gcsfs 429"),
    pytest.param(HttpError({"code": "429", "message": "rateLimitExceeded"}), id="gcsfs 429 as text"),
    pytest.param(
        HttpError({"code": 503, "message": "slow", "errors": [{"reason": "rateLimitExceeded"}]}),
        id="gcsfs reason rateLimitExceeded",
    ),
]

NOT_THROTTLED = [
    pytest.param(S3Error(500, "InternalError", "We encountered an internal error. (GET u)"), id="s3http 500"),
    pytest.param(S3Error(503, "ServiceUnavailable", "Service is unable to handle request."), id="s3http 503 other"),
    pytest.param(_client_error("InternalError", 500), id="botocore 500"),
    pytest.param(_client_error("GatewayTimeout", 504), id="botocore 504"),
    pytest.param(
        HttpError({"code": 503, "message": "Service Unavailable", "errors": [{"reason": "backendError"}]}),
        id="gcsfs 503 backendError",
    ),
    pytest.param(TimeoutError("timed out"), id="TimeoutError"),
    pytest.param(ConnectionResetError(errno.ECONNRESET, "reset by peer"), id="ConnectionResetError"),
]


@pytest.mark.parametrize("exc", THROTTLED)
def test_throttling_answers_are_throttled_transient_errors(exc: BaseException) -> None:
    """S3 SlowDown (with or without its XML body), HTTP 429, AWS throttling codes and GCS rateLimitExceeded."""
    error = classify(exc, url=URL, op="get")
    assert isinstance(error, ThrottledStorageError)
    assert error.transient and error.fault == "platform"
    assert exit_code(error) == EXIT_UNAVAILABLE


@pytest.mark.parametrize("exc", NOT_THROTTLED)
def test_other_transient_errors_are_not_throttling(exc: BaseException) -> None:
    """5xx server errors (GCS's 503 backendError too), timeouts and resets keep the ordinary retry policy."""
    error = classify(exc, url=URL, op="get")
    assert type(error) is TransientStorageError


def test_missing_credentials_are_a_setting_to_fix_naming_the_variables() -> None:
    """botocore's NoCredentialsError (no key anywhere in the chain) is exit 2 with the variables to set."""
    err = classify(botocore.exceptions.NoCredentialsError(), url="s3://b/k", op="put")
    assert isinstance(err, StoragePermissionError) and exit_code(err) == 2
    assert "no credentials found" in str(err) and "AWS_ACCESS_KEY_ID" in str(err)


def test_a_local_permission_error_blames_the_folder_not_credentials() -> None:
    """EACCES / EROFS on a local path: the folder's mode or a read-only mount, never the cloud's credentials."""
    for number in (errno.EACCES, errno.EROFS):
        err = classify(OSError(number, "denied", "/ckpt/x"), url="file:///ckpt", op="put")
        assert isinstance(err, StoragePermissionError) and exit_code(err) == 2
        assert "local disk" in str(err) and "credentials" not in str(err)


def test_a_host_name_that_does_not_resolve_is_a_setting_to_fix_and_a_resolver_hiccup_is_transient() -> None:
    """EAI_NONAME (a misspelt endpoint) → exit 2 naming AWS_ENDPOINT_URL; EAI_AGAIN → retried, 69."""
    import socket

    err = classify(socket.gaierror(socket.EAI_NONAME, "Name or service not known"), url="s3://b/k", op="find")
    assert exit_code(err) == 2 and "does not resolve" in str(err) and "AWS_ENDPOINT_URL" in str(err)
    again = classify(socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), url="s3://b/k", op="find")
    assert isinstance(again, TransientStorageError) and exit_code(again) == EXIT_UNAVAILABLE
