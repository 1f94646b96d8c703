"""State to bytes and back, with size and CRC32C computed while writing, and loading that never runs code.

Two formats:

* ``.safetensors`` for a flat ``{name: tensor}`` state (a model's ``state_dict()``), written here and read back
  with the ``safetensors`` library.
* ``.pt`` for everything else (optimizer, scheduler, scaler, data position, RNG): ``torch.save``, read back with
  ``torch.load(weights_only=True)``. Only an explicit allow-list of globals is accepted, so a crafted pickle is
  refused before any of its code can run. Tensors of 64 KiB or more are taken *out* of the pickle into
  ``<stem>.safetensors`` (or shards) beside it, and the pickle keeps a placeholder for each: an optimizer's
  moments (twice the model for Adam) are then written like the model.

**Written for a background thread.** An asynchronous save serializes while the training thread runs, so the
GIL must be held as little as possible: tensor bytes are gathered with torch's ``copy_`` (which releases the
GIL) into the preallocated ``bytearray`` that is the file (no second copy into ``bytes``), and checksummed in
1 MiB slices (:func:`sdk.stores.checksum.crc32c`), so the training thread gets the GIL back between slices.
Streaming through ``BytesIO`` held the GIL for every copy and stalled the training thread for up to a quarter
second at a time.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, cast

import torch

from sdk.checkpoints import _statefile as statefile
from sdk.checkpoints._buffers import FileBuffers
from sdk.checkpoints._tree import map_leaves
from sdk.checkpoints.manifest import stem_of
from sdk.errors import CheckpointError, InvalidCheckpointError, UnsafeCheckpointError
from sdk.stores import checksum
from sdk.stores.checksum import ChecksumWriter

__all__ = ["SHARD_BYTES", "SPLIT_BYTES", "EncodedFile", "assemble", "decode", "dtype_of", "encode", "stem_of"]

_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _SAFETENSORS_DTYPES[torch.float8_e4m3fn] = "F8_E4M3"
    _SAFETENSORS_DTYPES[torch.float8_e5m2] = "F8_E5M2"


@dataclass(frozen=True)
class EncodedFile:
    """A serialized state file: its name in the step folder, bytes, size and CRC32C."""

    name: str
    data: bytes | bytearray  # a bytearray for safetensors files: the buffer the tensors were copied into
    size: int
    crc32c: int


SHARD_BYTES = 128 * 2**20
SPLIT_BYTES = 64 * 2**10  # tensors this large or larger go out of a pickle into safetensors beside it
_PLACEHOLDER = "__podtrain_tensor__"


def encode(
    stem: str,
    state: Any,
    *,
    shard_bytes: int | None = None,
    split_bytes: int = SPLIT_BYTES,
    buffers: FileBuffers | None = None,
) -> Iterator[EncodedFile]:
    """Serialize one state (a ``state_dict()`` result or a plain mapping) into files.

    A flat tensor dict becomes ``<stem>.safetensors``, or ``<stem>-00001-of-0000N.safetensors`` shards of about
    ``shard_bytes`` (default :data:`SHARD_BYTES`) when it is larger, so that a caller can upload one shard
    while the next is serialized. Anything else becomes ``<stem>.pt`` plus, when it holds tensors of
    ``split_bytes`` (default :data:`SPLIT_BYTES`) or more, those tensors as safetensors files named like the above.
    Files are yielded as they are finished; a safetensors file is built in a buffer from ``buffers`` when given
    (:mod:`sdk.checkpoints._buffers`: reused from the last save). A rank's sharded payload (many small tensors:
    biases, norms, Adam's step counts) takes every tensor out (``split_bytes=0``): unpickling them one by one cost
    more than its file.
    """
    limit = SHARD_BYTES if shard_bytes is None else shard_bytes
    if not _is_flat_tensor_dict(state):
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _extract(state, tensors, split_bytes)
        encoded = _encoded(f"{stem}.pt", lambda writer: torch.save(skeleton, cast(IO[bytes], writer)))
        _check_readable(stem, skeleton, encoded)
        yield encoded
        del encoded
        if not tensors:
            return
        state = tensors
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    for i, shard in enumerate(shards, 1):
        name = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        yield _safetensors_file(name, shard, buffers)


def _check_readable(stem: str, skeleton: Any, encoded: EncodedFile) -> None:
    """Refuse to write a pickle that :func:`decode` would refuse to read back (too deep, too large)."""
    problem = _shape_problem(skeleton, max_nodes=sys.maxsize)
    try:
        if problem:
            raise InvalidCheckpointError(encoded.name, f"it holds a state that {problem}")
        if encoded.size > statefile.MAX_PICKLE_BYTES:  # only then can its pickle be over the bound
            statefile.check_archive(encoded.name, bytes(encoded.data), location=encoded.name)
    except InvalidCheckpointError as exc:
        why = exc.reason
        raise CheckpointError(f"state {stem!r} cannot be saved (podtrain could not load it back): {why}") from None


def assemble(parts: Mapping[str, Any]) -> Any:
    """One state from its decoded files (name → content): a ``.pt`` skeleton gets its tensors back; safetensors
    shards alone are merged into one dict."""
    skeletons = [name for name in parts if name.endswith(".pt")]
    tensors = {k: v for name, part in parts.items() if not name.endswith(".pt") for k, v in part.items()}
    if not skeletons:
        return tensors
    if len(skeletons) > 1:
        raise ValueError(f"several pickles for one state: {', '.join(sorted(skeletons))}")
    return _put_back(parts[skeletons[0]], tensors)


def _extract(value: Any, out: dict[str, torch.Tensor], split_bytes: int) -> Any:
    """``value`` with every safetensors-able tensor of ``split_bytes`` or more moved into ``out`` and replaced by a
    placeholder."""

    def leaf(path: Any, item: Any) -> Any:
        if (
            isinstance(item, torch.Tensor)
            and _safetensorable(item)
            and item.numel() * item.element_size() >= split_bytes
        ):
            key = str(len(out))
            out[key] = item
            return {_PLACEHOLDER: key}
        return item

    return map_leaves(value, leaf)


def _put_back(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    def leaf(path: Any, item: Any) -> Any:
        if not _is_placeholder(item):
            return item
        try:
            return tensors[item[_PLACEHOLDER]]
        except KeyError:
            raise ValueError(f"tensor {item[_PLACEHOLDER]!r} is missing from the state's files") from None

    return map_leaves(value, leaf, is_leaf=_is_placeholder)


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and _PLACEHOLDER in value


def _encoded(name: str, write: Callable[[ChecksumWriter], None]) -> EncodedFile:
    sink = io.BytesIO()
    writer = ChecksumWriter(sink)
    write(writer)
    return EncodedFile(name=name, data=sink.getvalue(), size=writer.size, crc32c=writer.crc)


def decode(name: str, data: bytes, *, location: str, safe_globals: Iterable[Any] = (), zero_copy: bool = False) -> Any:
    """Deserialize a state file without running code; errors become :class:`InvalidCheckpointError`.

    The file's structure is checked first (:mod:`sdk.checkpoints._statefile`: the one safetensors header check every
    reader
    shares, the archive layout of a pickle); a pickle's result must then nest at most :data:`MAX_DEPTH` levels,
    hold no reference cycle and expand to no more objects than the file has bytes (shared references can describe
    exponentially many), so that putting it back — a recursive walk — cannot blow the stack or run forever.

    ``zero_copy`` (safetensors only): the tensors are read-only views over ``data`` instead of copies — for a
    consumer that copies them anyway (``nn.Module.load_state_dict``), this saves a full copy of the state.
    """
    if isinstance(data, bytearray):  # a file as encode() made it, not as a store gives it back
        data = bytes(data)
    if name.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        entries = statefile.safetensors_header(name, data, location=location)
        if zero_copy:
            return _safetensors_views(data, entries)
        try:
            return load_safetensors(data)
        except Exception as exc:
            raise InvalidCheckpointError(location, f"{name} is not a readable safetensors file: {exc}") from None
    statefile.check_archive(name, data, location=location)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            location,
            f"{name} needs code outside the allow-list to load, refused without running it "
            f"(if you trust it, pass its type in safe_globals): {str(exc).splitlines()[0]}",
        ) from None
    except Exception as exc:
        raise InvalidCheckpointError(location, f"{name} could not be loaded: {type(exc).__name__}: {exc}") from None
    problem = _shape_problem(value, max_nodes=8 * len(data) + 2**20)
    if problem:
        raise InvalidCheckpointError(location, f"{name} holds a state that {problem}")
    return value


MAX_DEPTH = 100  # levels of nesting in a pickled state: optimizers need ~4; tree walks recurse once or twice a level


def _shape_problem(value: Any, *, max_nodes: int) -> str | None:
    """Why the nested containers of ``value`` cannot be walked safely, or None: over :data:`MAX_DEPTH` levels, a
    reference cycle, or more than ``max_nodes`` nodes once shared references are expanded. Iterative (a
    depth-first walk with its own stack), each container visited once."""
    height: dict[int, int] = {}  # id -> levels of containers from here down, once finished
    size: dict[int, int] = {}  # id -> nodes from here down, a shared container counted at each reference
    active: set[int] = set()  # expanded, not finished: the ancestors of what is being expanded
    stack: list[tuple[Any, list[Any] | None, int]] = [(value, None, 0)] if _is_container(value) else []
    while stack:
        node, kids, leaves = stack.pop()
        key = id(node)
        if kids is not None:  # every kid is finished: finish this one
            active.discard(key)
            height[key] = 1 + max((height[id(c)] for c in kids), default=0)
            size[key] = 1 + leaves + sum(size[id(c)] for c in kids)
            if height[key] > MAX_DEPTH:
                return f"nests deeper than {MAX_DEPTH} levels"
            if size[key] > max_nodes:
                return f"expands to more than {max_nodes:,} objects (shared references repeated)"
            continue
        if key in height:
            continue
        items = list(node.values() if isinstance(node, Mapping) else node)
        kids = [c for c in items if _is_container(c)]
        active.add(key)
        stack.append((node, kids, len(items) - len(kids)))
        for child in kids:
            if id(child) in active:
                return "contains a reference cycle"
            if id(child) not in height:
                stack.append((child, None, 0))
    return None


def _is_container(value: Any) -> bool:
    """Whether :func:`sdk.checkpoints._tree.map_leaves` walks into ``value``."""
    return isinstance(value, Mapping) or (isinstance(value, list | tuple) and not hasattr(value, "_fields"))


_DTYPES_BY_CODE = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


def dtype_of(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code that :mod:`sdk.checkpoints._statefile` accepted."""
    return _DTYPES_BY_CODE[code]


