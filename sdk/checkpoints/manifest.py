"""The checkpoint manifest: the one file whose presence makes a checkpoint exist.

Layout under the checkpoint URI: ``step-<10 digits>/`` holding the state files and ``MANIFEST.json``, written
last. A checkpoint exists only if its manifest parses, has a known format, and every listed file has the
listed size and CRC32C. :func:`parse` is strict: every way a manifest can be wrong becomes an
:class:`~sdk.errors.InvalidCheckpointError` whose ``reason`` says which check failed — including a manifest
over 16 MiB, nested over 32 levels (``meta`` is the user's) or with a key twice in one object
(:mod:`sdk.stores.boundedjson`): a damaged manifest makes its checkpoint skipped, never a crash. ``to_json`` refuses to
write what ``parse`` would refuse to read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sdk.errors import CheckpointError, InvalidCheckpointError, MalformedDocumentError
from sdk.stores import boundedjson

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "check_file_name",
    "parse",
    "parse_step_dir",
    "rank_of",
    "stem_of",
    "step_dir",
    "without_rank_dir",
]

FORMAT = "podtrain.checkpoint/1"
FORMAT_SHARDED = "podtrain.checkpoint/2"  # names sharded entries (sdk.checkpoints._sharded): older readers skip it
MANIFEST_NAME = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d{10})$")
_CRC = re.compile(r"^[0-9a-f]{8}$")
INDEX_NAME = "sharded.json"  # the index of a sharded checkpoint (sdk.checkpoints._dcpmeta), beside the ranks' folders
_RANK_DIR = re.compile(r"(?:^|/)rank-(\d+)/")
_STATE_FILE = re.compile(r"^(?P<stem>.+?)(?:-\d{5}-of-\d{5})?\.(?:safetensors|pt)$")
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_MANIFEST_DEPTH = 32  # the manifest itself is 3 levels; the rest is for ``meta``


def step_dir(step: int) -> str:
    """The folder name of ``step``: ``step-`` and 10 digits, so lexical order is numeric order."""
    if not 0 <= step < 10**10:
        raise ValueError(f"step {step} is out of range [0, 10**10)")
    return f"step-{step:010d}"


def parse_step_dir(name: str) -> int | None:
    """The step a folder name stands for, or None when it is not a step folder."""
    match = _STEP_DIR.match(name.rstrip("/"))
    return int(match.group(1)) if match else None


def stem_of(name: str) -> str:
    """The state name a file belongs to: ``model-00002-of-00008.safetensors`` → ``model``."""
    match = _STATE_FILE.match(name.rsplit("/", 1)[-1])
    return match.group("stem") if match else name


def rank_of(name: str) -> int | None:
    """The rank whose folder holds the file ``name`` (None: a file of the whole checkpoint, or of one rank)."""
    match = _RANK_DIR.search(name)
    return int(match.group(1)) if match else None


def without_rank_dir(name: str) -> str:
    """``name`` inside its rank's folder: the same for the same file of two ranks."""
    return _RANK_DIR.split(name)[-1]


def _indexes(files: Any) -> list[str]:
    """The files named :data:`INDEX_NAME` outside every rank's folder."""
    return [n for n in files if n.rsplit("/", 1)[-1] == INDEX_NAME and rank_of(n) is None]


def check_file_name(name: str) -> str | None:
    """Why ``name`` is not an acceptable file name inside a step folder, or None when it is."""
    if not isinstance(name, str) or not name:
        return "an empty file name"
    if "\\" in name:
        return f"file name {name!r} contains a backslash"
    if name.startswith("/"):
        return f"file name {name!r} is absolute"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"file name {name!r} has an empty, '.' or '..' component"
    if any(ord(c) < 32 for c in name):
        return f"file name {name!r} contains a control character"
    if name == MANIFEST_NAME:
        return f"the manifest lists itself ({name!r})"
    return None


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """What a state file must be: its size in bytes and CRC32C (8 lowercase hex digits)."""

    size: int
    crc32c: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A parsed, validated manifest."""

    run_id: str
    attempt: int
    step: int
    world_size: int
    files: dict[str, FileEntry]
    torch: str
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    meta: dict[str, Any] = field(default_factory=dict)
    sharded: tuple[str, ...] = ()  # state names saved through DCP; their index is the one file named INDEX_NAME
    format: str = FORMAT  # follows ``sharded``: FORMAT_SHARDED when it names any (a parsed manifest equals its source)

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", FORMAT_SHARDED if self.sharded else FORMAT)

    def to_json(self) -> bytes:
        """The manifest as written to the store (UTF-8 JSON, keys in a fixed order)."""
        document: dict[str, Any] = {
            "format": FORMAT_SHARDED if self.sharded else FORMAT,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "step": self.step,
            "created": self.created,
            "world_size": self.world_size,
            "files": {name: {"size": e.size, "crc32c": e.crc32c} for name, e in sorted(self.files.items())},
            "torch": self.torch,
            "meta": self.meta,
        }
        if self.sharded:
            if not all(isinstance(n, str) and n for n in self.sharded):
                raise CheckpointError(f"the manifest of step {self.step} cannot be written: a sharded name is empty")
            document["sharded"] = list(self.sharded)
        raw = (json.dumps(document, indent=1, sort_keys=False) + "\n").encode()
        try:  # never commit a manifest that parse() would refuse
            boundedjson.check(raw, what="manifest", max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_MANIFEST_DEPTH)
        except MalformedDocumentError as exc:
            raise CheckpointError(f"the manifest of step {self.step} cannot be written: {exc.reason}") from None
        return raw

    @property
    def index_name(self) -> str | None:
        """The sharded checkpoint's index file (one, :func:`parse` checks), or None without sharded state."""
        return _indexes(self.files)[0] if self.sharded else None

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())


