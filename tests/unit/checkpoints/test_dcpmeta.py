"""The index of a sharded checkpoint (sharded.json): a valid one round-trips, every malformed one is refused by rule."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.errors import InvalidCheckpointError

LOCATION = "mem://ckpt/step-0000000010"


def _chunk(offsets: list[Any], sizes: list[Any], rank: Any = 0, key: Any = "k") -> dict[str, Any]:
    return {"offsets": offsets, "sizes": sizes, "rank": rank, "key": key}


def _tensor(size: list[Any], chunks: list[dict[str, Any]], dtype: Any = "float32") -> dict[str, Any]:
    return {"dtype": dtype, "size": size, "requires_grad": False, "chunks": chunks}


def _doc(**changes: Any) -> dict[str, Any]:
    """A valid index of two ranks: a [4, 3] weight in two row slabs, a replicated bias, a scalar, an object."""
    doc: dict[str, Any] = {
        "format": dcpmeta.FORMAT,
        "world_size": 2,
        "version": "2.6.0",
        "tensors": {
            "model.weight": _tensor(
                [4, 3], [_chunk([0, 0], [2, 3], 0, "model.weight@0.0"), _chunk([2, 0], [2, 3], 1, "model.weight@2.0")]
            ),
            "model.bias": _tensor([3], [_chunk([0], [3], 0, "model.bias@0")]),
            "optim.state.weight.step": _tensor([], [_chunk([], [], 1, "optim.state.weight.step@")]),
        },
        "objects": {"optim.param_groups.0.lr": {"rank": 0, "key": "optim.param_groups.0.lr"}},
        "paths": {
            "model.weight": ["model", "weight"],
            "model.bias": ["model", "bias"],
            "optim.state.weight.step": ["optim", "state", "weight", "step"],
            "optim.param_groups.0.lr": ["optim", "param_groups", 0, "lr"],
        },
    }
    doc.update(changes)
    return doc


def _with_tensor(size: list[Any], chunks: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """The valid index with one more tensor ``t``."""
    doc = _doc()
    doc["tensors"]["t"] = {**_tensor(size, chunks), **spec}
    return doc


def _refusal(document: dict[str, Any] | bytes) -> str:
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(InvalidCheckpointError) as info:
        dcpmeta.check(raw, location=LOCATION)
    assert LOCATION in str(info.value)
    return info.value.reason


def test_a_valid_index_round_trips_through_json_and_dcp_metadata() -> None:
    """dumps → check → to_metadata → from_metadata gives the same index, and the same bytes again."""
    index = dcpmeta.check(json.dumps(_doc()).encode(), location=LOCATION)
    assert index.world_size == 2 and index.version == "2.6.0"
    weight = index.tensors["model.weight"]
    assert (weight.dtype, weight.size, weight.requires_grad) == ("float32", (4, 3), False)
    assert [(c.offsets, c.sizes, c.rank, c.key) for c in weight.chunks] == [
        ((0, 0), (2, 3), 0, "model.weight@0.0"),
        ((2, 0), (2, 3), 1, "model.weight@2.0"),
    ]
    assert index.objects == {"optim.param_groups.0.lr": (0, "optim.param_groups.0.lr")}
    assert index.paths["optim.param_groups.0.lr"] == ("optim", "param_groups", 0, "lr")

    raw = dcpmeta.dumps(index)
    assert dcpmeta.check(raw, location=LOCATION) == index
    metadata = dcpmeta.to_metadata(index, location=LOCATION)
    again = dcpmeta.from_metadata(metadata, metadata.storage_data, index.world_size)
    assert again == index
    assert dcpmeta.dumps(again) == raw


def test_to_metadata_gives_dcp_the_dtypes_sizes_and_places() -> None:
    """Each chunk's MetadataIndex maps to its (rank, key); dtypes are torch dtypes, objects bytes entries."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    metadata = dcpmeta.to_metadata(dcpmeta.check(json.dumps(_doc()).encode(), location=LOCATION), location=LOCATION)
    weight = metadata.state_dict_metadata["model.weight"]
    assert isinstance(weight, TensorStorageMetadata)
    assert weight.properties.dtype == torch.float32 and weight.size == torch.Size([4, 3])
    assert isinstance(metadata.state_dict_metadata["optim.param_groups.0.lr"], BytesStorageMetadata)
    assert metadata.storage_data[MetadataIndex("model.weight", torch.Size([2, 0]))] == (1, "model.weight@2.0")
    assert metadata.storage_data[MetadataIndex("optim.param_groups.0.lr")] == (0, "optim.param_groups.0.lr")


