"""The structure of a state file, checked without torch and without running anything it holds.

Every path that reads a checkpoint's files goes through here: loading (both the safetensors library's copies and
podtrain's read-only views, :mod:`sdk.checkpoints.serialization`), ``checkpoints verify`` and ``checkpoints list
--deep``
(:meth:`sdk.checkpoints.checkpointer.Checkpointer` after the CRC32C matched). A file whose bytes match its manifest can
still
be damaged or crafted; each rule below turns that into an :class:`~sdk.errors.InvalidCheckpointError` naming the
file and the rule, and a resume skips the checkpoint for the previous one.

**safetensors** (:func:`safetensors_header`): an 8-byte little-endian header length that fits the file and is at
most 100,000,000 (the safetensors library's own limit); a header that is a JSON object within
:mod:`sdk.stores.boundedjson`'s bounds; ``__metadata__``, when present, an object of strings; every
other entry a known ``dtype``, a ``shape`` of non-negative integers, ``data_offsets`` two integers
``0 <= begin <= end <= body length`` with ``end - begin == numel * itemsize``; and, sorted by offset, the tensors
cover the body exactly — no two overlap, no byte belongs to none (the library requires the same), which also
catches a name given twice (reported as such).

**torch.save archives** (:func:`check_archive`): a zip whose every entry is stored uncompressed (``torch.save``
never compresses: a compressed entry can inflate a small file into gigabytes), whose entries fit in the file, and
whose pickle is at most :data:`MAX_PICKLE_BYTES`. What the pickle holds is judged when it is loaded
(``torch.load(weights_only=True)``, :mod:`sdk.checkpoints.serialization`): that needs torch, and the run's allow-list.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdk.checkpoints import _dcpmeta as dcpmeta
from sdk.errors import InvalidCheckpointError, MalformedDocumentError
from sdk.stores import boundedjson

__all__ = [
    "CRC_KEY",
    "DTYPE_SIZES",
    "HEAD_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_PICKLE_BYTES",
    "Layout",
    "TensorEntry",
    "check",
    "check_archive",
    "header_end",
    "safetensors_layout",
]

# Every dtype podtrain writes (sdk.checkpoints.serialization's table) and its size in bytes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
MAX_HEADER_DEPTH = 3  # {name: {"shape": [..]}}: what the format allows
_Bad = Callable[[str], InvalidCheckpointError]
MAX_PICKLE_BYTES = 64 * 2**20  # podtrain's pickles are skeletons (tensors of 64 KiB or more live in safetensors)


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """One tensor of a safetensors file, checked: where its bytes are in the file (``start`` from byte 0)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def check(name: str, data: bytes, *, location: str) -> None:
    """Check the structure of the state file ``name`` by its suffix (other files are not state files)."""
    if name.endswith(".safetensors"):
        safetensors_header(name, data, location=location)
    elif name.endswith(".pt"):
        check_archive(name, data, location=location)
    elif name.rsplit("/", 1)[-1] == dcpmeta.INDEX_NAME:
        dcpmeta.check(data, location=location, name=name)


def safetensors_header(name: str, data: bytes, *, location: str) -> list[TensorEntry]:
    """The tensors of the safetensors file ``data``, every rule checked, ordered by offset."""
    return safetensors_layout(name, data, len(data), location=location).entries


@dataclass(frozen=True)
class Layout:
    """A safetensors file's header, checked: its tensors ordered by offset, and its ``__metadata__``."""

    entries: list[TensorEntry]
    metadata: dict[str, str]
    header_end: int  # the first byte of the data
    crc32c: dict[str, int] | None  # each tensor's CRC32C (``__metadata__``'s ``crc32c:<name>``); None: not recorded


HEAD_BYTES = 64 * 2**10  # what a reader of the header alone fetches first: most headers fit


