"""sdk.checkpoints._statefile: the one structure check of safetensors headers and torch.save archives, and what writes
agree."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from safetensors.torch import save as library_save

from sdk.checkpoints import _statefile as statefile
from sdk.checkpoints import serialization
from sdk.errors import CheckpointError, InvalidCheckpointError


def _raw(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def test_every_dtype_podtrain_writes_has_its_size_here() -> None:
    """The torch-free table and serialization's torch table agree, code by code and size by size."""
    for dtype, code in serialization._SAFETENSORS_DTYPES.items():
        assert statefile.DTYPE_SIZES[code] == torch.empty((), dtype=dtype).element_size(), code
    assert set(statefile.DTYPE_SIZES) == set(serialization._SAFETENSORS_DTYPES.values())


def test_files_written_by_podtrain_and_by_the_library_pass() -> None:
    """Mixed dtypes, empty and 0-d tensors: both writers' files pass, and views decode to the same values."""
    state = {
        "w": torch.randn(3, 5),
        "h": torch.arange(7, dtype=torch.float16),
        "flag": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }
    for data in (bytes(next(serialization.encode("m", state)).data), library_save(state)):
        entries = statefile.safetensors_header("m.safetensors", data, location="here")
        assert {e.name for e in entries} == set(state)
        views = serialization.decode("m.safetensors", data, location="here", zero_copy=True)
        copies = serialization.decode("m.safetensors", data, location="here")
        for key, tensor in state.items():
            assert torch.equal(views[key], tensor) and torch.equal(copies[key], tensor), key


def test_a_header_length_over_the_library_limit_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The header length is checked against the bound before any of it is read or parsed."""
    monkeypatch.setattr(statefile, "MAX_HEADER_BYTES", 64)
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"k": "v" * 80}}
    data = _raw(header, bytes(4))
    with pytest.raises(InvalidCheckpointError, match=r"header length .* over the limit of 64"):
        statefile.safetensors_header("m.safetensors", data, location="here")


def test_a_shape_of_many_huge_dimensions_is_refused_quickly() -> None:
    """100,000 dimensions of 2**62 would multiply into a number of millions of digits; the count stops early."""
    data = _raw({"a": {"dtype": "F32", "shape": [2**62] * 100_000, "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(InvalidCheckpointError, match="needs more than the 4 bytes of data"):
        statefile.safetensors_header("m.safetensors", data, location="here")


def test_an_archive_that_is_not_a_zip_or_has_no_pickle_is_refused() -> None:
    """A .pt must be a torch.save zip with a data.pkl; the reason says which."""
    with pytest.raises(InvalidCheckpointError, match="not a zip archive"):
        statefile.check("x.pt", b"not a zip at all", location="here")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/version", b"3")
    with pytest.raises(InvalidCheckpointError, match=r"no data\.pkl"):
        statefile.check("x.pt", out.getvalue(), location="here")


def test_a_state_too_deep_to_load_back_is_refused_at_save() -> None:
    """podtrain never writes a pickle it would refuse to read: a state nested past the bound fails the save."""
    deep: object = 0
    for _ in range(serialization.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(CheckpointError, match=r"cannot be saved .* nests deeper than 100 levels"):
        list(serialization.encode("state", {"x": deep}))
    shallow: object = 0
    for _ in range(serialization.MAX_DEPTH - 5):
        shallow = [shallow]
    (encoded,) = serialization.encode("state", {"x": shallow})
    assert serialization.decode(encoded.name, encoded.data, location="here") == {"x": shallow}


def test_shared_containers_within_the_bound_load() -> None:
    """A list referenced many times (not a crafted explosion) still loads: the bound is 8 nodes a byte and more."""
    shared = [1, 2, 3]
    state = {"a": [shared] * 1000}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert serialization.decode("x.pt", buffer.getvalue(), location="here") == state


@pytest.mark.parametrize("value", [torch.arange(3), 7, "text", None], ids=["tensor", "int", "str", "none"])
def test_a_pickle_of_a_single_leaf_loads(value: object) -> None:
    """A state that is one value, not a container, passes the shape check."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    loaded = serialization.decode("x.pt", buffer.getvalue(), location="here")
    assert torch.equal(loaded, value) if isinstance(value, torch.Tensor) else loaded == value


def _podtrain_file() -> bytes:
    state = {"w": torch.randn(3, 5), "h": torch.arange(7, dtype=torch.float16), "empty": torch.empty(0, 4)}
    return bytes(next(serialization.encode("m", state)).data)