def test_bad_json_is_refused() -> None:
    assert "not valid JSON" in _refusal(b'{"format": "podtrain.sharded/1", "tensors": ')


@pytest.mark.parametrize("document", [_doc(format="podtrain.sharded/9"), _doc(format=None), [1, 2]])
def test_an_unknown_format_is_refused(document: Any) -> None:
    raw = json.dumps(document).encode()
    assert "unknown format" in _refusal(raw)


def test_an_index_nested_past_the_bound_is_refused_before_parsing() -> None:
    deep: Any = "x"
    for _ in range(dcpmeta.MAX_DEPTH):
        deep = [deep]
    assert "nested" in _refusal(_doc(version=deep))
    assert "nested" in _refusal(b"[" * 100_000 + b"]" * 100_000)


def test_a_key_twice_in_one_object_is_refused() -> None:
    raw = json.dumps(_doc()).encode().replace(b'"version":', b'"world_size": 1, "version":', 1)
    assert "duplicate key 'world_size'" in _refusal(raw)


@pytest.mark.parametrize("world", [0, -1, True, 2.0, "2", None])
def test_a_world_size_that_is_not_a_positive_integer_is_refused(world: Any) -> None:
    assert "world_size" in _refusal(_doc(world_size=world))


@pytest.mark.parametrize("dtype", ["torch.float32", "float 32", "", 7, None])
def test_a_dtype_that_is_not_a_name_is_refused(dtype: Any) -> None:
    doc = _doc()
    doc["tensors"]["model.bias"]["dtype"] = dtype
    assert "is not a dtype name" in _refusal(doc)


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("size", [-4, 3], "size"),
        ("size", [4.0, 3], "size"),
        ("size", [True, 3], "size"),
        ("size", "4x3", "size"),
        ("offsets", [0, -1], "chunk offsets"),
        ("offsets", [0, 0.5], "chunk offsets"),
        ("offsets", [False, 0], "chunk offsets"),
        ("sizes", [2, -3], "chunk sizes"),
        ("sizes", [2, "3"], "chunk sizes"),
        ("sizes", [2, True], "chunk sizes"),
    ],
)
def test_sizes_and_offsets_must_be_non_negative_integers_not_bools(field: str, value: Any, rule: str) -> None:
    """A bool is an int to Python, never to the index."""
    doc = _doc()
    weight = doc["tensors"]["model.weight"]
    if field == "size":
        weight["size"] = value
    else:
        weight["chunks"][0][field] = value
    reason = _refusal(doc)
    assert rule in reason and "non-negative integers" in reason


@pytest.mark.parametrize("rank", [True, -1, 1.0, "0", None])
def test_a_rank_that_is_not_a_non_negative_integer_is_refused(rank: Any) -> None:
    doc = _doc()
    doc["tensors"]["model.bias"]["chunks"][0]["rank"] = rank
    assert "is not one of the 2 ranks that saved" in _refusal(doc)


def test_a_rank_at_or_past_the_world_size_is_refused() -> None:
    doc = _doc()
    doc["tensors"]["model.bias"]["chunks"][0]["rank"] = 2
    assert "rank 2 is not one of the 2 ranks that saved" in _refusal(doc)
    doc = _doc()
    doc["objects"]["optim.param_groups.0.lr"]["rank"] = 5
    assert "rank 5 is not one of the 2 ranks" in _refusal(doc)


def test_requires_grad_must_be_a_boolean() -> None:
    doc = _doc()
    doc["tensors"]["model.bias"]["requires_grad"] = 1
    assert "requires_grad is not a boolean" in _refusal(doc)


def test_a_tensor_without_chunks_is_refused() -> None:
    doc = _doc()
    doc["tensors"]["model.bias"]["chunks"] = []
    assert "no chunks" in _refusal(doc)


@pytest.mark.parametrize(
    ("offsets", "sizes"), [([0], [4]), ([0, 0, 0], [4, 3, 1]), ([0, 0], [4]), ([0], [4, 3])], ids=str
)
def test_a_chunk_with_the_wrong_number_of_dimensions_is_refused(offsets: list[int], sizes: list[int]) -> None:
    assert "dimensions" in _refusal(_with_tensor([4, 3], [_chunk(offsets, sizes)]))


@pytest.mark.parametrize(
    ("offsets", "sizes"), [([0, 0], [5, 3]), ([0, 1], [4, 3]), ([4, 0], [1, 3]), ([10**20, 0], [0, 3])], ids=str
)
def test_a_chunk_reaching_past_its_tensor_is_refused(offsets: list[int], sizes: list[int]) -> None:
    assert "reaches past its size [4, 3]" in _refusal(_with_tensor([4, 3], [_chunk(offsets, sizes)]))


