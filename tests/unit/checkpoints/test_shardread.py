"""sdk.checkpoints._shardread: a rank's sharded payload checked before a load, each tensor read by its byte range and
checked by its own CRC32C during it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as library_save

from sdk.checkpoints import _shardread, serialization
from sdk.checkpoints import _statefile as statefile
from sdk.checkpoints._shardload import TensorSpec
from sdk.checkpoints._verify import READS
from sdk.checkpoints.invalidmark import DamagedRange
from sdk.checkpoints.manifest import FileEntry, step_dir
from sdk.errors import InvalidCheckpointError
from sdk.stores import checksum
from sdk.stores.store import Store, open_store

STEP = 5
URL = "file:///ckpt/step-0000000005"
RANK_DIR = "attempt-1-x/rank-0"
TENSORS = f"{RANK_DIR}/sharded.safetensors"
PICKLE = f"{RANK_DIR}/sharded.pt"
A = torch.arange(12, dtype=torch.float32).reshape(3, 4)
B = torch.tensor([1, -2, 3], dtype=torch.int64)


def _state() -> dict[str, Any]:
    return {"a@0": A, "b@0": B, "lr": 0.1, "betas": (0.9, 0.99)}


def _checkpoint(tmp_path: Path, state: dict[str, Any] | None = None) -> tuple[Store, dict[str, FileEntry]]:
    """Rank 0's sharded payload (a pickle and a safetensors file) in a local store, and its manifest entries."""
    store = open_store(str(tmp_path))
    files: dict[str, FileEntry] = {}
    for encoded in serialization.encode("sharded", _state() if state is None else state, split_bytes=0):
        name = f"{RANK_DIR}/{encoded.name}"
        store.put(f"{step_dir(STEP)}/{name}", bytes(encoded.data))
        files[name] = FileEntry(size=encoded.size, crc32c=checksum.to_hex(encoded.crc32c))
    assert set(files) == {PICKLE, TENSORS}
    return store, files


def _on_disk(tmp_path: Path, name: str = TENSORS) -> Path:
    return tmp_path / step_dir(STEP) / name


def _entry_of(tmp_path: Path, tensor_name: str) -> statefile.TensorEntry:
    """Where the tensor ``tensor_name`` (its name in the safetensors file) lies in the file on disk."""
    data = _on_disk(tmp_path).read_bytes()
    (entry,) = [e for e in statefile.safetensors_header(TENSORS, data, location=URL) if e.name == tensor_name]
    return entry


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _count_reads(
    monkeypatch: pytest.MonkeyPatch, store: Store, alter: Callable[[int, bytes], bytes] | None = None
) -> list[tuple[int | None, int | None]]:
    """Wrap the store's ``read``: the ranged reads of the safetensors file are counted (and ``alter``-ed by their
    count, from 1) — returns the list of their ``(start, end)``."""
    calls: list[tuple[int | None, int | None]] = []
    real = store.read

    def read(rel: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Any]:
        data, sums = real(rel, start, end)
        if rel.endswith(TENSORS) and start not in (None, 0):
            calls.append((start, end))
            if alter is not None:
                data = alter(len(calls), data)
        return data, sums

    monkeypatch.setattr(store, "read", read)
    return calls


def test_lookup_gives_objects_and_a_spec_for_each_tensor_without_reading_it(tmp_path: Path) -> None:
    """Saved objects come back as they were; a tensor is its dtype and shape, known from the checked header."""
    store, files = _checkpoint(tmp_path)
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0])
    assert payloads.lookup(0, "lr") == 0.1
    assert payloads.lookup(0, "betas") == (0.9, 0.99)
    assert payloads.lookup(0, "a@0") == TensorSpec(torch.float32, (3, 4))
    assert payloads.lookup(0, "b@0") == TensorSpec(torch.int64, (3,))


