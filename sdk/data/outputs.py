"""What a run writes into its output folder (``PODTRAIN_OUTPUT_DIR``): metrics as JSON lines, the exported model.

Both are plain files the supervisor pushes with the rest of the folder when the run ends, preempted or not;
:meth:`sdk.run.Run.export` also pushes the export at once and verifies it in the store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sdk import redaction

__all__ = ["append_metrics", "write_export"]


def append_metrics(folder: str | Path, step: int, values: Mapping[str, Any], *, rank: int = 0) -> dict[str, Any]:
    """Append ``{"step", "time", **values}`` to ``metrics.jsonl`` (``metrics-rank<r>.jsonl`` off rank 0); tensors
    become numbers, secrets in keys and strings ``***`` (:func:`sdk.redaction.redact_value`). Returns the record
    written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = "metrics.jsonl" if rank == 0 else f"metrics-rank{rank}.jsonl"
    record: dict[str, Any] = {"step": step, "time": datetime.now(UTC).isoformat(timespec="milliseconds")}
    record.update({k: v.item() if hasattr(v, "item") else v for k, v in values.items()})
    record = redaction.redact_value(record)  # a file pushed with the artifacts: no secret in a key or a value
    with (folder / name).open("a") as out:
        out.write(json.dumps(record) + "\n")
    return record


def write_export(folder: str | Path, model: Any, *, name: str, sidecar: Mapping[str, Any]) -> Path:
    """``<folder>/export/<name>.safetensors`` (one file, no pickle) and ``<name>.json``: ``sidecar`` plus the
    file's CRC32C and size. Returns the export folder."""
    from sdk.checkpoints import serialization

    target = Path(folder) / "export"
    target.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if hasattr(model, "state_dict") else model
    (encoded,) = serialization.encode(name, dict(state), shard_bytes=2**62)
    (target / f"{name}.safetensors").write_bytes(encoded.data)
    described = redaction.redact_value({**sidecar, "crc32c": f"{encoded.crc32c:08x}", "bytes": encoded.size})
    (target / f"{name}.json").write_text(json.dumps(described, indent=1) + "\n")
    return target