def test_overlapping_row_slabs_are_refused_even_when_the_volumes_add_up() -> None:
    """[0:3] and [2:4] overlap on row 2; a gap elsewhere would make the volumes match, so the sweep must see it."""
    chunks = [_chunk([0, 0], [3, 3], key="a"), _chunk([2, 0], [1, 3], key="b")]  # 9 + 3 = 12, row 3 uncovered
    assert "overlap" in _refusal(_with_tensor([4, 3], chunks))


def test_2d_boxes_overlapping_in_both_dimensions_are_refused() -> None:
    """A column and a row of a 2x2 tensor (2 + 2 = 4 elements) share the element at (0, 0)."""
    chunks = [_chunk([0, 0], [2, 1], key="column"), _chunk([0, 0], [1, 2], key="row")]
    assert "overlap" in _refusal(_with_tensor([2, 2], chunks))
    corners = [_chunk([0, 0], [2, 2], key="a"), _chunk([1, 1], [2, 2], key="b"), _chunk([0, 2], [1, 1], key="c")]
    assert "overlap" in _refusal(_with_tensor([3, 3], corners))  # 4 + 4 + 1 = 9, sharing (1, 1)


def test_2d_boxes_sharing_rows_but_not_columns_tile_a_tensor() -> None:
    """Bricks: boxes that overlap along the first dimension only, or touch at an edge, do not overlap."""
    bricks = [
        _chunk([0, 0], [1, 2], key="a"),
        _chunk([0, 2], [1, 2], key="b"),
        _chunk([1, 0], [1, 1], key="c"),
        _chunk([1, 1], [1, 2], key="d"),
        _chunk([1, 3], [1, 1], key="e"),
        _chunk([2, 0], [1, 4], key="f"),
    ]
    index = dcpmeta.check(json.dumps(_with_tensor([3, 4], bricks)).encode(), location=LOCATION)
    assert len(index.tensors["t"].chunks) == 6


def test_chunks_that_leave_a_gap_are_refused() -> None:
    chunks = [_chunk([0, 0], [2, 3], key="a"), _chunk([3, 0], [1, 3], key="b")]
    assert "do not cover its size [4, 3] exactly" in _refusal(_with_tensor([4, 3], chunks))


def test_a_scalar_saved_in_two_chunks_is_refused() -> None:
    """A scalar is one chunk of no dimensions; two would each claim the one element."""
    chunks = [_chunk([], [], key="a"), _chunk([], [], key="b")]
    reason = _refusal(_with_tensor([], chunks))
    assert "tensor 't'" in reason
    assert "do not cover" in reason or "scalar saved in 2 chunks" in reason


def test_empty_chunks_of_an_empty_tensor_are_fine() -> None:
    """A tensor of no elements has chunks of no elements: nothing to overlap, nothing to cover."""
    chunks = [_chunk([0, 0], [0, 3], key="a"), _chunk([0, 0], [0, 3], key="b")]
    index = dcpmeta.check(json.dumps(_with_tensor([0, 3], chunks)).encode(), location=LOCATION)
    assert index.tensors["t"].size == (0, 3)


@pytest.mark.parametrize("where", ["tensors", "objects", "paths"])
@pytest.mark.parametrize("name", ["", "a\nb", "a\x00b", "x" * (dcpmeta.MAX_KEY + 1)], ids=repr)
def test_an_empty_long_or_control_character_name_is_refused(where: str, name: str) -> None:
    doc = _doc()
    entry = next(iter(doc[where].values()))
    doc[where][name] = entry
    assert "is empty, too long or holds a control character" in _refusal(doc)


@pytest.mark.parametrize("key", ["", 7, None, "k" * (dcpmeta.MAX_KEY + 1)], ids=repr)
def test_an_empty_or_non_string_key_is_refused(key: Any) -> None:
    doc = _doc()
    doc["tensors"]["model.bias"]["chunks"][0]["key"] = key
    assert "is not a name" in _refusal(doc)
    doc = _doc()
    doc["objects"]["optim.param_groups.0.lr"]["key"] = key
    assert "is not a name" in _refusal(doc)


@pytest.mark.parametrize("key", ["a\nb", "a\x00b", "\x1b[2Jk"], ids=repr)
def test_a_key_with_a_control_character_is_refused(key: str) -> None:
    doc = _doc()
    doc["tensors"]["model.bias"]["chunks"][0]["key"] = key
    assert "is not a name" in _refusal(doc)


