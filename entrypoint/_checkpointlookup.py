"""What the supervisor asks the checkpoint store, without torch and within a time limit: the attempt number to run
next, and the newest committed checkpoint (where the next attempt resumes, named in the termination message).

Both read manifests and attempt markers only (``Checkpointer.list(verify=False)``, ``Checkpointer.attempt``), with
a short retry policy, and give a reason instead of raising: a store that is down or slow costs the supervisor a
note in its message, never its exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from entrypoint._timebox import within

__all__ = ["derive_attempt", "newest_checkpoint"]


def newest_checkpoint(
    uri: str,
    *,
    run_id: str,
    attempt: int | None,
    timeout: float,
) -> tuple[int | None, str | None, str]:
    """``(step, url, note)`` of the newest committed checkpoint under ``uri``, within ``timeout`` seconds.

    Reads manifests only (no torch, no file checks). ``note`` is empty when a checkpoint was found, otherwise
    says why there is none (none committed, store missing, unreachable, too slow).
    """
    from sdk.stores.store import split_url

    protocol, path = split_url(uri)
    if protocol == "file" and not Path(path).exists():
        return None, None, f"no checkpoint committed yet ({uri} does not exist)"

    def look() -> Any:
        from sdk.checkpoints.checkpointer import Checkpointer

        return Checkpointer(uri, run_id=run_id, attempt=attempt or 1, retry=_quick_retry(timeout)).list(verify=False)

    infos, problem = within(timeout, look, "podtrain-newest-checkpoint")
    if problem:
        return None, None, f"checkpoint store {uri} {problem}"
    if not infos:
        return None, None, f"no checkpoint committed yet under {uri}"
    return infos[0].step, infos[0].url, ""


def derive_attempt(uri: str, *, run_id: str, timeout: float) -> tuple[int | None, str]:
    """``(attempt, note)``: the next attempt number after the newest the checkpoint store has seen, reserved there
    (:func:`sdk.checkpoints._fence.reserve_attempt`: no other process can derive it too), within ``timeout``.

    The supervisor derives it once and passes it to the child as ``PODTRAIN_ATTEMPT``, so that every rank of a
    multi-process child uses the same number. ``None`` with the reason when the store did not answer.
    """

    def look() -> Any:
        from sdk.checkpoints.checkpointer import Checkpointer

        return Checkpointer(uri, run_id=run_id, retry=_quick_retry(timeout)).attempt

    attempt, problem = within(timeout, look, "podtrain-derive-attempt")
    return attempt, f"checkpoint store {uri} {problem}" if problem else ""


def _quick_retry(timeout: float) -> Any:
    """Two tries and short waits: the answer is wanted within ``timeout``, and a note does without it."""
    from sdk.stores.store import RetryPolicy

    return RetryPolicy(attempts=2, initial_wait=0.1, max_wait=0.5, jitter=0.1, timeout=max(timeout, 1.0))
