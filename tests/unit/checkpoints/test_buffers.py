"""The file buffers a save reuses: same bytes as fresh ones, and only the last save's kept."""

from __future__ import annotations

import torch

from sdk.checkpoints import serialization
from sdk.checkpoints._buffers import FileBuffers


def _files(state: dict[str, torch.Tensor], buffers: FileBuffers | None) -> list[serialization.EncodedFile]:
    return list(serialization.encode("model", state, shard_bytes=64, buffers=buffers))


def test_a_file_built_in_a_reused_buffer_is_byte_for_byte_the_one_built_in_a_fresh_buffer() -> None:
    """The buffer still holds the last save's bytes; every byte of the new file is written over them."""
    first = {"a": torch.arange(12, dtype=torch.float32), "b": torch.ones(5, dtype=torch.int64)}
    second = {"a": -torch.arange(12, dtype=torch.float32), "b": torch.full((5,), 7, dtype=torch.int64)}
    buffers = FileBuffers()
    used = _files(first, buffers)
    buffers.keep(f.data for f in used if isinstance(f.data, bytearray))
    assert buffers.held == sum(f.size for f in used)
    reused = _files(second, buffers)
    assert [id(f.data) for f in reused] == [id(f.data) for f in used]
    fresh = _files(second, None)
    assert [bytes(f.data) for f in reused] == [bytes(f.data) for f in fresh]
    assert [f.crc32c for f in reused] == [f.crc32c for f in fresh]


def test_only_the_last_saves_buffers_are_kept() -> None:
    """Buffers of a size the last save did not use are let go, so a changed layout does not hold both."""
    buffers = FileBuffers()
    buffers.keep([bytearray(10), bytearray(20)])
    buffers.keep([buffers.take(10)])
    assert buffers.held == 10
    assert len(buffers.take(20)) == 20 and buffers.held == 10
    assert buffers.take(10) is not None and buffers.held == 0
