"""Pulling a dataset (sdk.data.pull) from file://, S3 (moto and SeaweedFS) and GCS (fake-gcs-server) on 127.0.0.1."""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdk.data.pull import INDEX_NAME, PARTIAL_SUFFIX, pull
from sdk.errors import InsufficientSpaceError, StorageNotFoundError, StoragePermissionError
from sdk.stores.store import RetryPolicy, Store, open_store
from tests.faultproxy import FaultProxy

FILES = {"train/a.bin": os.urandom(3000), "train/b.bin": os.urandom(70_000), "val/c.txt": b"hello", "README": b"x"}


def _upload(url: str) -> None:
    store = open_store(url)
    for rel, data in FILES.items():
        store.put(f"data/{rel}", data)


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every object read through a Store, recorded (the real read still happens)."""
    seen: list[str] = []
    original = Store.read

    def spy(self: Store, rel: str, *args: Any) -> Any:
        seen.append(rel)
        return original(self, rel, *args)

    monkeypatch.setattr(Store, "read", spy)
    return seen


def _local(dest: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file() and p.name != INDEX_NAME
    }


def test_cold_pull_fetches_everything_verified_and_a_warm_pull_nothing(
    store_url: str, tmp_path: Path, gets: list[str]
) -> None:
    """Cold: every object lands whole, no partial file is left. Warm: nothing is read from the store."""
    _upload(store_url)
    dest = tmp_path / "data"
    first = pull([f"{store_url}/data"], dest)
    assert (first.files, first.fetched, first.skipped) == (4, 4, 0)
    assert _local(dest) == FILES
    assert not list(dest.rglob(f"*{PARTIAL_SUFFIX}"))
    gets.clear()
    second = pull([f"{store_url}/data"], dest)
    assert (second.fetched, second.skipped, second.bytes_fetched) == (0, 4, 0)
    assert gets == []


def test_a_changed_object_is_fetched_again_and_only_it(store_url: str, tmp_path: Path, gets: list[str]) -> None:
    """An object rewritten in the store is fetched again; the others are not."""
    _upload(store_url)
    dest = tmp_path / "data"
    pull([f"{store_url}/data"], dest)
    open_store(store_url).put("data/val/c.txt", b"changed!")
    gets.clear()
    result = pull([f"{store_url}/data"], dest)
    assert result.fetched == 1 and gets == ["val/c.txt"]
    assert (dest / "val" / "c.txt").read_bytes() == b"changed!"


def test_include_and_exclude_globs_choose_the_files(store_url: str, tmp_path: Path) -> None:
    """include keeps only matching names, exclude drops matching ones."""
    _upload(store_url)
    dest = tmp_path / "data"
    pull([f"{store_url}/data"], dest, include=["train/*"], exclude=["*b.bin"])
    assert set(_local(dest)) == {"train/a.bin"}


def test_an_interrupted_pull_continues_where_it_stopped(
    store_url: str, tmp_path: Path, gets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull that dies after two files: the next one fetches only the other two."""
    _upload(store_url)
    dest = tmp_path / "data"
    spy = Store.read
    calls: list[str] = []

    def dying(self: Store, rel: str, *args: Any) -> Any:
        if len(calls) >= 2:
            raise KeyboardInterrupt("the pod went away")
        calls.append(rel)
        return spy(self, rel, *args)

    monkeypatch.setattr(Store, "read", dying)
    with pytest.raises(KeyboardInterrupt):
        pull([f"{store_url}/data"], dest, workers=1)
    monkeypatch.setattr(Store, "read", spy)
    gets.clear()
    result = pull([f"{store_url}/data"], dest)
    assert result.fetched == 2 and set(gets) == set(FILES) - set(calls)
    assert _local(dest) == FILES


def test_a_single_object_url_is_pulled_by_its_name(store_url: str, tmp_path: Path) -> None:
    """A URL naming one object pulls that object into the folder under its own name."""
    _upload(store_url)
    pull([f"{store_url}/data/val/c.txt"], tmp_path / "one")
    assert _local(tmp_path / "one") == {"c.txt": b"hello"}


def test_a_prefix_with_nothing_under_it_is_a_clear_error(store_url: str, tmp_path: Path) -> None:
    """An empty or mistyped prefix fails at once, naming the URL and the variable."""
    _upload(store_url)
    with pytest.raises(StorageNotFoundError, match="PODTRAIN_DATA_URI"):
        pull([f"{store_url}/no-such-prefix"], tmp_path / "data")


