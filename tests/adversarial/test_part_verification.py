"""Every object that carries any checksum is checked end to end, multipart ones by their part layout; objects
with none are counted as unverified, and ``--require-checksums`` refuses them.

Real S3 (moto and SeaweedFS) behind the fault proxy (a byte flipped in one answer), objects written by boto3's own
multipart upload (its default CRC32, CRC32C, and no checksum at all: only the multipart MD5 ETag), the real
``podtrain pull`` command for the summary and the exit code.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from sdk.data.pull import PARTIAL_SUFFIX, pull
from sdk.errors import TransientStorageError, UnverifiedObjectError
from sdk.stores import checksum
from sdk.stores.store import RetryPolicy
from tests.conftest import BUCKET, CapturedLog
from tests.faultproxy import FaultProxy

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
MIB = 2**20
PART = 5 * MIB  # S3's smallest part
DATA = os.urandom(2 * PART + 3 * MIB + 7)  # three parts: 5 MiB, 5 MiB, 3 MiB + 7
PIECE = 2 * MIB  # pieces straddle part boundaries
RETRY = RetryPolicy(attempts=3, timeout=10)

pytestmark = pytest.mark.s3_servers  # the S3 tests run on moto and on SeaweedFS


def _client(*, checksums: bool = True) -> Any:
    """boto3 straight to the S3 server, not through the proxy; ``checksums=False``: boto3 sends none (only the ETag)."""
    import boto3
    from botocore.config import Config

    calculation = "when_supported" if checksums else "when_required"
    return boto3.client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=Config(request_checksum_calculation=calculation)
    )


def _boto3_upload(key: str, data: bytes, algorithm: str) -> None:
    """boto3's managed multipart upload in 5 MiB parts: its default CRC32 (COMPOSITE), or none (MD5 ETag only)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
    client = _client(checksums=algorithm != "none")
    client.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=config)
    head = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head["ETag"].endswith(f'-{-(-len(data) // PART)}"'), head["ETag"]  # multipart, as meant
    assert ("ChecksumCRC32" in head) == (algorithm == "CRC32")


def _parts_upload(key: str, data: bytes, sizes: Sequence[int], algorithm: str) -> None:
    """boto3's multipart API with these part sizes; CRC32C parts carry their checksum (computed here: botocore
    needs awscrt to compute a CRC32C itself), giving a COMPOSITE CRC32C."""
    assert sum(sizes) == len(data)
    client = _client(checksums=algorithm != "none")
    extra = {"ChecksumAlgorithm": "CRC32C"} if algorithm == "CRC32C" else {}
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key, **extra)["UploadId"]
    parts, start = [], 0
    for number, size in enumerate(sizes, 1):
        body = data[start : start + size]
        start += size
        sums = {"ChecksumCRC32C": checksum.to_b64(checksum.crc32c(body))} if extra else {}
        answer = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=body, **sums)
        parts.append({"PartNumber": number, "ETag": answer["ETag"], **sums})
    client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})


def _upload(key: str, algorithm: str) -> None:
    if algorithm == "CRC32C":
        _parts_upload(key, DATA, [PART, PART, len(DATA) - 2 * PART], "CRC32C")
    else:
        _boto3_upload(key, DATA, algorithm)


def _podtrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODTRAIN, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("piece", [PIECE, 16 * MIB], ids=["ranged", "whole"])
@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "none"])
def test_a_flipped_byte_in_a_boto3_multipart_object_is_caught_by_its_parts_and_read_again(
    algorithm: str,
    piece: int,
    *,
    s3_url: str,
    tmp_path: Path,
    fault_proxy: Callable[[str], FaultProxy],
    captured_log: CapturedLog,
) -> None:
    """A multipart object with only a COMPOSITE CRC (boto3's default) or only the multipart MD5 ETag is checked
    against it through its part layout, fetched in ranges or whole: one flipped byte is caught and read again."""
    _upload("root/data/big.bin", algorithm)
    proxy = fault_proxy("s3")
    hurt = proxy.flip(offset=PART + 1000 if piece > len(DATA) else 1000, method="GET", path="big.bin")
    result = pull([f"{s3_url}/data"], tmp_path / "d", piece_size=piece, retry=RETRY)
    assert hurt.hits == 1
    assert (tmp_path / "d" / "big.bin").read_bytes() == DATA, "the flipped byte was accepted"
    assert result.unverified == 0
    assert captured_log.records("pull.reread"), "the damage went unnoticed"
    assert not list((tmp_path / "d").rglob(f"*{PARTIAL_SUFFIX}"))


