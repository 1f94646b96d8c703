"""What a full check found wrong with a committed checkpoint, remembered beside it for later listings.

Without reading every byte, ``podtrain checkpoints list`` cannot see a corrupt file in a store that keeps no
checksum (``file://``), so a checkpoint that ``list --deep`` or ``verify`` found corrupt would be listed valid again
the next time. Those checks therefore leave ``step-<N>/INVALID.json`` — the reason, when, and by what — and a plain
listing shows the checkpoint INVALID with that reason.

The mark only ever makes a checkpoint look *worse* in a listing: loading and verifying read and check every byte
whatever a mark says, so a planted or stale mark can hide nothing. A load that found a sharded payload's tensor
damaged after part of the checkpoint was in the state (:mod:`sdk.checkpoints._shardread`) also names the damaged
byte ranges with their expected CRC32C (:func:`damaged_ranges`): the next load reads those ranges first and skips
the checkpoint before anything is written if they are still damaged — and loads it if they are not.

It names the manifest it was found against (its
CRC32C): a manifest is created once, but a superseded one can be removed and the step committed again by a later
attempt, and a mark left from the old commit does not apply to the new one. Writing it is best effort: with
read-only credentials the finding is still printed, just not remembered. A deep check that finds the checkpoint
valid again (a file restored by hand) removes the mark.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sdk.checkpoints.manifest import Manifest, step_dir
from sdk.errors import PodtrainError, StorageNotFoundError
from sdk.stores import boundedjson, checksum
from sdk.stores.store import Store

__all__ = ["MARK_NAME", "DamagedRange", "clear", "damaged_ranges", "mark", "read"]

MARK_NAME = "INVALID.json"
_MAX_BYTES = 64 * 1024
_MAX_REASON = 2000
_MAX_RANGES = 16
_HEX8 = re.compile(r"[0-9a-f]{8}")


def _identity(manifest: Manifest) -> str:
    return checksum.to_hex(checksum.crc32c(manifest.to_json()))


@dataclass(frozen=True)
class DamagedRange:
    """Bytes ``[start, end)`` of the checkpoint's file ``file`` (its name in the manifest), whose CRC32C should be
    ``crc32c`` and was not."""

    file: str
    start: int
    end: int
    crc32c: int


def mark(store: Store, manifest: Manifest, reason: str, *, by: str, ranges: Iterable[DamagedRange] = ()) -> bool:
    """Remember that the checkpoint of ``manifest`` is invalid because of ``reason`` (and where: ``ranges``); False
    when it could not be written (the store is read-only to us, or down)."""
    document: dict[str, Any] = {
        "manifest_crc32c": _identity(manifest),
        "reason": reason[:_MAX_REASON],
        "found": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "by": by,
    }
    listed = [
        {"file": r.file, "start": r.start, "end": r.end, "crc32c": checksum.to_hex(r.crc32c)}
        for r in list(ranges)[:_MAX_RANGES]
    ]
    if listed:
        document["ranges"] = listed
    try:
        store.put(f"{step_dir(manifest.step)}/{MARK_NAME}", (json.dumps(document) + "\n").encode())
    except (PodtrainError, OSError):
        return False
    return True


def read(store: Store, manifest: Manifest) -> str | None:
    """Why an earlier full check found the checkpoint of ``manifest`` invalid, or None (no mark, an unreadable
    one, or one about another commit of the same step)."""
    document = _document(store, manifest)
    if document is None:
        return None
    reason, found, by = (str(document.get(key, "?"))[:_MAX_REASON] for key in ("reason", "found", "by"))
    return f"{reason} (found by {by} at {found})"


def damaged_ranges(store: Store, manifest: Manifest) -> list[DamagedRange]:
    """The byte ranges an earlier load found damaged in the checkpoint of ``manifest`` (none without a mark, or with
    one about another commit); a range that does not fit a file of the manifest is left out."""
    document = _document(store, manifest)
    listed = document.get("ranges") if document is not None else None
    out: list[DamagedRange] = []
    for item in listed[:_MAX_RANGES] if isinstance(listed, list) else []:
        if isinstance(item, dict) and (found := _range(item, manifest)) is not None:
            out.append(found)
    return out


def _range(item: dict[str, Any], manifest: Manifest) -> DamagedRange | None:
    name, start, end, crc = (item.get(k) for k in ("file", "start", "end", "crc32c"))
    entry = manifest.files.get(name) if isinstance(name, str) else None
    if entry is None or not isinstance(crc, str) or not _HEX8.fullmatch(crc):
        return None
    if not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool) or isinstance(end, bool):
        return None
    if not 0 <= start < end <= entry.size:
        return None
    return DamagedRange(str(name), start, end, int(crc, 16))


def _document(store: Store, manifest: Manifest) -> dict[str, Any] | None:
    try:
        raw = store.get(f"{step_dir(manifest.step)}/{MARK_NAME}")
        document = boundedjson.loads(raw, what=MARK_NAME, max_bytes=_MAX_BYTES, max_depth=4)
    except (StorageNotFoundError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("manifest_crc32c") != _identity(manifest):
        return None
    return document


def clear(store: Store, step: int) -> None:
    """Remove the mark of ``step``, if any (best effort, as :func:`mark`)."""
    try:
        store.delete(f"{step_dir(step)}/{MARK_NAME}")
    except (PodtrainError, OSError):
        return