def test_not_enough_disk_fails_before_fetching(
    store_url: str, tmp_path: Path, gets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume without room: InsufficientSpaceError naming the sizes and the folder, nothing read."""
    _upload(store_url)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("sdk.data.pull.shutil.disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(InsufficientSpaceError, match="bigger volume"):
        pull([f"{store_url}/data"], tmp_path / "data")
    assert gets == []


@pytest.mark.parametrize("backend", ["s3", "seaweedfs", "gcs"])
def test_a_corrupted_transfer_is_read_again_and_access_denied_fails_fast(
    backend: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], request: Any
) -> None:
    """A byte flipped in transit is caught (size/CRC32C) and read again; a 403 fails at once with the URL."""
    url = request.getfixturevalue(f"{backend}_url")
    _upload(url)
    proxy = fault_proxy(backend)
    proxy.flip(offset=100, method="GET", path="b.bin", times=1)
    pull([f"{url}/data"], tmp_path / "data", retry=RetryPolicy(attempts=3, timeout=10))
    assert _local(tmp_path / "data") == FILES
    proxy.fail(403, times=None)
    with pytest.raises(StoragePermissionError, match="podtrain-test"):
        pull([f"{url}/data"], tmp_path / "other", retry=RetryPolicy(attempts=3, timeout=10))


def test_run_pull_data_uses_the_configured_uri_and_folder(store_url: str, tmp_path: Path) -> None:
    """run.pull_data() with PODTRAIN_DATA_URI/_DIR set fetches there; a second call fetches nothing."""
    import sdk
    from sdk.config import Config

    _upload(store_url)
    config = Config(data_uri=f"{store_url}/data", data_dir=str(tmp_path / "d"), checkpoint_uri=str(tmp_path / "c"))
    with sdk.init(config.with_changes(attempt=1)) as run:
        assert run.pull_data().fetched == 4
        assert run.pull_data().fetched == 0
    assert _local(tmp_path / "d") == FILES


BIG = os.urandom(300_000)  # five 64 KiB pieces and a short sixth one at piece_size=65536
PIECE = 64 * 1024


def _ranges(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None, int | None]]:
    """Every read through a Store, as (name, start, end); the real read still happens."""
    seen: list[tuple[str, int | None, int | None]] = []
    original = Store.read

    def spy(self: Store, rel: str, start: int | None = None, end: int | None = None) -> Any:
        seen.append((rel, start, end))
        return original(self, rel, start, end)

    monkeypatch.setattr(Store, "read", spy)
    return seen


def test_a_large_object_comes_in_parallel_byte_ranges_no_larger_than_a_piece(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object over piece_size is fetched as ranges of at most piece_size (memory stays bounded), put
    together at their offsets, and lands whole; a small object is one whole-object read."""
    store = open_store(store_url)
    store.put("data/big.bin", BIG)
    store.put("data/small.txt", b"tiny")
    reads = _ranges(monkeypatch)
    result = pull([f"{store_url}/data"], tmp_path / "d", piece_size=PIECE, workers=4)
    assert (tmp_path / "d" / "big.bin").read_bytes() == BIG and result.bytes_fetched == len(BIG) + 4
    big = sorted((start, end) for rel, start, end in reads if rel == "big.bin")
    assert big == [(s, min(s + PIECE, len(BIG))) for s in range(0, len(BIG), PIECE)]
    assert [(rel, start) for rel, start, _ in reads if rel == "small.txt"] == [("small.txt", None)]


@pytest.mark.parametrize("backend", ["s3", "seaweedfs", "gcs"])
@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_a_damaged_byte_range_is_caught_and_fetched_again(
    backend: str, fault: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], request: Any
) -> None:
    """A byte flipped in one range is caught by the CRC32C of the pieces combined (S3: from a HEAD, GCS: from the
    listing) and the object is fetched again; a range cut short is caught by its length or the transport."""
    url = request.getfixturevalue(f"{backend}_url")
    open_store(url).put("data/big.bin", BIG)
    proxy = fault_proxy(backend)
    hurt = proxy.add(fault, after=1000, method="GET", path="big.bin", skip=2, times=1)
    result = pull([f"{url}/data"], tmp_path / "d", piece_size=PIECE, retry=RetryPolicy(attempts=3, timeout=10))
    assert hurt.hits == 1
    assert (tmp_path / "d" / "big.bin").read_bytes() == BIG and result.fetched == 1
    assert not list((tmp_path / "d").rglob(f"*{PARTIAL_SUFFIX}"))


@pytest.mark.parametrize("backend", ["s3", "seaweedfs", "gcs"])
def test_a_stalled_transfer_is_cut_after_stall_seconds_and_retried(
    backend: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], request: Any
) -> None:
    """A GET that gets no byte for 30 s is abandoned after stall_seconds=1 and retried: the pull never hangs."""
    import time

    url = request.getfixturevalue(f"{backend}_url")
    _upload(url)
    proxy = fault_proxy(backend)
    stall = proxy.stall(30.0, method="GET", path="b.bin", times=1)
    started = time.monotonic()
    pull([f"{url}/data"], tmp_path / "d", stall_seconds=1.0)
    assert stall.hits == 1 and _local(tmp_path / "d") == FILES
    assert time.monotonic() - started < 20, "the stalled read was waited out instead of cut"


@pytest.mark.parametrize("backend", ["s3", "seaweedfs", "gcs"])
def test_files_already_on_disk_without_a_record_are_adopted_not_downloaded(
    backend: str, tmp_path: Path, request: Any, gets: list[str]
) -> None:
    """A folder filled by hand (a copy, another tool): files whose size and checksum match the store's are
    recorded without a download; one with the same size but other bytes is fetched."""
    url = request.getfixturevalue(f"{backend}_url")
    _upload(url)
    dest = tmp_path / "d"
    for rel, data in FILES.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data if rel != "val/c.txt" else b"HELLO")
    result = pull([f"{url}/data"], dest)
    assert (result.adopted, result.fetched, result.bytes_fetched) == (3, 1, 5)
    assert gets == ["val/c.txt"] and _local(dest) == FILES
    gets.clear()
    assert pull([f"{url}/data"], dest).fetched == 0 and gets == [], "adopted files are in the warm-cache index"
