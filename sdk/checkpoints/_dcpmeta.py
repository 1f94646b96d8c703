"""The index of a sharded checkpoint (``sharded.json``): which chunk of which tensor is where, as checked JSON.

torch.distributed.checkpoint (DCP) describes a sharded checkpoint with a ``Metadata`` object — every tensor's
dtype and global size, the chunks (offsets, sizes) it was saved in, and where each chunk's bytes are — and its own
storage writes it with ``pickle``, which runs whatever a crafted file asks for. podtrain writes the same facts as
JSON instead, and reads them back through :func:`check` first (no torch needed: ``checkpoints verify`` runs it
too), which refuses, naming the rule:

* a document over :data:`MAX_BYTES`, nested deeper than :data:`MAX_DEPTH`, or with a key twice in one object;
* an unknown format; a dtype that is not a torch dtype; sizes, offsets or ranks that are not non-negative
  integers; a rank outside the saving world; a chunk with the wrong number of dimensions or reaching past the
  tensor;
* chunks that overlap, or do not cover their tensor exactly — a load would otherwise leave part of a parameter
  as it was before the load, silently (volumes are summed; overlaps are found on the grid of the chunks' own
  boundaries, in time about proportional to the number of chunks along any dimension; an index cut into far
  more grid cells than it has chunks is refused as crafted).

Each chunk and object names its place as ``(rank, key)``: the rank whose files hold it, and its name in them
(its ``sharded`` payload, :mod:`sdk.checkpoints._sharded`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from array import array
from dataclasses import dataclass
from typing import Any, TypeGuard

from sdk.checkpoints import manifest
from sdk.errors import InvalidCheckpointError, MalformedDocumentError
from sdk.stores import boundedjson

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "MAX_BYTES",
    "Chunk",
    "Index",
    "TensorEntry",
    "check",
    "dumps",
    "from_metadata",
    "to_metadata",
]

FORMAT = "podtrain.sharded/1"
INDEX_NAME = manifest.INDEX_NAME
MAX_BYTES = 256 * 2**20  # ~1 million chunks; a 70B model on 1,024 ranks needs ~1/10 of that
MAX_DEPTH = 8  # {"tensors": {fqn: {"chunks": [{"offsets": [..]}]}}} is 5; planner paths add one
MAX_KEY = 4096  # characters in an fqn or a payload key
# torch dtype names a checkpoint may hold (to_metadata looks each up in torch itself)
DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "complex128",
        "complex64",
        "complex32",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint64",
        "uint32",
        "uint16",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    }
)
_CONTROL = re.compile(r"[\x00-\x1f]")  # searched in C: a per-character loop was a third of the check
_CELLS_PER_CHUNK = 8  # grid cells per chunk beyond which an index is refused unchecked (a grid has one per chunk)


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One saved piece of a tensor, and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    rank: int
    key: str


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """A tensor of the checkpoint: dtype name (``float32``), global size, chunks."""

    dtype: str
    size: tuple[int, ...]
    requires_grad: bool
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True, kw_only=True)
class Index:
    """A checked ``sharded.json``: tensors and objects by fully qualified name, and DCP's flattening paths."""

    world_size: int
    tensors: dict[str, TensorEntry]
    objects: dict[str, tuple[int, str]]  # fqn -> (rank, key)
    paths: dict[str, tuple[str | int, ...]]
    version: str | None


def dumps(index: Index) -> bytes:
    """The index as written to the store (keys sorted, so equal checkpoints give equal bytes)."""
    document = {
        "format": FORMAT,
        "world_size": index.world_size,
        "version": index.version,
        "tensors": {
            fqn: {
                "dtype": t.dtype,
                "size": list(t.size),
                "requires_grad": t.requires_grad,
                "chunks": [
                    {"offsets": list(c.offsets), "sizes": list(c.sizes), "rank": c.rank, "key": c.key} for c in t.chunks
                ],
            }
            for fqn, t in sorted(index.tensors.items())
        },
        "objects": {fqn: {"rank": r, "key": k} for fqn, (r, k) in sorted(index.objects.items())},
        "paths": {fqn: list(path) for fqn, path in sorted(index.paths.items())},
    }
    return json.dumps(document, separators=(",", ":")).encode()


