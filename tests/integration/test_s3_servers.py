"""What only a real S3 implementation shows: SeaweedFS checks every request's signature and every body's CRC32C,
which moto (a mock) does not. The contract suites run on both servers; these are the cases that need a server
that refuses, and one shape of checksum (a FULL_OBJECT multipart CRC) on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdk.data.pull import pull
from sdk.errors import StoragePermissionError, TransientStorageError
from sdk.stores import _s3 as s3
from sdk.stores import _s3http, checksum
from sdk.stores.store import RetryPolicy, open_store
from tests.conftest import BUCKET, CapturedLog, RecordedSleep
from tests.faultproxy import FaultProxy

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
MIB = 2**20
ONLY_SEAWEEDFS = pytest.mark.s3_servers("seaweedfs", reason="moto checks neither signatures nor body checksums")

pytestmark = pytest.mark.s3_servers


@pytest.fixture(params=["lean", "botocore"])
def request_path(request: pytest.FixtureRequest, s3_url: str) -> str:
    """The S3 store's two request paths: podtrain's own signing client, and botocore's (an AWS config file)."""
    if request.param == "botocore":
        request.getfixturevalue("s3_botocore")
    return str(request.param)


@ONLY_SEAWEEDFS
def test_a_wrong_secret_is_access_denied_at_once_naming_the_credentials(
    s3_url: str, request_path: str, no_sleep: RecordedSleep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server checks the SigV4 signature: a wrong secret key is 403 SignatureDoesNotMatch, which podtrain
    reports as access denied naming the URL and the credentials to check, without a retry (both clients)."""
    open_store(s3_url).put("ds/a.bin", b"data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(s3_url, sleep=no_sleep)
    with pytest.raises(StoragePermissionError, match="SignatureDoesNotMatch") as caught:
        store.get("ds/a.bin")
    assert store.url_of("ds/a.bin") in str(caught.value) and "credentials" in str(caught.value)
    assert no_sleep.calls == []


@ONLY_SEAWEEDFS
def test_podtrain_pull_with_a_wrong_secret_exits_2_with_one_line(s3_url: str, tmp_path: Path) -> None:
    """`podtrain pull` signed with the wrong secret: exit 2 (a setting to fix), one line saying access denied."""
    open_store(s3_url).put("ds/a.bin", b"data")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    done = subprocess.run(
        [PODTRAIN, "pull", f"{s3_url}/ds", "--dest", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1 and "access denied" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "d" / "a.bin").exists()


def _damage_first(monkeypatch: pytest.MonkeyPatch, method: str, times: int = 1) -> list[int]:
    """Flip one byte of the first ``times`` bodies the lean client sends through ``method`` (``put``/
    ``upload_part``), after their CRC32C was computed: what a bit flipped on the way looks like to the server.
    Returns the calls made."""
    real = getattr(_s3http.S3HTTP, method)
    calls: list[int] = []

    def damaged(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= times:
            body_at = 2 if method == "put" else 4  # put(bucket, key, body); upload_part(bucket, key, id, n, body)
            body = bytearray(args[body_at])
            body[len(body) // 2] ^= 0x01
            args = (*args[:body_at], bytes(body), *args[body_at + 1 :])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_s3http.S3HTTP, method, damaged)
    return calls


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "S3_MULTIPART_THRESHOLD", 6 * MIB)
    monkeypatch.setattr(s3, "S3_PART_SIZE", 5 * MIB)


@ONLY_SEAWEEDFS
@pytest.mark.usefixtures("small_parts")
@pytest.mark.parametrize(("size", "method"), [(100_000, "put"), (11 * MIB, "upload_part")], ids=["put", "part"])
def test_a_body_damaged_on_the_way_is_refused_by_its_crc32c_and_sent_again_whole(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, no_sleep: RecordedSleep, size: int, method: str
) -> None:
    """The CRC32C podtrain sends with each PUT and each part is checked by the server: a body damaged after it was
    computed is refused (400 BadDigest), transient damage, so it is sent again from its source and lands whole."""
    calls = _damage_first(monkeypatch, method)
    data = os.urandom(size)
    store = open_store(s3_url, sleep=no_sleep)
    assert store.put("obj.bin", data) is True
    assert store.get("obj.bin") == data and len(calls) >= 2
    assert no_sleep.calls, "the refused body was retried after a back-off"


@ONLY_SEAWEEDFS
@pytest.mark.usefixtures("small_parts")
@pytest.mark.parametrize(("size", "method"), [(100_000, "put"), (11 * MIB, "upload_part")], ids=["put", "part"])
def test_a_body_damaged_on_every_try_never_lands_and_fails_as_transient(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, no_sleep: RecordedSleep, size: int, method: str
) -> None:
    """A link that damages every try: no damaged object is ever stored, a multipart upload is aborted, and the
    error is transient (the attempt ends with exit 69: retry later), naming BadDigest."""
    _damage_first(monkeypatch, method, times=1000)
    store = open_store(s3_url, sleep=no_sleep)
    with pytest.raises(TransientStorageError, match="BadDigest"):
        store.put("obj.bin", os.urandom(size))
    assert not store.exists("obj.bin")
    import boto3

    uploads = boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert uploads == [], "the refused part's upload was left behind"


def _full_object_upload(key: str, data: bytes, part: int) -> None:
    """A multipart upload with a FULL_OBJECT CRC32 (the whole file's, as the AWS CLI v2 and boto3 with awscrt make
    them), through boto3, straight to the server."""
    import boto3

    client = boto3.client("s3")
    upload = client.create_multipart_upload(
        Bucket=BUCKET, Key=key, ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT"
    )["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), part), 1):
        body = data[start : start + part]
        crc = checksum.to_b64(zlib.crc32(body))
        answer = client.upload_part(
            Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=body, ChecksumCRC32=crc
        )
        parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": crc})
    client.complete_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": parts},
        ChecksumType="FULL_OBJECT",
        ChecksumCRC32=checksum.to_b64(zlib.crc32(data)),
    )


def test_a_full_object_multipart_crc_checks_the_whole_file_and_catches_a_flipped_byte(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], captured_log: CapturedLog
) -> None:
    """A multipart object whose CRC32 is the whole file's (ChecksumType FULL_OBJECT, which both servers return)
    is checked whole, not by its parts: verified, and one byte flipped in a range is caught and read again."""
    data = os.urandom(11 * MIB)
    _full_object_upload("root/data/full.bin", data, 5 * MIB)
    described = open_store(s3_url).describe("data/full.bin").checksums
    assert described.get("crc32") == zlib.crc32(data) and "crc32_parts" not in described, described
    proxy = fault_proxy("s3")
    hurt = proxy.flip(offset=1000, method="GET", path="full.bin", skip=1, times=1)
    result = pull([f"{s3_url}/data"], tmp_path / "d", piece_size=2 * MIB, retry=RetryPolicy(attempts=3, timeout=10))
    assert hurt.hits == 1
    assert (tmp_path / "d" / "full.bin").read_bytes() == data and result.unverified == 0
    assert captured_log.records("pull.reread"), "the damage went unnoticed"