def test_tensors_yields_the_exact_saved_tensors_in_the_order_asked(tmp_path: Path) -> None:
    """Every wanted (rank, key) comes back with the saved values, dtype and shape, in the order it was asked for."""
    store, files = _checkpoint(tmp_path)
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0], max_workers=2)
    got = list(payloads.tensors([(0, "b@0"), (0, "a@0")]))
    assert [place for place, _ in got] == [(0, "b@0"), (0, "a@0")]
    for (_, tensor), expected in zip(got, (B, A), strict=True):
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected)
    assert payloads.damaged == []


def test_a_byte_damaged_on_disk_after_the_check_fails_its_crc32c_every_read_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The range is read READS times, then the load fails naming the file and CRC32C, the range kept in .damaged."""
    store, files = _checkpoint(tmp_path)
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0])
    entry = _entry_of(tmp_path, "0")  # a@0: the skeleton's first tensor
    _flip(_on_disk(tmp_path), entry.start + 5)
    calls = _count_reads(monkeypatch, store)
    with pytest.raises(InvalidCheckpointError) as caught:
        list(payloads.tensors([(0, "a@0")]))
    assert "sharded.safetensors" in caught.value.reason and "CRC32C" in caught.value.reason
    assert "'a@0'" in caught.value.reason and "corrupt" in caught.value.reason
    assert calls == [(entry.start, entry.end)] * READS
    header = statefile.safetensors_layout(TENSORS, _on_disk(tmp_path).read_bytes(), files[TENSORS].size, location=URL)
    assert header.crc32c is not None
    assert payloads.damaged == [DamagedRange(TENSORS, entry.start, entry.end, header.crc32c["0"])]


def test_a_range_that_arrives_damaged_once_is_read_again_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes damaged in transit on the first read only: the second read matches, nothing is recorded damaged."""
    store, files = _checkpoint(tmp_path)
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0])
    entry = _entry_of(tmp_path, "0")

    def once(count: int, data: bytes) -> bytes:
        return bytes([data[0] ^ 0x01]) + data[1:] if count == 1 else data

    calls = _count_reads(monkeypatch, store, once)
    ((_, tensor),) = payloads.tensors([(0, "a@0")])
    assert torch.equal(tensor, A)
    assert calls == [(entry.start, entry.end)] * 2
    assert payloads.damaged == []


def test_a_file_without_per_tensor_crc32cs_is_read_whole_once_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A safetensors file written before podtrain recorded each tensor's CRC32C (the library's own): read whole,
    once for all its tensors, checked by the manifest's CRC32C."""
    store, files = _checkpoint(tmp_path)
    data = library_save({"0": A, "1": B})
    assert statefile.safetensors_layout(TENSORS, data, len(data), location=URL).crc32c is None
    store.put(f"{step_dir(STEP)}/{TENSORS}", data)
    files[TENSORS] = FileEntry(size=len(data), crc32c=checksum.to_hex(checksum.crc32c(data)))
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0])
    gets: list[str] = []
    real_get = store.get

    def get(rel: str) -> bytes:
        gets.append(rel)
        return real_get(rel)

    monkeypatch.setattr(store, "get", get)
    ranged = _count_reads(monkeypatch, store)
    got = dict(payloads.tensors([(0, "a@0"), (0, "b@0")]))
    assert torch.equal(got[(0, "a@0")], A) and torch.equal(got[(0, "b@0")], B)
    assert gets == [f"{step_dir(STEP)}/{TENSORS}"] and ranged == []


def test_a_file_without_per_tensor_crc32cs_that_does_not_match_the_manifest_is_refused_and_recorded(
    tmp_path: Path,
) -> None:
    """Read whole, its bytes are checked against the manifest's CRC32C (there is no other check of them); the whole
    file is then the damaged range, so that the next load reads it again before writing anything."""
    store, files = _checkpoint(tmp_path)
    data = library_save({"0": A, "1": B})
    store.put(f"{step_dir(STEP)}/{TENSORS}", data)
    files[TENSORS] = FileEntry(size=len(data), crc32c=checksum.to_hex(checksum.crc32c(data)))
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0])
    _flip(_on_disk(tmp_path), len(data) - 1)
    with pytest.raises(InvalidCheckpointError, match=r"sharded\.safetensors has CRC32C .* manifest says"):
        list(payloads.tensors([(0, "b@0")]))
    assert payloads.damaged == [DamagedRange(TENSORS, 0, len(data), checksum.crc32c(data))]


