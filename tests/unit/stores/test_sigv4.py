"""sdk.stores._sigv4: the SigV4 headers podtrain signs S3 requests with are exactly botocore's."""

from __future__ import annotations

import datetime
from unittest import mock

import pytest

from sdk.stores import _sigv4 as sigv4
from sdk.stores._sigv4 import Keys, sign

NOW = datetime.datetime(2026, 11, 29, 1, 2, 3, tzinfo=datetime.timezone.utc)
KEYS = Keys(access_key="AKIDEXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
TEMPORARY = Keys(access_key="ASIAEXAMPLE", secret_key="secret/with+chars", token="FwoGZXIvYXdzEJr//////////token==")

REQUESTS = [
    ("GET", "http://127.0.0.1:9000/bucket/data/small/00001.bin", {"x-amz-checksum-mode": "ENABLED"}),
    ("GET", "https://bkt.s3.eu-west-1.amazonaws.com/a%20b/%C3%A9t%C3%A9~x.bin", {"Range": "bytes=0-16777215"}),
    ("HEAD", "https://s3.us-east-1.amazonaws.com/my.bucket/key", {"x-amz-checksum-mode": "ENABLED"}),
    ("HEAD", "http://127.0.0.1:9000/b/big.bin?partNumber=1", {"x-amz-checksum-mode": "ENABLED"}),
    ("GET", "http://localhost:4566/b/?list-type=2&prefix=data%2F&encoding-type=url&continuation-token=1%2Fx%3D%3D", {}),
    ("PUT", "http://127.0.0.1:9000/b/k", {"x-amz-checksum-crc32c": "AAAAAA==", "x-amz-sdk-checksum-algorithm": "C"}),
    ("PUT", "http://127.0.0.1:9000/b/k", {"If-None-Match": "*", "x-amz-checksum-crc32c": "  spaced   value  "}),
    ("POST", "http://127.0.0.1:9000/b/big.bin?uploads=", {"x-amz-checksum-algorithm": "CRC32C"}),
    ("PUT", "http://127.0.0.1:9000/b/big.bin?partNumber=10&uploadId=abc-DEF_123", {"x-amz-checksum-crc32c": "x"}),
    ("POST", "http://127.0.0.1:9000/b/big.bin?uploadId=abc", {"User-Agent": "podtrain", "Expect": "100-continue"}),
    ("DELETE", "https://bkt.s3.us-west-2.amazonaws.com:443/k?uploadId=abc", {}),
    ("GET", "http://[::1]:9000/b/k", {"Host": "[::1]:9000"}),
    ("GET", "http://127.0.0.1:9000/b/?list-type=2&prefix=ckpt%2F&encoding-type=url&delimiter=%2F", {}),
    ("POST", "http://127.0.0.1:9000/b/?delete=", {"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg=="}),
    ("HEAD", "https://bkt.s3.eu-west-1.amazonaws.com/", {}),
    ("DELETE", "http://127.0.0.1:9000/b/ckpt/step-1/MANIFEST.json", {}),
]


def _botocore(method: str, url: str, headers: dict[str, str], keys: Keys, region: str) -> dict[str, str]:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, headers=dict(headers), data=b"")
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        S3SigV4Auth(Credentials(keys.access_key, keys.secret_key, keys.token), "s3", region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("keys", [KEYS, TEMPORARY], ids=["keys", "session-token"])
@pytest.mark.parametrize(("method", "url", "headers"), REQUESTS, ids=[f"{r[0]} {r[1][:60]}" for r in REQUESTS])
def test_headers_equal_botocore_s3sigv4auth(method: str, url: str, headers: dict[str, str], keys: Keys) -> None:
    """Every header podtrain sends, the Authorization above all, is what botocore's S3SigV4Auth makes for the
    same request, unsigned payload and all."""
    ours = sign(method, url, headers, keys, "eu-west-1", now=NOW)
    assert ours == _botocore(method, url, headers, keys, "eu-west-1")


def test_the_aws_documentation_example_signature() -> None:
    """The signing key and string-to-sign follow AWS's published S3 GET example (unsigned payload variant),
    checked through botocore above; here the fixed parts of the Authorization header are pinned."""
    url = "https://examplebucket.s3.amazonaws.com/test.txt"
    out = sign("GET", url, {"Range": "bytes=0-9"}, KEYS, "us-east-1", now=NOW)
    assert out["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261129/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature="
    )
    assert out["X-Amz-Date"] == "20261129T010203Z" and out["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"


def test_keys_never_show_their_secret() -> None:
    """A Keys object printed in a log or a traceback shows the key id, never the secret or the token."""
    assert "wJalr" not in repr(KEYS) and "token" not in repr(TEMPORARY).replace("Keys(", "")
    assert "AKIDEXAMPLE" in repr(KEYS)


def test_a_resigned_request_drops_its_old_signature() -> None:
    """Signing headers that already carry an Authorization and a date (a retried request) replaces both."""
    first = sign("GET", "http://127.0.0.1:9/b/k", {}, KEYS, "us-east-1", now=NOW)
    later = NOW + datetime.timedelta(seconds=5)
    again = sign("GET", "http://127.0.0.1:9/b/k", first, KEYS, "us-east-1", now=later)
    assert again == sign("GET", "http://127.0.0.1:9/b/k", {}, KEYS, "us-east-1", now=later)
    assert again["X-Amz-Content-SHA256"] == sigv4.UNSIGNED_PAYLOAD
