"""The exceptions a podtrain task ends with, and the retry policy that maps them to retry or fail.

Two families, so the decision holds with or without the policy:

* :class:`PodRetryable` (an ``AirflowException``): preempted, storage unavailable, pod or node gone, the
  Kubernetes API not answering. Airflow retries it while ``retries`` last; the next attempt resumes.
* :class:`PodFailure` (an ``AirflowFailException``): the training command failed, bad configuration, OOMKilled,
  unschedulable, image error, an exit code outside podtrain's contract. Airflow fails the task at once, whatever
  ``retries`` says.

:func:`retry_policy` is the same mapping as an ``ExceptionRetryPolicy``, with ``FAIL`` for every other exception
(a bug in the DAG, a rejected pod spec): retries are spent on preemptions only.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule
from airflow.sdk.exceptions import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from podtrain_airflow.classify import Verdict

__all__ = [
    "ConfigError",
    "ImageError",
    "KubernetesUnavailable",
    "OutOfMemory",
    "PodFailure",
    "PodPreempted",
    "PodRetryable",
    "PodVanished",
    "PreflightFailed",
    "StorageUnavailable",
    "TrainingFailed",
    "UnexpectedExit",
    "Unschedulable",
    "error_for",
    "retry_policy",
]


class PodtrainTaskError(Exception):
    """Mixed into every podtrain task exception: the verdict it came from (``None`` when there was no pod)."""

    verdict: Verdict | None = None

    def __init__(self, message: str, verdict: Verdict | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict


class PodRetryable(PodtrainTaskError, AirflowException):
    """The run can go on in a new attempt: retried."""


class PodPreempted(PodRetryable):
    """Exit 75, a ``DisruptionTarget`` condition, an eviction, SIGTERM/SIGKILL from outside, or the task itself was
    stopped and its pod deleted."""


class StorageUnavailable(PodRetryable):
    """Exit 69: the object store could not be reached after podtrain's own retries."""


class PodVanished(PodRetryable):
    """The pod or its node is gone before its end was seen, or the task stopped following a running pod."""


class KubernetesUnavailable(PodRetryable):
    """The Kubernetes API did not answer (429, 5xx, connection errors) before the pod existed."""


class PodFailure(PodtrainTaskError, AirflowFailException):
    """Retrying cannot help: failed at once."""


class TrainingFailed(PodFailure):
    """Exit 1: the training command failed."""


class ConfigError(PodFailure):
    """Exit 2: bad configuration or usage."""


class OutOfMemory(PodFailure):
    """The container was OOMKilled."""


class Unschedulable(PodFailure):
    """No node can take the pod's request (GPU type and count, selector, tolerations)."""


class ImageError(PodFailure):
    """The image cannot be pulled or the container cannot be created."""


class UnexpectedExit(PodFailure):
    """An exit code outside podtrain's contract."""


class PreflightFailed(PodFailure):
    """The GPU preflight found the pod unfit to train (nvidia-smi failing, podtrain smoke failing)."""


_BY_KIND: dict[str, type[PodtrainTaskError]] = {
    "preempted": PodPreempted,
    "storage_unavailable": StorageUnavailable,
    "vanished": PodVanished,
    "interrupted": PodVanished,
    "failed": TrainingFailed,
    "config_error": ConfigError,
    "oom_killed": OutOfMemory,
    "unschedulable": Unschedulable,
    "image_error": ImageError,
    "unknown_exit": UnexpectedExit,
    "preflight_failed": PreflightFailed,
}


def error_for(verdict: Verdict, *, pod_name: str = "", hint: str = "") -> PodtrainTaskError:
    """The exception that ends a task whose pod got ``verdict`` (not for ``succeeded``)."""
    cls = _BY_KIND[verdict.kind]
    prefix = f"pod {pod_name}: " if pod_name else ""
    suffix = f" ({hint})" if hint and not verdict.retry else ""
    return cls(f"{prefix}{verdict.kind}: {verdict.message}{suffix}", verdict)


def retry_policy(retry_delay: timedelta | None = None) -> ExceptionRetryPolicy:
    """Retry :class:`PodRetryable`, fail everything else at once (``PodFailure`` fails regardless)."""
    return ExceptionRetryPolicy(
        rules=[
            RetryRule(
                exception=PodRetryable,
                action=RetryAction.RETRY,
                retry_delay=retry_delay,
                reason="preempted, storage or node gone: the next attempt resumes from its checkpoint",
            ),
            RetryRule(exception=PodFailure, action=RetryAction.FAIL, reason="retrying cannot help"),
        ],
        default=RetryAction.FAIL,
    )