def check(data: bytes, *, location: str, name: str = "sharded.json") -> Index:
    """Parse and check an index; any problem is an :class:`InvalidCheckpointError` naming the rule."""

    def bad(why: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(location, f"{name}: {why}")

    try:
        doc = boundedjson.loads(data, what=name, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH, unique_keys=True)
    except MalformedDocumentError as exc:
        raise bad(exc.reason) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise bad(f"unknown format {found!r}; this podtrain reads {FORMAT!r}")
    world = doc.get("world_size")
    if not _natural(world) or world < 1:
        raise bad(f"world_size {world!r} is not a positive integer")
    version = doc.get("version")
    if version is not None and not isinstance(version, str):
        raise bad("version is not a string")
    tensors, objects, paths = doc.get("tensors"), doc.get("objects"), doc.get("paths")
    if not isinstance(tensors, dict) or not isinstance(objects, dict) or not isinstance(paths, dict):
        raise bad("'tensors', 'objects' and 'paths' must be objects")
    index = Index(
        world_size=world,
        tensors={_fqn(fqn, bad): _tensor(fqn, spec, world, bad) for fqn, spec in tensors.items()},
        objects={_fqn(fqn, bad): _place(fqn, spec, world, bad) for fqn, spec in objects.items()},
        paths={_fqn(fqn, bad): _path(fqn, path, bad) for fqn, path in paths.items()},
        version=version,
    )
    both = set(index.tensors) & set(index.objects)
    if both:
        raise bad(f"{sorted(both)[0]!r} is listed both as a tensor and as an object")
    return index


def _tensor(fqn: str, spec: Any, world: int, bad: Any) -> TensorEntry:
    if not isinstance(spec, dict):
        raise bad(f"tensor {fqn!r}: its entry is not an object")
    dtype, size, grad, chunks = spec.get("dtype"), spec.get("size"), spec.get("requires_grad"), spec.get("chunks")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"tensor {fqn!r}: dtype {dtype!r} is not a dtype name")
    shape = _dims(size, f"tensor {fqn!r}: size", bad)
    if not isinstance(grad, bool):
        raise bad(f"tensor {fqn!r}: requires_grad is not a boolean")
    if not isinstance(chunks, list) or not chunks:
        raise bad(f"tensor {fqn!r}: no chunks")
    parsed = tuple(_chunk(fqn, c, shape, world, bad) for c in chunks)
    _check_cover(fqn, shape, parsed, bad)
    return TensorEntry(dtype=dtype, size=shape, requires_grad=grad, chunks=parsed)


def _chunk(fqn: str, spec: Any, shape: tuple[int, ...], world: int, bad: Any) -> Chunk:
    if not isinstance(spec, dict):
        raise bad(f"tensor {fqn!r}: a chunk is not an object")
    offsets = _dims(spec.get("offsets"), f"tensor {fqn!r}: chunk offsets", bad)
    sizes = _dims(spec.get("sizes"), f"tensor {fqn!r}: chunk sizes", bad)
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise bad(f"tensor {fqn!r}: a chunk has {len(offsets)}/{len(sizes)} dimensions, the tensor {len(shape)}")
    if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
        raise bad(f"tensor {fqn!r}: chunk at {list(offsets)} of {list(sizes)} reaches past its size {list(shape)}")
    rank, key = _place(fqn, spec, world, bad)
    return Chunk(offsets=offsets, sizes=sizes, rank=rank, key=key)


def _check_cover(fqn: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...], bad: Any) -> None:
    """The chunks tile the tensor: their volumes add up to the tensor's, and no two overlap.

    Overlaps are found on the grid the chunks' own boundaries cut the tensor into: every chunk marks the grid
    cells it covers, and a cell marked twice is an overlap. DCP's chunks are grids (FSDP rows, tensor-parallel
    columns, both), so there are about as many cells as chunks, whatever dimension a tensor was cut along; an
    index whose boundaries would make many more cells than chunks is crafted, and refused rather than checked.
    """
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
        raise bad(f"tensor {fqn!r}: its chunks do not cover its size {list(shape)} exactly")
    boxes = [c for c in chunks if math.prod(c.sizes)]
    if len(boxes) < 2:
        return
    dims = range(len(shape))
    cuts = [sorted({b.offsets[d] for b in boxes} | {b.offsets[d] + b.sizes[d] for b in boxes}) for d in dims]
    cells = math.prod(len(cut) - 1 for cut in cuts)
    if cells > _CELLS_PER_CHUNK * len(boxes) + 4096:
        raise bad(f"tensor {fqn!r}: its {len(boxes)} chunks cut it into {cells:,} pieces; DCP's chunks form a grid")
    positions = [{value: i for i, value in enumerate(cut)} for cut in cuts]
    strides = [math.prod(len(cut) - 1 for cut in cuts[d + 1 :]) for d in dims]
    owner = array("l", [0]) * cells  # per grid cell: 1 + the index of the box that covers it
    for number, box in enumerate(boxes, 1):
        spans = [range(positions[d][box.offsets[d]], positions[d][box.offsets[d] + box.sizes[d]]) for d in dims]
        for cell in itertools.product(*spans):
            at = sum(i * stride for i, stride in zip(cell, strides, strict=True))
            if owner[at]:
                other = boxes[owner[at] - 1]
                raise bad(f"tensor {fqn!r}: chunks at {list(other.offsets)} and {list(box.offsets)} overlap")
            owner[at] = number