def _safetensors_views(data: bytes, entries: Iterable[statefile.TensorEntry]) -> dict[str, torch.Tensor]:
    """Tensors viewing ``data`` (no copy), at the offsets :func:`sdk.checkpoints._statefile.safetensors_header`
    checked."""
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for entry in entries:
            dtype = _DTYPES_BY_CODE[entry.dtype]
            if entry.numel == 0:
                tensors[entry.name] = torch.empty(entry.shape, dtype=dtype)
            else:
                view = torch.frombuffer(data, dtype=dtype, count=entry.numel, offset=entry.start)
                tensors[entry.name] = view.reshape(entry.shape)
    return tensors


def _safetensorable(tensor: torch.Tensor) -> bool:
    return tensor.dtype in _SAFETENSORS_DTYPES and tensor.layout == torch.strided and not tensor.is_quantized


def _is_flat_tensor_dict(state: Any) -> bool:
    if not isinstance(state, Mapping) or not state:
        return False
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) and _safetensorable(v) for k, v in state.items())


def _safetensors_file(
    name: str, tensors: Mapping[str, torch.Tensor], buffers: FileBuffers | None = None
) -> EncodedFile:
    """The safetensors format: u64 header length, JSON header, then each tensor's raw bytes.

    The bytes are gathered with torch copies (GIL released) straight into the ``bytearray`` that is the file
    (no second copy into ``bytes``), and checksummed in slices: see the module's doc. Each tensor's own CRC32C is
    recorded in the header's ``__metadata__`` (``crc32c:<name>``), so that a reader of one tensor's byte range
    (a sharded load on another number of ranks) checks what it read without reading the rest; the file's CRC32C
    is combined from the header's and the tensors' (every byte is checksummed once).
    """
    header: dict[str, Any] = {}
    offset = 0
    # Widest dtypes first: every offset then stays a multiple of its tensor's element size (aligned views).
    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    for key, tensor in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    crcs = {f"{statefile.CRC_KEY}{key}": "0" * 8 for key, _ in ordered}  # filled in once the bytes are copied
    raw = _header_bytes(header, crcs)
    size = 8 + len(raw) + offset
    data = buffers.take(size) if buffers is not None else bytearray(size)  # the file: tensors are copied into it
    base = 8 + len(raw)
    buffer = torch.frombuffer(data, dtype=torch.uint8) if offset else None
    position, body_crc = base, 0
    for key, tensor in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        crc = 0
        if nbytes:
            assert buffer is not None
            flat = tensor.detach().reshape(-1)
            view = flat.view(torch.uint8) if flat.is_contiguous() else flat.contiguous().view(torch.uint8)
            buffer[position : position + nbytes].copy_(view)
            crc, body_crc = _crc_twice(memoryview(data)[position : position + nbytes], body_crc)
            position += nbytes
        crcs[f"{statefile.CRC_KEY}{key}"] = checksum.to_hex(crc)
    del buffer
    final = _header_bytes(header, crcs)
    assert len(final) == len(raw), "a CRC32C is 8 hex digits, so the header keeps its length"
    data[:base] = len(final).to_bytes(8, "little") + final
    crc32c = checksum.combine(checksum.crc32c(data[:base]), body_crc, offset)
    return EncodedFile(name=name, data=data, size=len(data), crc32c=crc32c)


def _header_bytes(header: Mapping[str, Any], crcs: Mapping[str, str]) -> bytes:
    raw = json.dumps({"__metadata__": dict(crcs), **header}, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces


def _crc_twice(view: memoryview, running: int) -> tuple[int, int]:
    """The CRC32C of ``view`` alone, and ``running`` extended by it: one pass, slice by slice (see the module)."""
    own = 0
    for start in range(0, len(view), checksum.SLICE):
        piece = view[start : start + checksum.SLICE].tobytes()
        own, running = checksum.extend(own, piece), checksum.extend(running, piece)
    return own, running