def test_a_name_both_tensor_and_object_is_refused() -> None:
    doc = _doc()
    doc["objects"]["model.bias"] = {"rank": 0, "key": "model.bias"}
    assert "'model.bias' is listed both as a tensor and as an object" in _refusal(doc)


@pytest.mark.parametrize("path", [[], "model.bias", ["model", -1], ["model", None], ["model", True]], ids=repr)
def test_a_path_that_is_not_names_and_indices_is_refused(path: Any) -> None:
    doc = _doc()
    doc["paths"]["model.bias"] = path
    assert "is not a list of names and indices" in _refusal(doc)


@pytest.mark.parametrize("field", ["tensors", "objects", "paths"])
def test_sections_that_are_not_objects_are_refused(field: str) -> None:
    assert "must be objects" in _refusal(_doc(**{field: []}))


@pytest.mark.parametrize("dtype", ["float33", "Tensor", "__class__", "nn"])
def test_a_dtype_torch_does_not_have_is_refused_by_check_and_by_to_metadata(dtype: str) -> None:
    """check() knows torch's dtype names without torch (so `checkpoints verify` refuses the index); to_metadata()
    looks the name up in torch itself, for an index built any other way."""
    doc = _doc()
    doc["tensors"]["model.bias"]["dtype"] = dtype
    assert f"dtype {dtype!r} is not a dtype name" in _refusal(doc)
    index = dcpmeta.check(json.dumps(_doc()).encode(), location=LOCATION)
    bogus = dataclasses.replace(index.tensors["model.bias"], dtype=dtype)
    forged = dataclasses.replace(index, tensors={**index.tensors, "model.bias": bogus})
    with pytest.raises(InvalidCheckpointError, match=f"'model.bias' has unknown dtype '{dtype}'"):
        dcpmeta.to_metadata(forged, location=LOCATION)


def test_an_index_of_ten_thousand_row_slabs_is_checked() -> None:
    """One tensor saved in 10,000 slabs along its first dimension (the sweep keeps one slab active)."""
    n = 10_000
    chunks = [_chunk([i, 0], [1, 8], rank=i % 2, key=f"t@{i}.0") for i in range(n)]
    index = dcpmeta.check(json.dumps(_with_tensor([n, 8], chunks)).encode(), location=LOCATION)
    assert len(index.tensors["t"].chunks) == n


def test_an_index_of_four_thousand_column_slabs_is_checked() -> None:
    """The cover check does not depend on the dimension a tensor was cut along (a sweep along the first one alone
    compared every column slab with every other: minutes for a crafted index of 10^6)."""
    n = 4_000
    chunks = [_chunk([0, i], [8, 1], rank=i % 2, key=f"t@0.{i}") for i in range(n)]
    index = dcpmeta.check(json.dumps(_with_tensor([8, n], chunks)).encode(), location=LOCATION)
    assert len(index.tensors["t"].chunks) == n


def test_a_two_dimensional_grid_of_chunks_is_checked_and_an_overlap_in_it_found() -> None:
    """FSDP rows by tensor-parallel columns: a 32 by 32 grid checks; a chunk moved onto its neighbour is found."""
    chunks = [
        _chunk([4 * r, 2 * c], [4, 2], rank=(32 * r + c) % 2, key=f"t@{r}.{c}") for r in range(32) for c in range(32)
    ]
    index = dcpmeta.check(json.dumps(_with_tensor([128, 64], chunks)).encode(), location=LOCATION)
    assert len(index.tensors["t"].chunks) == 1024
    chunks[5] = _chunk([0, 8], [4, 2], rank=1, key="t@0.5")  # covers what chunks[4] covers; [0, 10] is left bare
    assert "chunks at [0, 8] and [0, 8] overlap" in _refusal(_with_tensor([128, 64], chunks))


def test_chunks_cut_into_far_more_pieces_than_a_grid_are_refused_unchecked() -> None:
    """Crafted boundaries — every row of a square split at its own column, an exact cover of 2n chunks — cut it
    into n^2 grid cells; such an index is refused, naming the count, instead of being checked for minutes."""
    n = 2000
    chunks = []
    for i in range(n):
        chunks.append(_chunk([i, 0], [1, i + 1], rank=0, key=f"t@{i}.0"))
        if i + 1 < n:
            chunks.append(_chunk([i, i + 1], [1, n - i - 1], rank=1, key=f"t@{i}.{i + 1}"))
    assert "cut it into 4,000,000 pieces" in _refusal(_with_tensor([n, n], chunks))