def _place(fqn: str, spec: Any, world: int, bad: Any) -> tuple[int, str]:
    if not isinstance(spec, dict):
        raise bad(f"{fqn!r}: its entry is not an object")
    rank, key = spec.get("rank"), spec.get("key")
    if not _natural(rank) or rank >= world:
        raise bad(f"{fqn!r}: rank {rank!r} is not one of the {world} ranks that saved")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY or _CONTROL.search(key):
        raise bad(f"{fqn!r}: key {key!r} is not a name")
    return rank, key


def _path(fqn: str, path: Any, bad: Any) -> tuple[str | int, ...]:
    if not isinstance(path, list) or not path or not all(isinstance(p, str) or _natural(p) for p in path):
        raise bad(f"{fqn!r}: path {path!r} is not a list of names and indices")
    return tuple(path)


def _fqn(fqn: str, bad: Any) -> str:
    if not fqn or len(fqn) > MAX_KEY or _CONTROL.search(fqn):
        raise bad(f"name {fqn[:80]!r} is empty, too long or holds a control character")
    return fqn


def _dims(value: Any, what: str, bad: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64 or not all(_natural(v) for v in value):
        raise bad(f"{what} {value!r} is not a list of non-negative integers")
    return tuple(value)


def _natural(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- DCP's objects (these need torch) -------------------------------------------------------------------------------
def from_metadata(metadata: Any, places: dict[Any, tuple[int, str]], world_size: int) -> Index:
    """An index from DCP's ``Metadata`` and the place of every item (keyed by DCP's ``MetadataIndex``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    by_index = {(i.fqn, None if i.offset is None else tuple(i.offset)): place for i, place in places.items()}
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, tuple[int, str]] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            chunks = []
            for chunk in meta.chunks:
                rank, key = _lookup(by_index, fqn, tuple(chunk.offsets))
                chunks.append(Chunk(offsets=tuple(chunk.offsets), sizes=tuple(chunk.sizes), rank=rank, key=key))
            tensors[fqn] = TensorEntry(
                dtype=str(meta.properties.dtype).removeprefix("torch."),
                size=tuple(meta.size),
                requires_grad=bool(meta.properties.requires_grad),
                chunks=tuple(chunks),
            )
        else:
            objects[fqn] = _lookup(by_index, fqn, None)
    paths = {fqn: tuple(path) for fqn, path in (metadata.planner_data or {}).items()}
    return Index(world_size=world_size, tensors=tensors, objects=objects, paths=paths, version=metadata.version)


def _lookup(
    by_index: dict[tuple[str, tuple[int, ...] | None], tuple[int, str]], fqn: str, offsets: tuple[int, ...] | None
) -> tuple[int, str]:
    try:
        return by_index[(fqn, offsets)]
    except KeyError:
        raise ValueError(f"no rank of the plan saves {fqn!r} at {offsets}") from None


def to_metadata(index: Index, *, location: str) -> Any:
    """DCP's ``Metadata`` for a checked index; ``storage_data`` maps each ``MetadataIndex`` to ``(rank, key)``."""
    import torch
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    state: dict[str, Any] = {}
    storage: dict[Any, tuple[int, str]] = {}
    for fqn, t in index.tensors.items():
        dtype = getattr(torch, t.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidCheckpointError(location, f"sharded.json: tensor {fqn!r} has unknown dtype {t.dtype!r}")
        chunks = []
        for c in t.chunks:
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)))
            storage[MetadataIndex(fqn, torch.Size(c.offsets))] = (c.rank, c.key)
        properties = TensorProperties(dtype=dtype, requires_grad=t.requires_grad)
        state[fqn] = TensorStorageMetadata(properties=properties, size=torch.Size(t.size), chunks=chunks)
    for fqn, place in index.objects.items():
        state[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = place
    return Metadata(
        state_dict_metadata=state, planner_data=dict(index.paths), storage_data=storage, version=index.version
    )
