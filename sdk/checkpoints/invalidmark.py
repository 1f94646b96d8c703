"""What a full check found wrong with a committed checkpoint, remembered beside it for later listings.

Without reading every byte, ``podtrain checkpoints list`` cannot see a corrupt file in a store that keeps no
checksum (``file://``), so a checkpoint that ``list --deep`` or ``verify`` found corrupt would be listed valid again
the next time. Those checks therefore leave ``step-<N>/INVALID.json`` — the reason, when, and by what — and a plain
listing shows the checkpoint INVALID with that reason.

The mark only ever makes a checkpoint look *worse* in a listing: loading and verifying read and check every byte
whatever a mark says, so a planted or stale mark can hide nothing. It names the manifest it was found against (its
CRC32C): a manifest is created once, but a superseded one can be removed and the step committed again by a later
attempt, and a mark left from the old commit does not apply to the new one. Writing it is best effort: with
read-only credentials the finding is still printed, just not remembered. A deep check that finds the checkpoint
valid again (a file restored by hand) removes the mark.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sdk.checkpoints.manifest import Manifest, step_dir
from sdk.errors import PodtrainError, StorageNotFoundError
from sdk.stores import boundedjson, checksum
from sdk.stores.store import Store

__all__ = ["MARK_NAME", "clear", "mark", "read"]

MARK_NAME = "INVALID.json"
_MAX_BYTES = 64 * 1024
_MAX_REASON = 2000


def _identity(manifest: Manifest) -> str:
    return checksum.to_hex(checksum.crc32c(manifest.to_json()))


def mark(store: Store, manifest: Manifest, reason: str, *, by: str) -> bool:
    """Remember that the checkpoint of ``manifest`` is invalid because of ``reason``; False when it could not be
    written (the store is read-only to us, or down)."""
    document = {
        "manifest_crc32c": _identity(manifest),
        "reason": reason[:_MAX_REASON],
        "found": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "by": by,
    }
    try:
        store.put(f"{step_dir(manifest.step)}/{MARK_NAME}", (json.dumps(document) + "\n").encode())
    except (PodtrainError, OSError):
        return False
    return True


def read(store: Store, manifest: Manifest) -> str | None:
    """Why an earlier full check found the checkpoint of ``manifest`` invalid, or None (no mark, an unreadable
    one, or one about another commit of the same step)."""
    try:
        raw = store.get(f"{step_dir(manifest.step)}/{MARK_NAME}")
        document = boundedjson.loads(raw, what=MARK_NAME, max_bytes=_MAX_BYTES, max_depth=4)
    except (StorageNotFoundError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("manifest_crc32c") != _identity(manifest):
        return None
    reason, found, by = (str(document.get(key, "?"))[:_MAX_REASON] for key in ("reason", "found", "by"))
    return f"{reason} (found by {by} at {found})"


def clear(store: Store, step: int) -> None:
    """Remove the mark of ``step``, if any (best effort, as :func:`mark`)."""
    try:
        store.delete(f"{step_dir(step)}/{MARK_NAME}")
    except (PodtrainError, OSError):
        return
