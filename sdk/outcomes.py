"""The exit-code contract: every code a podtrain process exits with, the outcome it names, and what it asks of the
orchestrator.

An orchestrator (a DAG, a Job's ``podFailurePolicy``, a shell loop) decides from the exit code alone whether to
retry; the termination message and the run record name the same ending with an outcome word. This table is the
one place both are defined: the supervisor, the SDK and the CLI take their codes from here, and the Airflow
package keeps a copy (it must not import podtrain) that a test holds equal to this one.

====  ========================  ============  ===============================================================
code  outcome                   retry         meaning
====  ========================  ============  ===============================================================
0     ``succeeded``             done          the command reached its end
1     ``failed``                never         the user's command failed; the same code fails the same way
2     ``config_error``          never         bad configuration or usage: a setting, a flag, a URL to fix
69    ``storage_unavailable``   retry_later   the object store did not answer through the retries (or the
                                              outputs were not pushed): retry once it may be back
75    ``preempted``             retry         a stop signal arrived; the newest checkpoint stands and the next
                                              attempt resumes from it
130   ``interrupted``           never         Ctrl-C stopped ``podtrain pull`` / ``push`` (128 + SIGINT); what
                                              landed is kept. Never from ``podtrain run``
====  ========================  ============  ===============================================================

``podtrain run`` (the supervisor) exits with 0, 1, 2, 69 or 75 only (:data:`SUPERVISOR_OUTCOMES`); these are the
codes an orchestrator acts on, and the ones the Airflow copy holds. A container can also end with 137 or 143
(SIGKILL, SIGTERM) when it is killed before podtrain's own code runs; those are the kernel's, not podtrain's.

Other outcome words, with no code of their own: ``running`` (the run record's entry while the child runs), and
``smoke_passed`` / ``smoke_failed`` (``podtrain smoke``'s termination message, with exit 0 / 1).

Standard library only and nothing else imported: the supervisor's start-up and the Airflow side's copy stay light.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, NamedTuple

__all__ = [
    "CODES",
    "CONFIG_ERROR",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_UNAVAILABLE",
    "FAILED",
    "INTERRUPTED",
    "PREEMPTED",
    "RUNNING",
    "SMOKE_FAILED",
    "SMOKE_PASSED",
    "STORAGE_UNAVAILABLE",
    "SUCCEEDED",
    "SUPERVISOR_OUTCOMES",
    "ExitCode",
    "Retry",
    "outcome_name",
]

Retry = Literal["done", "retry", "retry_later", "never"]
"""What the orchestrator does: nothing (``done``), retry now (``retry``: the next attempt resumes), retry after a
wait (``retry_later``: something outside the run was down), or fail for good (``never``: it would fail the same way).
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE of sysexits.h
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped

SUCCEEDED = "succeeded"
FAILED = "failed"
CONFIG_ERROR = "config_error"
STORAGE_UNAVAILABLE = "storage_unavailable"
PREEMPTED = "preempted"
INTERRUPTED = "interrupted"
RUNNING = "running"
SMOKE_PASSED = "smoke_passed"
SMOKE_FAILED = "smoke_failed"


class ExitCode(NamedTuple):
    """One row of the contract. ``supervisor``: ``podtrain run`` may exit with it (the orchestrator's codes)."""

    code: int
    outcome: str
    retry: Retry
    supervisor: bool
    meaning: str


CODES: Mapping[int, ExitCode] = MappingProxyType(
    {
        row.code: row
        for row in (
            ExitCode(EXIT_OK, SUCCEEDED, "done", True, "the command reached its end"),
            ExitCode(EXIT_FAILED, FAILED, "never", True, "the command failed"),
            ExitCode(EXIT_CONFIG, CONFIG_ERROR, "never", True, "bad configuration or usage"),
            ExitCode(EXIT_UNAVAILABLE, STORAGE_UNAVAILABLE, "retry_later", True, "storage unavailable"),
            ExitCode(EXIT_PREEMPTED, PREEMPTED, "retry", True, "preempted: the next attempt resumes"),
            ExitCode(EXIT_INTERRUPTED, INTERRUPTED, "never", False, "interrupted (Ctrl-C) in pull or push"),
        )
    }
)
"""Every exit code podtrain's own processes choose, by code."""

SUPERVISOR_OUTCOMES: Mapping[int, str] = MappingProxyType(
    {row.code: row.outcome for row in CODES.values() if row.supervisor}
)
"""``podtrain run``'s codes and the outcome each writes to the termination message and the run record."""


def outcome_name(code: int) -> str:
    """The outcome word for exit ``code``; KeyError for a code outside the contract."""
    return CODES[code].outcome
