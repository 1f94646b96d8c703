"""State to bytes and back, with size and CRC32C computed while writing, and loading that never runs code.

Two formats:

* ``.safetensors`` for a flat ``{name: tensor}`` state (a model's ``state_dict()``). It is written here,
  streaming header and tensor bytes through a :class:`~sdk.checksum.ChecksumWriter` (no extra copy of the
  state, no second pass to checksum), and read back with the ``safetensors`` library.
* ``.pt`` for everything else (optimizer, scheduler, scaler, data position, RNG): ``torch.save`` through the
  same writer, read back with ``torch.load(weights_only=True)``. Only an explicit allow-list of globals is
  accepted, so a crafted pickle is refused before any of its code can run.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, cast

import torch

from sdk.checksum import ChecksumWriter
from sdk.errors import InvalidCheckpointError, UnsafeCheckpointError

__all__ = ["SHARD_BYTES", "EncodedFile", "decode", "encode", "stem_of"]

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
    data: bytes
    size: int
    crc32c: int


SHARD_BYTES = 128 * 2**20
_NAME = re.compile(r"^(?P<stem>.+?)(?:-\d{5}-of-\d{5})?\.(?:safetensors|pt)$")


def encode(stem: str, state: Any, *, shard_bytes: int | None = None) -> Iterator[EncodedFile]:
    """Serialize one state (a ``state_dict()`` result or a plain mapping) into files.

    A flat tensor dict becomes ``<stem>.safetensors``, or ``<stem>-00001-of-0000N.safetensors`` shards of about
    ``shard_bytes`` (default :data:`SHARD_BYTES`) when it is larger, so that a caller can upload one shard
    while the next is serialized. Anything else becomes ``<stem>.pt``. Files are yielded as they are finished.
    """
    limit = SHARD_BYTES if shard_bytes is None else shard_bytes
    if not _is_flat_tensor_dict(state):
        yield _encoded(f"{stem}.pt", lambda writer: torch.save(state, cast(IO[bytes], writer)))
        return
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
        yield _encoded(name, lambda writer, shard=shard: _write_safetensors(writer, shard))  # type: ignore[misc]


def stem_of(name: str) -> str:
    """The state name a file belongs to: ``model-00002-of-00008.safetensors`` → ``model``."""
    match = _NAME.match(name.rsplit("/", 1)[-1])
    return match.group("stem") if match else name


def _encoded(name: str, write: Callable[[ChecksumWriter], None]) -> EncodedFile:
    sink = io.BytesIO()
    writer = ChecksumWriter(sink)
    write(writer)
    return EncodedFile(name=name, data=sink.getvalue(), size=writer.size, crc32c=writer.crc)


def decode(name: str, data: bytes, *, location: str, safe_globals: Iterable[Any] = (), zero_copy: bool = False) -> Any:
    """Deserialize a state file without running code; errors become :class:`InvalidCheckpointError`.

    ``zero_copy`` (safetensors only): the tensors are read-only views over ``data`` instead of copies — for a
    consumer that copies them anyway (``nn.Module.load_state_dict``), this saves a full copy of the state.
    """
    if name.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        if zero_copy:
            return _safetensors_views(name, data, location)

        try:
            return load_safetensors(data)
        except Exception as exc:
            raise InvalidCheckpointError(location, f"{name} is not a readable safetensors file: {exc}") from None
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            location,
            f"{name} needs code outside the allow-list to load, refused without running it "
            f"(if you trust it, pass its type in safe_globals): {str(exc).splitlines()[0]}",
        ) from None
    except Exception as exc:
        raise InvalidCheckpointError(location, f"{name} could not be loaded: {type(exc).__name__}: {exc}") from None


def _safetensors_views(name: str, data: bytes, location: str) -> dict[str, torch.Tensor]:
    """Parse the safetensors header and return tensors viewing ``data`` (no copy)."""
    dtypes = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}

    def bad(why: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(location, f"{name} is not a readable safetensors file: {why}")

    if len(data) < 8:
        raise bad("shorter than its header length")
    length = int.from_bytes(data[:8], "little")
    if not 0 < length <= len(data) - 8:
        raise bad(f"header length {length} does not fit a {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    base, body = 8 + length, len(data) - 8 - length
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for key, spec in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = (
                    dtypes[spec["dtype"]],
                    [int(d) for d in spec["shape"]],
                    spec["data_offsets"],
                )
            except (KeyError, TypeError, ValueError):
                raise bad(f"tensor {key!r} has a malformed entry") from None
            numel = math.prod(shape)
            if not 0 <= start <= end <= body or end - start != numel * dtype.itemsize:
                raise bad(f"tensor {key!r} has offsets outside the file or of the wrong length")
            if numel == 0:
                tensors[key] = torch.empty(shape, dtype=dtype)
            else:
                tensors[key] = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + start).reshape(shape)
    return tensors


def _is_flat_tensor_dict(state: Any) -> bool:
    if not isinstance(state, Mapping) or not state:
        return False
    return all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.dtype in _SAFETENSORS_DTYPES and not v.is_sparse
        for k, v in state.items()
    )


def _write_safetensors(writer: ChecksumWriter, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write the safetensors format: u64 header length, JSON header, then each tensor's raw bytes."""
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
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
    writer.write(len(raw).to_bytes(8, "little"))
    writer.write(raw)
    for _, tensor in ordered:
        if tensor.numel():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            writer.write(flat.numpy().tobytes())
