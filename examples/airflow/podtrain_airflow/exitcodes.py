"""podtrain run's exit codes, as the Airflow side reads them: code -> (outcome, retry).

A copy of the contract in podtrain's ``sdk/outcomes.py`` (the codes ``podtrain run`` exits with), kept here because
the Airflow side never imports podtrain: the DAG's image is not the training image. podtrain's test suite loads this
file by its path and holds the two tables equal, so neither side can change a code alone.

``retry`` says what the orchestrator does: ``done`` (nothing to retry), ``retry`` (at once: the next attempt
resumes from the newest checkpoint), ``retry_later`` (something outside the run was down), ``never`` (the same
command would fail the same way). Standard library only: no Airflow, no kubernetes, no podtrain.
"""

from __future__ import annotations

__all__ = ["PODTRAIN_EXIT_CODES", "PODTRAIN_OUTCOMES", "RETRIED"]

PODTRAIN_EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("succeeded", "done"),
    1: ("failed", "never"),
    2: ("config_error", "never"),
    69: ("storage_unavailable", "retry_later"),
    75: ("preempted", "retry"),
}

RETRIED = frozenset({"retry", "retry_later"})
"""The retry meanings Airflow retries on (a :class:`~podtrain_airflow.errors.PodRetryable`)."""

PODTRAIN_OUTCOMES: dict[int, str] = {code: outcome for code, (outcome, _) in PODTRAIN_EXIT_CODES.items()}
"""The outcome word podtrain's termination message carries with each code."""