def test_a_multipart_object_costs_one_request_for_its_layout(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """Checked by its parts, each multipart object costs one request more than a pull that did not check it:
    ``HEAD ?partNumber=1`` (the part size and count); the other parts' sizes are not asked for."""
    _upload("root/data/crc.bin", "CRC32")
    _upload("root/data/md5.bin", "none")
    proxy = fault_proxy("s3")
    result = pull([f"{s3_url}/data"], tmp_path / "d", piece_size=PIECE, retry=RETRY)
    assert result.fetched == 2 and result.unverified == 0
    asked = sorted(t.rsplit("/", 1)[-1] for m, t in proxy.requests if m == "HEAD" and "partNumber" in t)
    assert asked == ["crc.bin?partNumber=1", "md5.bin?partNumber=1"]


def _part_heads(proxy: FaultProxy, number: int) -> list[str]:
    """The ``HEAD ?partNumber=number`` requests the proxy passed."""
    return [t for m, t in proxy.requests if m == "HEAD" and re.search(rf"partNumber={number}(&|$)", t)]


@pytest.mark.parametrize("algorithm", ["CRC32C", "none"])
def test_parts_of_uneven_sizes_are_checked_by_their_exact_layout(
    algorithm: str,
    s3_url: str,
    tmp_path: Path,
    fault_proxy: Callable[[str], FaultProxy],
    captured_log: CapturedLog,
) -> None:
    """Parts of different sizes (not the usual one size and a shorter last one) are neither failed as corrupt nor
    accepted corrupt: the exact layout is asked for, part by part, the landed bytes are checked against it without
    a second download, and a flipped byte is still caught."""
    data = os.urandom(14 * MIB + 1)
    _parts_upload("root/data/odd.bin", data, [PART + 1, 7 * MIB, 2 * MIB], algorithm)
    proxy = fault_proxy("s3")
    result = pull([f"{s3_url}/data"], tmp_path / "clean", piece_size=PIECE, retry=RETRY)
    assert (tmp_path / "clean" / "odd.bin").read_bytes() == data and result.unverified == 0
    assert _part_heads(proxy, 2) and _part_heads(proxy, 3), "the exact layout was not asked for"
    assert not captured_log.records("pull.reread"), "the object was fetched again"
    hurt = proxy.flip(offset=77, method="GET", path="odd.bin", skip=3)
    pull([f"{s3_url}/data"], tmp_path / "d", piece_size=PIECE, retry=RETRY)
    assert hurt.hits == 1 and (tmp_path / "d" / "odd.bin").read_bytes() == data


def test_a_large_single_part_object_with_only_an_md5_etag_is_checked_when_fetched_in_ranges(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A PutObject without a checksum, fetched in byte ranges, is checked against its ETag (the MD5 of the
    whole), which no piece alone can give: a flipped byte in one range is caught."""
    data = DATA[: 5 * MIB + 3]
    _client(checksums=False).put_object(Bucket=BUCKET, Key="root/data/one.bin", Body=data)
    proxy = fault_proxy("s3")
    hurt = proxy.flip(offset=5, method="GET", path="one.bin", skip=2)
    result = pull([f"{s3_url}/data"], tmp_path / "d", piece_size=PIECE, retry=RETRY)
    assert hurt.hits == 1 and (tmp_path / "d" / "one.bin").read_bytes() == data
    assert result.unverified == 0


def test_a_part_damaged_in_every_read_fails_after_three_reads_and_lands_nothing(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A byte flipped in every answer: read three times, then a TransientStorageError naming the object; nothing
    is renamed into place and no partial file is left."""
    _upload("root/data/big.bin", "CRC32")
    proxy = fault_proxy("s3")
    proxy.flip(offset=1000, method="GET", path="big.bin", times=None)
    with pytest.raises(TransientStorageError, match=r"big\.bin"):
        pull([f"{s3_url}/data"], tmp_path / "d", piece_size=PIECE, retry=RETRY)
    assert not (tmp_path / "d" / "big.bin").exists()
    assert not list((tmp_path / "d").rglob(f"*{PARTIAL_SUFFIX}"))


@pytest.mark.s3_servers("moto", reason="SeaweedFS without a KMS answers 500 InternalError to SSE-KMS uploads")
def test_objects_without_any_checksum_are_counted_unverified_and_refused_when_checksums_are_required(
    s3_url: str, tmp_path: Path
) -> None:
    """A KMS-encrypted single-part object (its ETag is not an MD5) has no checksum to compare: the pull lands it
    and says so (summary line, --json, log); --require-checksums or PODTRAIN_REQUIRE_CHECKSUMS=1 stops with exit
    2 and one line naming the object and the flag, landing nothing unverified."""
    client = _client(checksums=False)
    client.put_object(Bucket=BUCKET, Key="root/ds/secret.bin", Body=b"k" * 3000, ServerSideEncryption="aws:kms")
    client.put_object(Bucket=BUCKET, Key="root/ds/plain.bin", Body=b"p" * 3000)  # MD5 ETag: verified
    url = f"{s3_url}/ds"
    shown = _podtrain("pull", url, "--dest", str(tmp_path / "a"))
    assert shown.returncode == 0, shown.stderr
    assert "1 unverified" in shown.stdout
    as_json = _podtrain("pull", url, "--dest", str(tmp_path / "b"), "--json")
    assert json.loads(as_json.stdout)["unverified"] == 1
    for args, env in (
        (["--require-checksums"], {}),
        ([], {"PODTRAIN_REQUIRE_CHECKSUMS": "1"}),
    ):
        refused = _podtrain("pull", url, "--dest", str(tmp_path / "c"), *args, env=env)
        assert refused.returncode == 2, refused.stderr
        lines = [line for line in refused.stderr.splitlines() if not line.startswith("{")]  # log lines are JSON
        assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "secret.bin" in lines[0] and "--require-checksums" in lines[0], lines[0]
        assert not (tmp_path / "c" / "secret.bin").exists()


def test_a_store_that_cannot_give_the_part_layout_leaves_the_object_unverified_not_failed(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], captured_log: CapturedLog
) -> None:
    """An S3-compatible server that refuses ``HEAD ?partNumber=`` (here: 400 to each): the multipart object still
    lands, counted as unverified and logged with the reason; checksums required, it is refused."""
    _upload("root/data/big.bin", "CRC32")
    proxy = fault_proxy("s3")
    proxy.fail(400, method="HEAD", path="partNumber=", times=None)
    result = pull([f"{s3_url}/data"], tmp_path / "d", piece_size=PIECE, retry=RETRY)
    assert (tmp_path / "d" / "big.bin").read_bytes() == DATA and result.unverified == 1
    assert [r["url"] for r in captured_log.records("pull.no_part_layout")] == [f"{s3_url}/data/big.bin"]
    with pytest.raises(UnverifiedObjectError, match=r"big\.bin"):
        pull([f"{s3_url}/data"], tmp_path / "e", piece_size=PIECE, retry=RETRY, require_checksums=True)
