"""The storage contract, one suite for every backend: ``StoreContract`` subclassed per store.

A subclass provides the ``url`` fixture (a fresh, empty location) and says what its store offers. The S3 and
GCS runs talk to real servers on 127.0.0.1 (moto and SeaweedFS, each S3 test on both; fake-gcs-server); access
denied comes from the fault proxy, since the emulators enforce no permissions by default.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sdk.errors import PermanentStorageError, StorageNotFoundError, StoragePermissionError
from sdk.stores import _s3 as s3
from sdk.stores import checksum
from sdk.stores.store import Store, open_store, split_url

if TYPE_CHECKING:
    from tests.conftest import RecordedSleep
    from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.s3_servers  # the S3 tests run on moto and on SeaweedFS


def _blob(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


class StoreContract:
    """Behaviour every store gives podtrain. Subclasses provide ``url`` and the flags below."""

    backend = "file"  # names the fault proxy's server for the cloud backends
    native_checksums = False  # the store records a CRC32C per object
    has_buckets = False  # a missing bucket is an error (a local directory is simply created)

    @pytest.fixture
    def store(self, url: str, no_sleep: RecordedSleep) -> Store:
        return open_store(url, sleep=no_sleep)

    # -- reading and writing -----------------------------------------------------------------------------
    def test_put_then_get_returns_the_same_bytes(self, store: Store) -> None:
        """An object reads back byte for byte, under a nested path."""
        data = _blob(100_000)
        assert store.put("a/b/c.bin", data) is True
        assert store.get("a/b/c.bin") == data

    def test_upload_file_lands_the_file_and_reports_what_it_sent(self, store: Store, tmp_path: Path) -> None:
        """A local file uploads byte for byte; the answer is the stored size and the CRC32C of the bytes sent."""
        data = _blob(300_000, seed=3)
        (tmp_path / "f.bin").write_bytes(data)
        info, crc, size = store.upload_file("up/f.bin", tmp_path / "f.bin")
        assert (info.size, crc, size) == (len(data), checksum.crc32c(data), len(data))
        assert store.get("up/f.bin") == data

    def test_empty_object_round_trips(self, store: Store) -> None:
        """A zero-byte object is stored, exists, has size 0 and reads back empty."""
        assert store.put("empty", b"") is True
        assert store.exists("empty")
        assert store.size("empty") == 0
        assert store.get("empty") == b""

    def test_plain_put_replaces_an_existing_object(self, store: Store) -> None:
        """Without ``exclusive``, a put overwrites."""
        store.put("obj", b"first")
        assert store.put("obj", b"second version") is True
        assert store.get("obj") == b"second version"

    def test_exists_and_size_describe_the_object(self, store: Store) -> None:
        """exists() is True only for a written object; size() is its length in bytes."""
        store.put("dir/obj", _blob(1234))
        assert store.exists("dir/obj")
        assert not store.exists("dir/other")
        assert store.size("dir/obj") == 1234

    def test_upload_returns_what_the_store_holds_and_describe_agrees(self, store: Store) -> None:
        """upload() answers with the stored size and, where the store keeps one, the CRC32C it checked;
        describe() says the same; a ranged read returns exactly that slice."""
        from sdk.stores import checksum

        data = _blob(70_000)
        crc = checksum.crc32c(data)
        held = store.upload("up/obj", data, crc32c=crc)
        described = store.describe("up/obj")
        assert held.size == described.size == len(data)
        if self.native_checksums:
            assert held.checksums["crc32c"] == described.checksums["crc32c"] == crc
        assert store.read("up/obj", 1000, 1010)[0] == data[1000:1010]
        whole, sums = store.read("up/obj")
        assert whole == data and sums.get("crc32c", crc) == crc

    def test_get_of_a_missing_object_is_not_found_at_once(self, store: Store, no_sleep: RecordedSleep) -> None:
        """Reading an object that is not there is StorageNotFoundError naming its URL, with no retry."""
        with pytest.raises(StorageNotFoundError) as caught:
            store.get("nothing/here")
        assert store.url_of("nothing/here") in str(caught.value)
        assert caught.value.url == store.url_of("nothing/here")
        assert no_sleep.calls == []

    # -- conditional create ------------------------------------------------------------------------------
    def test_exclusive_put_creates_a_new_object(self, store: Store) -> None:
        """An exclusive put where nothing exists writes the object and returns True."""
        assert store.put("manifest", b"mine", exclusive=True) is True
        assert store.get("manifest") == b"mine"

    def test_exclusive_put_over_other_content_returns_false_and_writes_nothing(self, store: Store) -> None:
        """An exclusive put loses to an existing object with different content, which stays intact."""
        store.put("manifest", b"theirs", exclusive=True)
        assert store.put("manifest", b"mine", exclusive=True) is False
        assert store.get("manifest") == b"theirs"

    def test_exclusive_put_of_identical_content_counts_as_written(self, store: Store) -> None:
        """Re-sending our own write (a retry after a lost answer) is a success, not a conflict."""
        store.put("manifest", b"same bytes", exclusive=True)
        assert store.put("manifest", b"same bytes", exclusive=True) is True

    # -- checksums ---------------------------------------------------------------------------------------
    def test_native_crc32c_is_the_crc32c_of_the_data(self, store: Store) -> None:
        """Stores that keep a CRC32C report exactly ours; others report None."""
        data = _blob(70_000, seed=3)
        store.put("obj", data)
        expected = checksum.crc32c(data) if self.native_checksums else None
        assert store.native_crc32c("obj") == expected

    # -- listing and deleting ----------------------------------------------------------------------------
    def test_list_gives_the_names_of_direct_children(self, store: Store) -> None:
        """list() names files and sub-folders one level down, sorted, without their paths."""
        for rel in ("step-1/a", "step-1/sub/b", "step-2/c", "top"):
            store.put(rel, b"x")
        assert store.list() == ["step-1", "step-2", "top"]
        assert store.list("step-1") == ["a", "sub"]

    def test_list_of_a_missing_folder_is_empty(self, store: Store) -> None:
        """Listing a prefix with nothing under it gives [] rather than an error."""
        assert store.list("no-such-folder") == []

    def test_walk_gives_every_object_as_a_path_relative_to_the_folder(self, store: Store) -> None:
        """walk() descends all levels and yields paths relative to where it started."""
        for rel in ("run/a", "run/x/b", "run/x/y/c", "other/d"):
            store.put(rel, b"x")
        assert sorted(store.walk("run")) == ["a", "x/b", "x/y/c"]
        assert sorted(store.walk()) == ["other/d", "run/a", "run/x/b", "run/x/y/c"]

    def test_recursive_delete_removes_everything_below_and_nothing_else(self, store: Store) -> None:
        """delete(recursive=True) empties a folder; its siblings survive."""
        for rel in ("old/a", "old/deep/b", "keep/c"):
            store.put(rel, b"x")
        store.delete("old", recursive=True)
        assert list(store.walk()) == ["keep/c"]
        assert not store.exists("old/deep/b")

    def test_delete_of_one_object_leaves_its_neighbours(self, store: Store) -> None:
        """A plain delete removes just that object."""
        store.put("d/a", b"x")
        store.put("d/b", b"y")
        store.delete("d/a")
        assert sorted(store.walk("d")) == ["b"]

    def test_delete_of_a_missing_path_is_fine(self, store: Store, no_sleep: RecordedSleep) -> None:
        """Deleting what is not there succeeds quietly, recursive or not."""
        store.delete("ghost")
        store.delete("ghost-folder", recursive=True)
        assert no_sleep.calls == []

    # -- roots and children ------------------------------------------------------------------------------
    def test_child_store_reads_and_writes_below_its_parent(self, store: Store) -> None:
        """child(rel) is rooted at rel: its paths and URLs are the parent's plus rel."""
        child = store.child("runs/r1")
        child.put("f", b"data")
        assert store.get("runs/r1/f") == b"data"
        assert child.url_of("f") == store.url_of("runs/r1/f")
        assert child.url == store.url_of("runs/r1")

    def test_ensure_root_accepts_a_usable_location(self, store: Store) -> None:
        """ensure_root() passes where the bucket (or directory) can be used, and the location then works."""
        store.ensure_root()
        assert store.put("probe", b"ok") is True
        assert store.get("probe") == b"ok"

    # -- failures ----------------------------------------------------------------------------------------
    @pytest.mark.parametrize(
        "operation",
        [
            pytest.param(lambda s: s.ensure_root(), id="ensure_root"),
            pytest.param(lambda s: s.put("f", b"x"), id="put"),
            pytest.param(lambda s: s.get("f"), id="get"),
        ],
    )
    def test_missing_bucket_fails_at_once_naming_the_url_and_the_fix(
        self, url: str, no_sleep: RecordedSleep, operation: Callable[[Store], object]
    ) -> None:
        """A bucket that does not exist is StorageNotFoundError naming the URL and what to check, never retried."""
        if not self.has_buckets:
            pytest.skip("a local directory is created, not looked up")
        scheme, path = split_url(url)
        missing = f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/{path.split('/', 1)[1]}"
        store = open_store(missing, sleep=no_sleep)
        with pytest.raises(StorageNotFoundError) as caught:
            operation(store)
        message = str(caught.value)
        assert missing in message
        assert "bucket exists" in message
        assert no_sleep.calls == []

    @pytest.mark.parametrize(
        "operation",
        [
            pytest.param(lambda s: s.ensure_root(), id="ensure_root"),
            pytest.param(lambda s: s.put("f", b"x"), id="put"),
            pytest.param(lambda s: s.get("f"), id="get"),
            pytest.param(lambda s: s.list(), id="list"),
        ],
    )
    def test_access_denied_is_a_permission_error_without_retries(
        self,
        url: str,
        no_sleep: RecordedSleep,
        fault_proxy: Callable[[str], FaultProxy],
        operation: Callable[[Store], object],
    ) -> None:
        """A 403 is StoragePermissionError naming the URL and the credentials to check, after one request."""
        if not self.has_buckets:
            pytest.skip("a local store has no access control to deny through a proxy")
        proxy = fault_proxy(self.backend)
        proxy.fail(403, times=None)
        store = open_store(url, sleep=no_sleep)
        with pytest.raises(StoragePermissionError) as caught:
            operation(store)
        assert store.url in str(caught.value)
        assert "credentials" in str(caught.value)
        assert len(proxy.requests) == 1
        assert no_sleep.calls == []


