"""State files: streaming safetensors/torch formats, CRC on write, loading that never runs code."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load

from sdk.checkpoints.serialization import EncodedFile, decode, encode, stem_of
from sdk.errors import InvalidCheckpointError, UnsafeCheckpointError
from sdk.stores import checksum


def _one(stem: str, state: object) -> EncodedFile:
    (encoded,) = encode(stem, state)
    return encoded


class _Exploit:
    """Unpickling this runs a shell command — what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_flat_tensor_state_is_written_as_safetensors_readable_by_the_library() -> None:
    """A model state_dict becomes .safetensors that safetensors itself loads, every dtype intact."""
    state = {
        "w": torch.randn(3, 4),
        "b": torch.randn(4).to(torch.bfloat16),
        "n": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "empty": torch.empty(0, 5),
        "t": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    }
    encoded = _one("model", state)
    assert encoded.name == "model.safetensors"
    loaded = st_load(bytes(encoded.data))  # the library takes bytes; encode() gives the store a bytearray
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
        assert loaded[key].dtype == value.dtype


def test_size_and_crc32c_are_those_of_the_written_bytes() -> None:
    """The CRC computed while writing equals a CRC of the final bytes, for both formats."""
    for state in ({"w": torch.randn(100)}, {"step": 3, "nested": {"lr": 0.1, "t": torch.ones(2)}}):
        encoded = _one("x", state)
        assert encoded.size == len(encoded.data)
        assert encoded.crc32c == checksum.crc32c(encoded.data)


def test_optimizer_state_round_trips_with_weights_only() -> None:
    """An Adam state_dict (nested dicts, tuples, floats, tensors) saves as .pt and loads back with weights_only."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    encoded = _one("optimizer", opt.state_dict())
    assert encoded.name == "optimizer.pt"
    loaded = decode(encoded.name, encoded.data, location="x")
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.9)
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    """A crafted .pt whose unpickling calls os.system is refused before the command runs."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"model": _Exploit(marker)}, buffer)
    with pytest.raises(UnsafeCheckpointError) as info:
        decode("model.pt", buffer.getvalue(), location="file:///ckpt/step-0000000001")
    assert not marker.exists()
    assert "allow-list" in info.value.reason


def test_garbage_bytes_are_an_invalid_checkpoint_not_a_crash() -> None:
    """Random bytes in either format raise InvalidCheckpointError with the file's name."""
    for name in ("model.safetensors", "optimizer.pt"):
        with pytest.raises(InvalidCheckpointError) as info:
            decode(name, b"\x00not a checkpoint at all", location="x")
        assert name in info.value.reason


def test_zero_copy_views_equal_the_library_load_and_share_the_bytes() -> None:
    """zero_copy decode gives the same tensors as safetensors' own load, as views over the downloaded bytes."""
    state = {
        "a": torch.randn(5, 3),
        "b": torch.arange(7, dtype=torch.int16),
        "c": torch.tensor([True]),
        "e": torch.empty(0),
    }
    encoded = _one("model", state)
    views = decode(encoded.name, encoded.data, location="x", zero_copy=True)
    assert set(views) == set(state)
    for key, value in state.items():
        assert torch.equal(views[key], value) and views[key].dtype == value.dtype, key
    assert views["a"].untyped_storage().data_ptr() != state["a"].untyped_storage().data_ptr()


def test_zero_copy_rejects_offsets_outside_the_file() -> None:
    """A safetensors header pointing past the end of the file is an invalid checkpoint, not a crash."""
    encoded = _one("model", {"a": torch.randn(4)})
    with pytest.raises(InvalidCheckpointError, match="offsets"):
        decode(encoded.name, encoded.data[:-4], location="x", zero_copy=True)


def test_a_large_tensor_dict_is_written_as_shards_that_merge_back() -> None:
    """Past shard_bytes a model state becomes model-0000i-of-0000N.safetensors files holding every tensor once."""
    state = {f"w{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    files = list(encode("model", state, shard_bytes=3 * 1024))
    assert [f.name for f in files] == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    merged: dict = {}
    for f in files:
        assert f.crc32c == checksum.crc32c(f.data)
        merged.update(decode(f.name, f.data, location="x"))
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)
    assert {stem_of(f"attempt-1/{f.name}") for f in files} == {"model"}
    assert stem_of("rng.pt") == "rng"