def test_a_layout_from_the_header_bytes_alone_equals_the_one_from_the_whole_file() -> None:
    """A reader of byte ranges fetches only up to header_end: it gets the same tensors, offsets and CRC32Cs."""
    data = _podtrain_file()
    end = statefile.header_end("m.safetensors", data[:8], len(data), location="here")
    assert end == 8 + int.from_bytes(data[:8], "little") < len(data)
    head = statefile.safetensors_layout("m.safetensors", data[:end], len(data), location="here")
    whole = statefile.safetensors_layout("m.safetensors", data, len(data), location="here")
    assert head.entries == whole.entries == statefile.safetensors_header("m.safetensors", data, location="here")
    assert head.header_end == whole.header_end == end
    assert head.crc32c == whole.crc32c and head.crc32c is not None and set(head.crc32c) == {"w", "h", "empty"}
    assert head.metadata == whole.metadata
    with pytest.raises(InvalidCheckpointError, match=rf"only {end - 1:,} bytes of a {end:,}-byte header were read"):
        statefile.safetensors_layout("m.safetensors", data[: end - 1], len(data), location="here")


@pytest.mark.parametrize(
    ("head", "size", "reason"),
    [
        (b"\x01\x00\x00", 3, "3 bytes, shorter than the 8-byte header length"),
        ((8).to_bytes(8, "little"), 100, None),  # the 8 bytes read are enough, whatever the file's size
        ((200).to_bytes(8, "little"), 100, "header length 200 does not fit a 100-byte file"),
        ((0).to_bytes(8, "little"), 100, "header length 0 does not fit a 100-byte file"),
        ((2**63).to_bytes(8, "little"), 100, "over the limit of 100,000,000"),
    ],
    ids=["short", "fits", "past-the-end", "empty-header", "over-the-limit"],
)
def test_header_end_refuses_a_short_file_and_a_header_length_that_does_not_fit(
    head: bytes, size: int, reason: str | None
) -> None:
    """The 8-byte length alone decides: too short a file, a length past the file's end or over the bound is refused
    with a one-line reason naming the file."""
    if reason is None:
        assert statefile.header_end("m.safetensors", head, size, location="here") == 16
        return
    with pytest.raises(InvalidCheckpointError) as caught:
        statefile.header_end("m.safetensors", head, size, location="here")
    assert reason in caught.value.reason and "m.safetensors is not a valid safetensors file" in caught.value.reason
    assert "\n" not in str(caught.value)


def _with_crcs(metadata: dict[str, str]) -> bytes:
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
        "__metadata__": metadata,
    }
    return _raw(header, bytes(6))


def _layout(data: bytes) -> statefile.Layout:
    return statefile.safetensors_layout("m.safetensors", data, len(data), location="here")


def test_a_header_without_crc32c_metadata_has_no_per_tensor_crc32cs() -> None:
    """No ``crc32c:`` key (other metadata, or none at all): None, the file is read whole instead."""
    assert _layout(_with_crcs({"format": "pt"})).crc32c is None
    assert _layout(_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))).crc32c is None
    assert _layout(_with_crcs({"crc32c:a": "deadbeef", "crc32c:b": "00000001", "format": "pt"})).crc32c == {
        "a": 0xDEADBEEF,
        "b": 1,
    }


def test_a_tensor_without_its_crc32c_makes_the_file_invalid_naming_it() -> None:
    """Either every tensor has its CRC32C or none does: one left out could not be checked when read by range."""
    with pytest.raises(InvalidCheckpointError, match=r"records CRC32Cs for other tensors than the file holds \('b'\)"):
        _layout(_with_crcs({"crc32c:a": "deadbeef"}))


@pytest.mark.parametrize("value", ["DEADBEEF", "deadbee", "deadbeef0", "xyzxyzxy", " deadbee", ""])
def test_a_crc32c_that_is_not_8_lowercase_hex_digits_makes_the_file_invalid(value: str) -> None:
    with pytest.raises(InvalidCheckpointError, match=r"the CRC32C of 'b' is .* not 8 lowercase hex digits"):
        _layout(_with_crcs({"crc32c:a": "deadbeef", "crc32c:b": value}))


def test_a_crc32c_for_a_tensor_the_file_does_not_hold_makes_it_invalid() -> None:
    """An extra ``crc32c:`` key names no tensor of the file: refused, naming it."""
    with pytest.raises(InvalidCheckpointError, match=r"other tensors than the file holds \('ghost'\)"):
        _layout(_with_crcs({"crc32c:a": "deadbeef", "crc32c:b": "00000001", "crc32c:ghost": "00000002"}))