def header_end(name: str, head: bytes, size: int, *, location: str) -> int:
    """Where the header of the ``size``-byte safetensors file that starts with ``head`` ends (its first 8 bytes are
    enough): a reader that fetched less must fetch up to there before :func:`safetensors_layout`."""
    bad = _bad(name, location)
    if size < 8 or len(head) < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(head[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise bad(f"header length {length:,} is over the limit of {MAX_HEADER_BYTES:,}")
    if not 0 < length <= size - 8:
        raise bad(f"header length {length:,} does not fit a {size:,}-byte file")
    return 8 + length


def safetensors_layout(name: str, head: bytes, size: int, *, location: str) -> Layout:
    """The checked header of the ``size``-byte safetensors file whose first bytes are ``head`` (at least up to
    :func:`header_end`): a reader of byte ranges checks the whole layout without the data."""
    bad = _bad(name, location)
    base = header_end(name, head, size, location=location)
    if len(head) < base:
        raise bad(f"only {len(head):,} bytes of a {base:,}-byte header were read")
    try:
        header = boundedjson.loads(
            head[8:base],
            what="header",
            max_bytes=MAX_HEADER_BYTES,
            max_depth=MAX_HEADER_DEPTH,
        )
    except MalformedDocumentError as exc:
        raise bad(f"header: {exc.reason}") from None
    if not isinstance(header, dict):
        raise bad(f"the header is JSON but not an object (got {type(header).__name__})")
    body = size - base
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not an object of strings")
    entries = [_entry(key, spec, body, base, bad) for key, spec in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    covered = base
    for i, entry in enumerate(entries):
        if entry.start < covered:
            raise bad(f"tensors {entries[i - 1].name!r} and {entry.name!r} overlap")
        if entry.start > covered:
            raise _uncovered(head, base - 8, bad, covered - base, entry.start - base)
        covered = entry.end
    if covered < size:
        raise _uncovered(head, base - 8, bad, covered - base, body)
    return Layout(entries=entries, metadata=metadata, header_end=base, crc32c=_crcs(metadata, entries, bad))


CRC_KEY = "crc32c:"  # ``__metadata__`` key prefix of a tensor's CRC32C: ``crc32c:<name>`` -> 8 lowercase hex digits
_HEX8 = re.compile(r"[0-9a-f]{8}")


def _crcs(metadata: dict[str, str], entries: list[TensorEntry], bad: _Bad) -> dict[str, int] | None:
    """The tensors' CRC32Cs the writer recorded: one for every tensor, or none at all (a file written before
    podtrain recorded them, read whole instead)."""
    recorded = {k.removeprefix(CRC_KEY): v for k, v in metadata.items() if k.startswith(CRC_KEY)}
    if not recorded:
        return None
    names = {e.name for e in entries}
    if recorded.keys() != names:
        odd = sorted(recorded.keys() ^ names)[:3]
        raise bad(f"__metadata__ records CRC32Cs for other tensors than the file holds ({', '.join(map(repr, odd))})")
    for key, value in recorded.items():
        if not _HEX8.fullmatch(value):
            raise bad(f"__metadata__: the CRC32C of {key!r} is {value[:20]!r}, not 8 lowercase hex digits")
    return {key: int(value, 16) for key, value in recorded.items()}


def _bad(name: str, location: str) -> _Bad:
    def bad(why: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(location, f"{name} is not a valid safetensors file: {why}")

    return bad


def _uncovered(data: bytes, length: int, bad: _Bad, begin: int, end: int) -> InvalidCheckpointError:
    """Bytes no tensor owns — or a name twice, which JSON parsing hides (the last one wins, the bytes of the
    other are then nobody's): the header is parsed again, refusing repeated names, for the reason only (a name
    twice that covers no other bytes changes nothing; checking every header that way doubled the parse time)."""
    header = data[8 : 8 + length]
    try:
        boundedjson.loads(header, what="header", max_bytes=len(header), max_depth=MAX_HEADER_DEPTH, unique_keys=True)
    except MalformedDocumentError as exc:
        return bad(f"header: {exc.reason}")
    return bad(f"bytes {begin:,}..{end:,} of the data belong to no tensor")


def _entry(key: str, spec: Any, body: int, base: int, bad: _Bad) -> TensorEntry:
    if not isinstance(spec, dict):
        raise bad(f"tensor {key!r}: its entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"tensor {key!r}: dtype {dtype!r} is not one of {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_natural(o) for o in offsets)
        or not offsets[0] <= offsets[1] <= body
    ):
        raise bad(f"tensor {key!r}: data_offsets {offsets!r} are not two integers 0 <= begin <= end <= {body:,}")
    begin, end = offsets
    needed = _nbytes(shape, DTYPE_SIZES[dtype], body)
    if end - begin != needed:
        held = f"{needed:,} bytes" if needed <= body else f"more than the {body:,} bytes of data"
        raise bad(f"tensor {key!r}: shape {shape} of {dtype} needs {held}, data_offsets hold {end - begin:,}")
    return TensorEntry(name=key, dtype=dtype, shape=tuple(shape), start=base + begin, end=base + end)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """The bytes ``shape`` needs, or ``limit + 1`` once it needs more (a crafted shape of many huge dimensions
    would otherwise multiply into a number of millions of digits)."""
    if 0 in shape:
        return 0
    size = itemsize
    for dim in shape:
        size *= dim
        if size > limit:
            return limit + 1
    return size


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_archive(name: str, data: bytes, *, location: str) -> None:
    """A ``torch.save`` zip: every entry stored (not compressed) and inside the file, the pickle within bounds."""

    import zipfile  # here: the ``checkpoints`` commands start without it (~5 ms)

    def bad(why: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(location, f"{name} is not a valid torch.save archive: {why}")

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise bad(f"not a zip archive ({exc})") from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise bad(f"entry {info.filename!r} is compressed (torch.save never compresses; refused unread)")
        if info.file_size != info.compress_size or info.header_offset + info.file_size > len(data):
            raise bad(f"entry {info.filename!r} claims {info.file_size:,} bytes that the file does not hold")
        total += info.file_size
        if _is_pickle(info) and info.file_size > MAX_PICKLE_BYTES:
            raise bad(f"its pickle is {info.file_size:,} bytes, over the limit of {MAX_PICKLE_BYTES:,}")
    if total > len(data):
        raise bad(f"its entries add up to {total:,} bytes, more than the file's {len(data):,}")
    if not any(_is_pickle(info) for info in infos):
        raise bad("it has no data.pkl")


def _is_pickle(info: Any) -> bool:  # a zipfile.ZipInfo
    return info.filename.rsplit("/", 1)[-1] == "data.pkl"