def test_a_key_the_rank_did_not_save_is_an_invalid_checkpoint(tmp_path: Path) -> None:
    """Asking for a key none of the rank's files hold (or a rank that saved nothing) names the key."""
    store, files = _checkpoint(tmp_path)
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0])
    with pytest.raises(InvalidCheckpointError, match=r"rank 0 hold no 'c@0'"):
        payloads.lookup(0, "c@0")
    with pytest.raises(InvalidCheckpointError, match=r"rank 0 hold no 'c@0'"):
        list(payloads.tensors([(0, "a@0"), (0, "c@0")]))
    with pytest.raises(InvalidCheckpointError, match=r"rank 3 hold no 'a@0'"):
        payloads.lookup(3, "a@0")


def test_an_object_asked_for_as_a_tensor_is_refused_before_anything_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index says a tensor but the rank saved an object there: refused, naming it, before any range is read."""
    store, files = _checkpoint(tmp_path)
    payloads = _shardread.open_payloads(store, STEP, URL, files, [0])
    calls = _count_reads(monkeypatch, store)
    with pytest.raises(InvalidCheckpointError, match=r"'lr' of rank 0 is a float, the index says a tensor"):
        list(payloads.tensors([(0, "a@0"), (0, "lr")]))
    assert calls == []


@pytest.mark.parametrize("name", [TENSORS, PICKLE], ids=["safetensors", "pickle"])
def test_a_file_whose_size_differs_from_the_manifest_is_found_when_the_payloads_are_opened(
    tmp_path: Path, name: str
) -> None:
    """A truncated payload file is refused up front, before the ranks agree to load (no tensor read yet)."""
    store, files = _checkpoint(tmp_path)
    path = _on_disk(tmp_path, name)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(InvalidCheckpointError, match=rf"{name.rsplit('/', 1)[-1]} is \d+ bytes, manifest says"):
        _shardread.open_payloads(store, STEP, URL, files, [0])


def test_a_payload_file_listed_but_missing_is_found_when_the_payloads_are_opened(tmp_path: Path) -> None:
    """A safetensors file of the manifest that is not in the store is damage found before the load, not a crash."""
    store, files = _checkpoint(tmp_path)
    _on_disk(tmp_path).unlink()
    with pytest.raises(InvalidCheckpointError, match="listed in the manifest but missing"):
        _shardread.open_payloads(store, STEP, URL, files, [0])


def test_still_damaged_is_none_for_a_good_range_and_a_reason_for_a_bad_one(tmp_path: Path) -> None:
    """A range an earlier load found damaged is read again: matching its CRC32C now, it no longer counts."""
    store, _ = _checkpoint(tmp_path)
    entry = _entry_of(tmp_path, "1")
    good = checksum.crc32c(_on_disk(tmp_path).read_bytes()[entry.start : entry.end])
    found = DamagedRange(TENSORS, entry.start, entry.end, good)
    assert _shardread.still_damaged(store, STEP, URL, []) is None
    assert _shardread.still_damaged(store, STEP, URL, [found]) is None
    _flip(_on_disk(tmp_path), entry.end - 1)
    reason = _shardread.still_damaged(store, STEP, URL, [found])
    assert reason is not None and TENSORS in reason and "still fail their CRC32C" in reason
    assert f"{entry.start:,}..{entry.end:,}" in reason
    _on_disk(tmp_path).unlink()
    missing = _shardread.still_damaged(store, STEP, URL, [found])
    assert missing is not None and "missing" in missing
