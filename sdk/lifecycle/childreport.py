"""What the training process tells its supervisor for the run record: steps reached, where it resumed, its GPUs.

``podtrain run`` sets ``PODTRAIN_REPORT_FILE`` to a private temporary file; local rank 0 of the child (of each
pod, in a job of several) keeps a small JSON document there (written whole, then renamed, so the supervisor never
reads half of one). The supervisor reads it after the child ends, whatever the outcome: a child killed with SIGKILL
leaves its last report.
Without the variable (``python train.py`` on a laptop) nothing is written.

Writes are throttled to one per :data:`EVERY` seconds while steps advance, plus one at each event that matters
(resume, a data pull, the end), so a run that dies loses at most that much of its step count.

``completed`` tells the supervisor whether the run reached its end: ``sdk.init()`` writes ``False`` when the block
opens (:meth:`Report.begin`) and ``True`` when it ends normally without a stop request (:meth:`Report.complete`).
After a SIGTERM the supervisor counts a child's exit 0 as success only with ``completed: true``; a report without
the field (no SDK in the child) leaves the exit code as the only word on it.

``stopped`` says why the ranks stopped before their end when this pod got no signal of its own: another pod's
ranks were preempted and every rank stopped with them, or ranks went silent (:mod:`sdk.lifecycle.peers`). A
launcher such as torchrun exits 1 when its workers exit 75; with ``stopped`` the supervisor still exits 75.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EVERY", "Report", "completed", "gpu_info", "read", "stopped"]

EVERY = 1.0


class Report:
    """The child's side: ``update(**fields)``, ``step(n)`` on every step, ``flush()`` at events."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic, steps: bool = True) -> None:
        """``steps``: this process reports the pod's steps (local rank 0); the others only say why they stopped, in
        a file of their own beside it (``<path>.stopped-<pid>``), which :func:`read` merges."""
        self._stopped_path = Path(f"{path}.stopped-{os.getpid()}") if path else None
        self.path = Path(path) if path and steps else None
        self.fields: dict[str, Any] = {}
        self._clock = clock
        self._written_at = float("-inf")
        self._dirty = False

    def update(self, **fields: Any) -> None:
        """Record ``fields`` and write them now."""
        self.fields.update(fields)
        self.flush()

    def begin(self) -> None:
        """The SDK's block opened: ``completed: false`` until :meth:`complete` (no GPU look-up yet: CUDA stays cold)."""
        self.fields["completed"] = False
        self.flush(gpu=False)

    def complete(self) -> None:
        """The block reached its end without a stop request."""
        self.update(completed=True)

    def stopped(self, why: str) -> None:
        """The ranks stopped before their end, for ``why`` (a preemption, ranks gone silent)."""
        if self.path is not None:
            self.update(stopped=why)
        elif self._stopped_path is not None:
            try:
                self._stopped_path.write_text(json.dumps({"stopped": why}))
            except OSError:
                return

    def step(self, step: int) -> None:
        """The loop reached ``step``; written when :data:`EVERY` seconds passed since the last write."""
        if self.path is None or step <= self.fields.get("last_step", -1):
            return
        self.fields["last_step"] = step
        self._dirty = True
        if self._clock() - self._written_at >= EVERY:
            self.flush()

    def flush(self, *, gpu: bool = True) -> None:
        if self.path is None:
            return
        if gpu and "gpu_model" not in self.fields:
            self.fields.update(gpu_info())
        partial = self.path.with_name(self.path.name + ".tmp")
        try:
            partial.write_text(json.dumps(self.fields))
            os.replace(partial, self.path)
        except OSError:
            self.path = None  # the supervisor's folder is gone: keep training, stop reporting
            return
        self._written_at = self._clock()
        self._dirty = False

    @property
    def pending(self) -> bool:
        """Steps were reached since the last write."""
        return self._dirty


def gpu_info() -> dict[str, Any]:
    """``{"gpu_model", "gpu_count"}`` from torch when the training process already imported it and sees CUDA."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return {"gpu_model": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count()}
    except Exception:  # noqa: S110 - a broken driver must not stop training; the supervisor counts from the env
        pass
    return {"gpu_model": None, "gpu_count": 0}


def completed(child: dict[str, Any]) -> bool | None:
    """From a report read by :func:`read`: whether the SDK's block ended normally; None when the child wrote no
    ``completed`` field (it does not use the SDK, or is not rank 0's report)."""
    value = child.get("completed")
    return value if isinstance(value, bool) else None


def stopped(child: dict[str, Any]) -> str | None:
    """From a report read by :func:`read`: why the ranks stopped before their end, or None."""
    value = child.get("stopped")
    return value[:500] if isinstance(value, str) and value else None


def read(path: str) -> dict[str, Any]:
    """The child's last report, or ``{}`` when it wrote none; ``stopped`` from another process of the pod when the
    report has none."""
    report = _document(Path(path))
    if "stopped" not in report:
        for other in sorted(Path(path).parent.glob(f"{Path(path).name}.stopped-*")):
            if isinstance(why := _document(other).get("stopped"), str):
                report["stopped"] = why
                break
    return report


def _document(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