class TestFileStore(StoreContract):
    """The contract on a local directory (file://): atomic rename and hard-link creates, no native checksum."""

    @pytest.fixture
    def url(self, file_url: str) -> str:
        return file_url


class TestS3Store(StoreContract):
    """The contract on S3 (moto): If-None-Match creates, x-amz-checksum-crc32c, multipart for large bodies — on each
    of the store's two request paths: the lean client, and botocore's client where the lean one steps aside (here
    for an AWS config file's ``s3`` settings, as users' files have)."""

    backend = "s3"
    native_checksums = True
    has_buckets = True

    @pytest.fixture(params=["lean", "botocore"])
    def url(self, request: pytest.FixtureRequest, s3_url: str) -> str:
        if request.param == "botocore":
            request.getfixturevalue("s3_botocore")
        return s3_url

    @pytest.fixture
    def client_class(self, request: pytest.FixtureRequest, url: str) -> Any:
        """The class of the client this run's requests must go through."""
        from sdk.stores import _s3botocore, _s3http

        return _s3botocore.BotocoreS3 if request.node.callspec.params["url"] == "botocore" else _s3http.S3HTTP

    def test_requests_go_through_the_path_the_environment_asks_for(self, store: Store, client_class: Any) -> None:
        """Keys in the environment: the lean client; an AWS config file's ``s3`` settings: botocore's client. Both
        serve every operation (this suite runs on each)."""
        store.put("obj", b"x")
        assert type(store.backend.client) is client_class  # type: ignore[attr-defined]

    @pytest.fixture
    def small_parts(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Multipart above 6 MiB, in 5 MiB parts (S3's smallest but the last), so tests stay small."""
        monkeypatch.setattr(s3, "S3_MULTIPART_THRESHOLD", 6 * 2**20)
        monkeypatch.setattr(s3, "S3_PART_SIZE", 5 * 2**20)

    @pytest.mark.usefixtures("small_parts")
    def test_multipart_upload_sends_a_crc32c_with_every_part(self, store: Store) -> None:
        """Above the threshold a put goes as parts, each with its CRC32C; S3 keeps their COMPOSITE checksum."""
        data = os.urandom(11 * 2**20)
        assert store.put("big.bin", data) is True
        import boto3

        bucket, _, prefix = store.root.partition("/")
        head = boto3.client("s3").head_object(Bucket=bucket, Key=f"{prefix}/big.bin", ChecksumMode="ENABLED")
        assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
        parts = [data[i : i + 5 * 2**20] for i in range(0, len(data), 5 * 2**20)]
        composite = checksum.crc32c(b"".join(checksum.crc32c(p).to_bytes(4, "big") for p in parts))
        assert head["ChecksumCRC32C"].split("-")[0] == checksum.to_b64(composite)  # each part's CRC32C was sent
        assert store.native_crc32c("big.bin") is None  # a composite is not the file's CRC32C: reads check it
        assert store.get("big.bin") == data

    @pytest.mark.usefixtures("small_parts")
    def test_a_large_file_goes_up_in_parts_read_from_disk(
        self, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file over the threshold is read a part at a time (never whole), each part checked by S3; the CRC32C
        returned is the whole file's, combined from the parts'; memory held is bounded by parts, not file size."""
        data = os.urandom(11 * 2**20)
        (tmp_path / "big.bin").write_bytes(data)
        reads: list[int] = []
        real_pread = os.pread

        def pread(fd: int, length: int, offset: int) -> bytes:
            reads.append(length)
            return real_pread(fd, length, offset)

        monkeypatch.setattr(s3.os, "pread", pread)
        info, crc, size = store.upload_file("big.bin", tmp_path / "big.bin")
        assert sorted(reads) == [2**20, 5 * 2**20, 5 * 2**20]
        assert (info.size, size, crc) == (len(data), len(data), checksum.crc32c(data))
        assert store.get("big.bin") == data
        assert store.upload_memory(2**40) == s3.S3_CONCURRENCY * -(-(2**40) // s3.S3_MAX_PARTS)  # 10 parts of 110 MB
        assert store.upload_memory(3 * 2**20) == 3 * 2**20  # one PUT: the file itself

    @pytest.mark.usefixtures("small_parts")
    def test_a_failed_part_aborts_the_multipart_upload(
        self, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_class: Any
    ) -> None:
        """When a part is refused, the upload fails with S3's error and is aborted: no object, no parts left over
        for S3 to bill."""
        from sdk.stores import _s3http as s3http

        (tmp_path / "big.bin").write_bytes(os.urandom(11 * 2**20))
        real = client_class.upload_part

        def refuse_second(self: Any, *args: Any, **kwargs: Any) -> Any:
            if args[3] == 2:  # part number
                raise s3http.S3Error(403, "AccessDenied", "part 2 refused")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(client_class, "upload_part", refuse_second)
        with pytest.raises(StoragePermissionError, match="part 2 refused"):
            store.upload_file("big.bin", tmp_path / "big.bin")
        import boto3

        bucket, _, prefix = store.root.partition("/")
        client = boto3.client("s3")
        assert client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
        assert not store.exists("big.bin")

    @pytest.mark.usefixtures("small_parts")
    def test_a_file_that_shrinks_while_it_is_uploaded_fails_with_a_message(self, store: Store, tmp_path: Path) -> None:
        """Bytes missing at read time (a writer truncated the file) fail the upload clearly, never a short object."""
        path = tmp_path / "big.bin"
        path.write_bytes(os.urandom(11 * 2**20))
        real_stat = Path.stat

        def stat_then_truncate(self: Path, **kwargs: Any) -> Any:
            result = real_stat(self, **kwargs)
            if self == path:
                os.truncate(path, 7 * 2**20)
            return result

        with pytest.MonkeyPatch.context() as patch, pytest.raises(PermanentStorageError, match="changed while"):
            patch.setattr(Path, "stat", stat_then_truncate)
            store.upload_file("big.bin", path)
        assert not store.exists("big.bin")

    @pytest.mark.usefixtures("small_parts")
    def test_exclusive_multipart_upload_loses_to_an_existing_object(self, store: Store) -> None:
        """The conditional create holds for multipart uploads too; identical content still counts as written."""
        data = os.urandom(7 * 2**20)
        assert store.put("big.bin", data, exclusive=True) is True
        assert store.put("big.bin", data[::-1], exclusive=True) is False
        assert store.get("big.bin") == data
        assert store.put("big.bin", data, exclusive=True) is True


def test_with_keys_in_the_environment_no_s3_operation_imports_botocore_s3fs_or_fsspec(s3_url: str) -> None:
    """Every operation of the S3 store — the metadata reads a checkpoint's verify makes, one-level listing, deletes,
    the bucket check — goes through the lean client when keys are in the environment: no botocore (~65 ms), s3fs and
    aiobotocore (~0.5 s) or fsspec (~35-60 ms) imported in the process."""
    code = (
        "import sys\n"
        "from sdk.stores.store import open_store\n"
        f"store = open_store({s3_url!r})\n"
        "store.ensure_root()\n"
        "assert store.put('a/b', b'xy', exclusive=True) and store.get('a/b') == b'xy'\n"
        "assert store.exists('a/b') and store.size('a/b') == 2 and store.native_crc32c('a/b') is not None\n"
        "assert store.list('a') == ['b'] and list(store.walk()) == ['a/b']\n"
        "store.delete('a', recursive=True)\n"
        "assert not store.exists('a/b')\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'botocore', 's3fs', 'aiobotocore', 'fsspec'})\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


class TestGCSStore(StoreContract):
    """The contract on GCS (fake-gcs-server): ifGenerationMatch=0 creates, crc32c in object metadata."""

    backend = "gcs"
    native_checksums = True
    has_buckets = True

    @pytest.fixture
    def url(self, gcs_url: str) -> str:
        return gcs_url
