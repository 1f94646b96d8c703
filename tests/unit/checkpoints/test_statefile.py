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