def test_large_tensors_leave_the_pickle_for_safetensors_beside_it_and_come_back() -> None:
    """An optimizer state with big moments: a small .pt skeleton plus .safetensors; assembled, it is equal."""
    from sdk.checkpoints.serialization import SPLIT_BYTES, assemble

    model = torch.nn.Linear(256, 256)  # 256 KiB of weights: its Adam moments are split out
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    files = list(encode("optimizer", state))
    assert [f.name for f in files] == ["optimizer.pt", "optimizer.safetensors"]
    assert files[0].size < SPLIT_BYTES, "the pickle keeps only the structure and small tensors"
    parts = {f.name: decode(f.name, f.data, location="x") for f in files}
    back = assemble(parts)
    assert back["param_groups"] == state["param_groups"]
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            assert torch.equal(back["state"][index][name], value), (index, name)


def test_a_split_state_missing_its_tensor_file_is_an_invalid_checkpoint(tmp_path: Path) -> None:
    """A skeleton whose tensors are gone is refused with the reason, not loaded half-empty."""
    from sdk.checkpoints.checkpointer import Checkpointer
    from sdk.stores.store import open_store

    model = torch.nn.Linear(256, 256)
    Checkpointer(str(tmp_path), attempt=1).save(1, {"extra": {"big": torch.randn(256, 256), "n": 3}})
    manifest = json.loads(open_store(str(tmp_path)).get("step-0000000001/MANIFEST.json"))
    (tensors,) = [name for name in manifest["files"] if name.endswith("/extra.safetensors")]
    (tmp_path / "step-0000000001" / tensors).unlink()
    with pytest.raises(InvalidCheckpointError, match="missing"):
        Checkpointer(str(tmp_path), attempt=2).verify(1)
    assert Checkpointer(str(tmp_path), attempt=2).load({"extra": {}, "model": model}) is None


def test_crc32c_in_slices_equals_one_pass() -> None:
    """The sliced CRC32C (which lets other threads run) equals the CRC32C of the whole buffer."""
    import google_crc32c

    data = os.urandom(3 * checksum.SLICE + 12345)
    assert checksum.crc32c(data) == google_crc32c.value(data)


def _recorded_crcs(data: bytes) -> tuple[dict[str, Any], dict[str, str], int]:
    """The header's tensors, its ``__metadata__`` and where the data starts, parsed here without podtrain's reader."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__")
    return header, metadata, 8 + length


@pytest.mark.parametrize("shard_bytes", [None, 64], ids=["one-file", "shards"])
def test_every_safetensors_file_records_each_tensors_crc32c_and_its_own_is_that_of_its_bytes(
    shard_bytes: int | None,
) -> None:
    """Each tensor's ``crc32c:<name>`` is the CRC32C of its byte range, 8 lowercase hex digits; the file's
    CRC32C (combined from the parts) is that of all its bytes; the safetensors library still loads it."""
    state = {
        "w": torch.randn(4, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "t": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    }
    files = list(encode("model", state, shard_bytes=shard_bytes))
    assert (len(files) > 1) == (shard_bytes is not None)
    seen: set[str] = set()
    for encoded in files:
        data = bytes(encoded.data)
        assert encoded.crc32c == checksum.crc32c(data) and encoded.size == len(data)
        tensors, metadata, base = _recorded_crcs(data)
        assert set(metadata) == {f"crc32c:{name}" for name in tensors}
        for name, spec in tensors.items():
            begin, end = spec["data_offsets"]
            recorded = metadata[f"crc32c:{name}"]
            assert re.fullmatch(r"[0-9a-f]{8}", recorded), recorded
            assert int(recorded, 16) == checksum.crc32c(data[base + begin : base + end]), name
        loaded = st_load(data)
        assert set(loaded) == set(tensors)
        for name, tensor in loaded.items():
            assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype, name
        seen |= set(loaded)
    assert seen == set(state)


def test_the_tensors_a_pickle_leaves_out_have_their_crc32cs_too() -> None:
    """A sharded payload (every tensor out of the pickle, ``split_bytes=0``): its safetensors file records them."""
    pickled, tensors = encode("sharded", {"a@0": torch.randn(3), "step": torch.tensor(4.0), "lr": 0.1}, split_bytes=0)
    assert pickled.name == "sharded.pt" and tensors.name == "sharded.safetensors"
    data = bytes(tensors.data)
    header, metadata, base = _recorded_crcs(data)
    assert set(header) == {"0", "1"}
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        assert int(metadata[f"crc32c:{name}"], 16) == checksum.crc32c(data[base + begin : base + end])
    assert tensors.crc32c == checksum.crc32c(data)