def parse(data: bytes, *, location: str) -> Manifest:
    """Parse and validate manifest bytes read from ``location`` (used in error messages)."""

    def bad(reason: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(location, reason)

    try:
        doc = boundedjson.loads(
            data, what="manifest", max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_MANIFEST_DEPTH, unique_keys=True
        )
    except MalformedDocumentError as exc:
        raise bad(f"manifest: {exc.reason}") from None
    if not isinstance(doc, dict):
        raise bad(f"manifest is JSON but not an object (got {type(doc).__name__})")
    fmt = doc.get("format")
    sharded = _sharded_names(doc, fmt, bad)
    run_id = _typed(doc, "run_id", str, bad)
    attempt = _typed(doc, "attempt", int, bad)
    step = _typed(doc, "step", int, bad)
    world_size = _typed(doc, "world_size", int, bad)
    created = _typed(doc, "created", str, bad)
    torch_version = _typed(doc, "torch", str, bad)
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise bad("'meta' is not an object")
    if attempt < 1 or step < 0 or world_size < 1:
        raise bad(f"out-of-range numbers: attempt={attempt}, step={step}, world_size={world_size}")
    raw_files = doc.get("files")
    if not isinstance(raw_files, dict) or not raw_files:
        raise bad("'files' is missing, empty or not an object")
    files: dict[str, FileEntry] = {}
    for name, entry in raw_files.items():
        reason = check_file_name(name)
        if reason:
            raise bad(reason)
        if not isinstance(entry, dict):
            raise bad(f"entry for {name!r} is not an object")
        size, crc = entry.get("size"), entry.get("crc32c")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"entry for {name!r} has no valid 'size'")
        if not isinstance(crc, str) or not _CRC.match(crc):
            raise bad(f"entry for {name!r} has no valid 'crc32c' (8 lowercase hex digits)")
        files[name] = FileEntry(size=size, crc32c=crc)
    if sharded:
        indexes = _indexes(files)
        if len(indexes) != 1:
            raise bad(f"a manifest of sharded state must list one {INDEX_NAME}, this one lists {len(indexes)}")
    return Manifest(
        run_id=run_id,
        attempt=attempt,
        step=step,
        world_size=world_size,
        files=files,
        torch=torch_version,
        created=created,
        meta=meta,
        sharded=tuple(sharded),
        format=str(fmt),
    )


def _sharded_names(doc: dict[str, Any], fmt: Any, bad: Any) -> list[str]:
    """The ``sharded`` list a format-2 manifest must have and a format-1 one must not."""
    if fmt not in (FORMAT, FORMAT_SHARDED):
        raise bad(f"unknown manifest format {fmt!r}; this podtrain reads {FORMAT!r} and {FORMAT_SHARDED!r}")
    sharded = doc.get("sharded", [])
    if fmt == FORMAT and "sharded" in doc:
        raise bad(f"'sharded' in a {FORMAT!r} manifest")
    if fmt == FORMAT_SHARDED and (
        not isinstance(sharded, list) or not sharded or not all(isinstance(n, str) and n for n in sharded)
    ):
        raise bad("'sharded' must be a non-empty list of state names")
    return list(sharded)


def _typed(doc: dict[str, Any], key: str, kind: type, bad: Any) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad(f"field {key!r} is missing or not {'an integer' if kind is int else 'a string'}")
    return value
