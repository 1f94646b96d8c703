"""How ``podtrain run`` ended: the child's ending classified onto the exit-code contract, and the termination message.

The exit code is the contract with the orchestrator (:mod:`sdk.outcomes`: it retries on 75 and 69 only); the
termination message is one line of JSON, at most 4,096 bytes (Kubernetes' limit), that says why, and where the run
can go on from (:mod:`entrypoint._checkpointlookup` finds the newest checkpoint). Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.outcomes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_UNAVAILABLE, outcome_name
from sdk.redaction import redact, redact_value

__all__ = [
    "DEFAULT_TERMINATION_LOG",
    "FIELDS",
    "MAX_BYTES",
    "Outcome",
    "classify",
    "record",
    "render",
    "signal_name",
    "write_termination_log",
]

MAX_BYTES = 4096
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
FIELDS = ("outcome", "exit_code", "run_id", "attempt", "step", "checkpoint", "seconds", "gpu_seconds", "message")


@dataclass(frozen=True)
class Outcome:
    """What the supervisor exits with, and the sentence that says why."""

    exit_code: int
    message: str

    @property
    def outcome(self) -> str:
        """The outcome word of :attr:`exit_code` (:data:`sdk.outcomes.CODES`)."""
        return outcome_name(self.exit_code)


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; ``signal 77`` for a number with no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def classify(
    returncode: int,
    *,
    preempted: bool = False,
    killed_by_us: bool = False,
    forwarded: frozenset[int] = frozenset(),
    completed: bool | None = None,
    stopped: str | None = None,
) -> Outcome:
    """Map the child's return code (``-N``: killed by signal N, as ``subprocess`` reports it) to an exit code.

    ``preempted``: the supervisor got SIGTERM. Then any failure of the child except a configuration error (2) or
    storage being unavailable (69) is a preemption (75): the child may have died of the forwarded SIGTERM before
    installing a handler, been SIGKILLed at the deadline (``killed_by_us``), or failed while being torn down.
    A child that exits 0 after the SIGTERM succeeded only if it reported completion (``completed``, from the SDK's
    report, :mod:`sdk.lifecycle.childreport`): ``False`` makes it a preemption (75: the run did not reach its end, the
    retry
    resumes); ``None`` (no SDK in the child, nothing reported) trusts the exit code, as the message says.
    ``forwarded``: signals the supervisor passed on to the child. ``stopped``: why the child's ranks stopped
    before their end without a signal to this supervisor (the report's, :func:`sdk.lifecycle.childreport.stopped`):
    another pod of the job was preempted, or ranks went silent. Its failure is then a preemption (75), whatever
    code a launcher such as torchrun turned its workers' 75 into.
    """
    if returncode == 0:
        if not preempted:
            return Outcome(EXIT_OK, "child exited 0")
        if completed is None:
            return Outcome(EXIT_OK, "child exited 0 after SIGTERM (no completion report: the exit code is trusted)")
        if completed:
            return Outcome(EXIT_OK, "child exited 0 after SIGTERM and reported completion")
        return Outcome(
            EXIT_PREEMPTED,
            "preempted: child exited 0 after SIGTERM but did not report completion (the run is unfinished)",
        )
    if returncode == EXIT_CONFIG:
        return Outcome(EXIT_CONFIG, "child exited 2: bad configuration or usage")
    if returncode == EXIT_UNAVAILABLE:
        return Outcome(EXIT_UNAVAILABLE, "child exited 69: storage unavailable")
    how = f"child killed by {signal_name(-returncode)}" if returncode < 0 else f"child exited {returncode}"
    if preempted:
        if killed_by_us:
            return Outcome(EXIT_PREEMPTED, f"preempted: {how} at the grace-period deadline (it did not exit in time)")
        if returncode == EXIT_PREEMPTED:
            return Outcome(EXIT_PREEMPTED, "preempted: child stopped on SIGTERM and exited 75")
        return Outcome(EXIT_PREEMPTED, f"preempted: SIGTERM received and forwarded; {how}")
    if stopped:
        return Outcome(EXIT_PREEMPTED, f"preempted: {stopped}; {how}")
    if returncode == EXIT_PREEMPTED:
        return Outcome(EXIT_PREEMPTED, "child exited 75: preempted")
    if returncode < 0:
        why = " (forwarded)" if -returncode in forwarded else " (not sent by podtrain)"
        return Outcome(EXIT_FAILED, how + why)
    return Outcome(EXIT_FAILED, how)


def record(
    outcome: Outcome,
    *,
    run_id: str | None,
    attempt: int | None,
    step: int | None,
    checkpoint: str | None,
    seconds: float,
    gpus: int,
    note: str = "",
) -> dict[str, Any]:
    """The termination message as a dict, fields in the contract's order."""
    message = outcome.message + (f"; {note}" if note else "")
    return {
        "outcome": outcome.outcome,
        "exit_code": outcome.exit_code,
        "run_id": run_id,
        "attempt": attempt,
        "step": step,
        "checkpoint": checkpoint,
        "seconds": round(seconds, 3),
        "gpu_seconds": round(seconds * gpus, 3),
        "message": message,
    }


def render(fields: Mapping[str, Any], limit: int = MAX_BYTES) -> str:
    """One line of JSON, at most ``limit`` UTF-8 bytes: the ``message`` is cut (marked with ``…``) to fit.

    Secrets are masked first (:func:`sdk.redaction.redact_value`), so a cut never leaves half of one. Bytes that
    were not UTF-8 (held as lone surrogates in ``os.environ`` and ``sys.argv``) are written as ``\\xNN`` text."""
    fields = redact_value({key: _printable(value) for key, value in fields.items()})

    def dump(values: Mapping[str, Any]) -> str:
        return json.dumps(values, ensure_ascii=False, separators=(", ", ": "))

    def size(text: str) -> int:
        return len(text.encode("utf-8"))

    line = dump(fields)
    if size(line) <= limit:
        return line
    values = dict(fields)
    message = str(values.get("message") or "")
    lo, hi = 0, len(message)  # the longest prefix that fits, by bisection (escapes make bytes ≠ characters)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        values["message"] = message[:mid] + "…"
        if size(dump(values)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    values["message"] = message[:lo] + "…" if lo else ""
    line = dump(values)
    for key in ("checkpoint", "run_id"):  # only absurdly long URLs or ids get here
        if size(line) <= limit:
            break
        values[key] = None
        line = dump(values)
    return line


def _printable(value: Any) -> Any:
    """A string with its undecodable bytes (surrogates) spelled ``\\xNN``, so it can be encoded as UTF-8."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape" if _escaped(value) else "backslashreplace").decode(
            "utf-8", "backslashreplace"
        )
    return value


def _escaped(value: str) -> bool:
    return all("\udc80" <= c <= "\udcff" for c in value if "\ud800" <= c <= "\udfff")


def write_termination_log(path: str, line: str, *, warn: Callable[[str], None] | None = None) -> bool:
    """Write ``line`` to ``path``, secrets masked (:func:`sdk.redaction.redact`); False (and no exception) where
    it cannot be written.

    The default ``/dev/termination-log`` is written only where it exists (Kubernetes mounts it), so a run on
    a laptop leaves no file in ``/dev``; any other path is created.
    """
    if not path or (path == DEFAULT_TERMINATION_LOG and not os.path.exists(path)):
        return False
    try:
        with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:  # never a UnicodeEncodeError
            f.write(redact(line) + "\n")
        return True
    except OSError as exc:
        if warn is not None:
            warn(f"termination message not written to {path}: {exc}")
        return False
