"""What a finished training pod says: retry (preempted, storage or node gone) or fail at once, and why.

Reads only the pod object (``kubernetes.client.V1Pod``, or ``None`` when the pod no longer exists), so it is
tested without a cluster and without Airflow. The evidence, strongest first:

1. the base container's exit code, when podtrain's JSON termination message confirms it is the supervisor's
   (0, 1, 2, 69, 75: the contract of ``podtrain run``, copied in :mod:`podtrain_airflow.exitcodes`);
2. the container's termination reason (``OOMKilled``, ``ContainerStatusUnknown``);
3. the pod: a ``DisruptionTarget`` condition, status reason ``Evicted`` / ``NodeLost`` / ``Terminated`` /
   ``NodeShutdown``, a deletion in progress, phase ``Unknown``, or no pod at all (deleted, node gone);
4. why it never started: ``PodScheduled=False`` with reason ``Unschedulable``, an image that cannot be pulled, a
   missing Secret or ConfigMap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import models as k8s

from podtrain_airflow.exitcodes import PODTRAIN_OUTCOMES

__all__ = ["RETRY_KINDS", "Verdict", "classify", "termination_message"]

# kind -> retry? Every kind classify() returns is here; README.md has the same table.
RETRY_KINDS: dict[str, bool] = {
    "succeeded": False,
    "preempted": True,  # exit 75, a DisruptionTarget condition, an eviction, SIGTERM/SIGKILL from outside
    "storage_unavailable": True,  # exit 69: the object store could not be reached after retries
    "vanished": True,  # the pod or its node is gone before its end was seen
    "interrupted": True,  # the task stopped following a pod that was still running (it was deleted)
    "failed": False,  # exit 1: the training command failed
    "config_error": False,  # exit 2: bad configuration or usage
    "oom_killed": False,  # the container went over its memory limit
    "unschedulable": False,  # no node can take the GPU request (selector, tolerations, capacity)
    "image_error": False,  # the image cannot be pulled, or the container cannot be created
    "unknown_exit": False,  # any other exit code: not podtrain's contract (wrong image or entrypoint?)
    "preflight_failed": False,  # the GPU preflight (nvidia-smi, podtrain smoke) found the pod unfit to train
}

_SIGNAL_EXITS = {137: "SIGKILL", 143: "SIGTERM"}
_GONE_REASONS = {"NodeLost", "NodeShutdown", "Terminated", "Shutdown", "NodeAffinity"}
_IMAGE_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_CREATE_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


@dataclass(frozen=True)
class Verdict:
    """The classification of one finished (or vanished) pod."""

    kind: str
    message: str
    exit_code: int | None = None
    termination: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def retry(self) -> bool:
        return RETRY_KINDS[self.kind]

    @property
    def succeeded(self) -> bool:
        return self.kind == "succeeded"


def termination_message(raw: str | None) -> dict[str, Any] | None:
    """podtrain's termination message as a dict, or ``None`` when ``raw`` is not one (a log tail, empty)."""
    if not raw:
        return None
    try:
        value = json.loads(raw.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    if isinstance(value, dict) and "outcome" in value and "exit_code" in value:
        return value
    return None


def classify(
    pod: k8s.V1Pod | None, container: str = "base", *, gpu_request: str = "", preflight: bool = False
) -> Verdict:
    """Classify ``pod`` (``None``: it no longer exists). ``gpu_request`` (e.g. ``"1 x NVIDIA-H100"``) only words
    the message of an unschedulable pod. ``preflight``: the pod ran the GPU preflight (``nvidia-smi`` and
    ``podtrain smoke``, outside ``podtrain run``), whose exit is read as smoke's: 0 passed, else
    ``preflight_failed`` with smoke's own termination message, or the log tail when ``nvidia-smi`` failed first."""
    if pod is None:
        return Verdict(
            "vanished",
            "the pod no longer exists: its node went away, or it was evicted or deleted before it finished",
        )
    status = pod.status or k8s.V1PodStatus()
    conditions = {c.type: c for c in status.conditions or []}
    state = _container_state(status, container)
    terminated = state.terminated if state else None
    disruption = conditions.get("DisruptionTarget")
    disrupted = disruption is not None and disruption.status == "True"

    if terminated is not None:
        if preflight:
            verdict = _from_preflight(terminated, status, disrupted)
            if verdict is not None:
                return verdict
        return _from_exit(terminated, status, disruption if disrupted else None)
    if disrupted:
        return Verdict("preempted", f"the pod was disrupted ({_condition_text(disruption)}) before its container ended")
    if status.reason == "Evicted":
        return Verdict("preempted", f"the pod was evicted: {status.message or 'no message'}")
    if status.reason in _GONE_REASONS or status.phase == "Unknown":
        return Verdict("vanished", f"the pod's node is gone ({status.reason or status.phase}): {status.message or ''}")
    if state is not None and state.waiting is not None:
        reason = state.waiting.reason or ""
        if reason in _IMAGE_REASONS:
            return Verdict("image_error", f"the image cannot be pulled ({reason}): {state.waiting.message or ''}")
        if reason in _CREATE_REASONS:
            return Verdict(
                "image_error",
                f"the container cannot be created ({reason}; a missing Secret or ConfigMap?): "
                f"{state.waiting.message or ''}",
            )
    scheduled = conditions.get("PodScheduled")
    if scheduled is not None and scheduled.status == "False" and scheduled.reason == "Unschedulable":
        what = f" for {gpu_request}" if gpu_request else ""
        return Verdict(
            "unschedulable",
            f"no node can take this pod{what}: {scheduled.message or 'Unschedulable'}. Check the GPU node pool's "
            "labels (node selector) and taints (tolerations), its autoscaler's maximum size and GPU quota, "
            "and that the NVIDIA device plugin advertises nvidia.com/gpu on its nodes",
        )
    if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
        return Verdict("vanished", "the pod is being deleted before its container ended (node drained or lost?)")
    return Verdict(
        "interrupted",
        f"the pod had not finished (phase {status.phase}) when the task stopped following it, and was deleted",
    )


def _from_exit(
    terminated: k8s.V1ContainerStateTerminated, status: k8s.V1PodStatus, disruption: k8s.V1PodCondition | None
) -> Verdict:
    code = terminated.exit_code
    message = termination_message(terminated.message)
    said = f": {message.get('message')}" if message and message.get("message") else ""
    where = _resume_point(message)
    if terminated.reason == "OOMKilled":
        return Verdict(
            "oom_killed",
            f"the container was OOMKilled (exit {code}): it went over its memory limit; raise the memory limit, "
            "the /dev/shm size counts against it too, or lower the batch size or DataLoader workers",
            code,
            message,
        )
    if message is not None and code in PODTRAIN_OUTCOMES:
        kind = PODTRAIN_OUTCOMES[code]
        text = {
            "succeeded": "podtrain run succeeded",
            "failed": "the training command failed (exit 1); not retried, fix the code or its data",
            "config_error": "bad configuration or usage (exit 2); not retried, fix the pod's PODTRAIN_* settings",
            "storage_unavailable": "the object store could not be reached (exit 69); retrying",
            "preempted": "preempted (exit 75); retrying, the next attempt resumes" + where,
        }[kind]
        return Verdict(kind, text + said, code, message)
    if code == 0:
        return Verdict("succeeded", "the container exited 0", code, message)
    if terminated.reason == "ContainerStatusUnknown":
        return Verdict("vanished", f"the container's end was not seen (ContainerStatusUnknown, exit {code})", code)
    if disruption is not None or status.reason == "Evicted":
        cause = _condition_text(disruption) if disruption is not None else f"Evicted: {status.message or ''}"
        return Verdict("preempted", f"the pod was disrupted ({cause}); the container exited {code}", code, message)
    if code in _SIGNAL_EXITS:
        return Verdict(
            "preempted",
            f"the container was killed by {_SIGNAL_EXITS[code]} from outside (exit {code}) before podtrain "
            "could answer: counted as a preemption",
            code,
            message,
        )
    tail = f"; its last words: {terminated.message.strip()[-500:]}" if terminated.message else ""
    if message is None and code in PODTRAIN_OUTCOMES:
        return Verdict(
            PODTRAIN_OUTCOMES[code],
            f"the container exited {code} without podtrain's termination message (is the image's entrypoint "
            f"`podtrain run --`?){tail}",
            code,
        )
    return Verdict(
        "unknown_exit",
        f"the container exited {code} ({terminated.reason or 'no reason'}), not one of podtrain's exit codes: "
        f"is the image's entrypoint `podtrain run --`?{tail}",
        code,
        message,
    )


def _from_preflight(
    terminated: k8s.V1ContainerStateTerminated, status: k8s.V1PodStatus, disrupted: bool
) -> Verdict | None:
    """The preflight's own end (``None``: read it as any pod's: an OOM kill, a preemption, a signal)."""
    code = terminated.exit_code
    raw = terminated.message or ""
    smoke = _smoke_message(raw)
    if code == 0:
        said = f": {smoke['message']}" if smoke and smoke.get("message") else ""
        return Verdict("succeeded", "the GPU preflight passed" + said, code, smoke)
    if terminated.reason == "OOMKilled" or disrupted or status.reason == "Evicted" or code in _SIGNAL_EXITS:
        return None
    if smoke is not None:
        cause = f" ({smoke['cause']})" if smoke.get("cause") else ""
        return Verdict(
            "preflight_failed",
            f"podtrain smoke failed{cause}, exit {code}: {smoke.get('message') or 'no message'}",
            code,
            smoke,
        )
    tail = f"; its last words: {raw.strip()[-500:]}" if raw.strip() else ""
    return Verdict(
        "preflight_failed",
        f"the preflight exited {code} before podtrain smoke could report: nvidia-smi failed or is missing "
        f"(no NVIDIA driver, container toolkit or device plugin on the node?){tail}",
        code,
    )


def _smoke_message(raw: str) -> dict[str, Any] | None:
    """``podtrain smoke``'s termination message (``{"outcome": "smoke_passed" | "smoke_failed", ...}``), if
    ``raw`` is one."""
    message = termination_message(raw)
    if message is not None and str(message.get("outcome", "")).startswith("smoke_"):
        return message
    return None


def _container_state(status: k8s.V1PodStatus, container: str) -> k8s.V1ContainerState | None:
    for item in status.container_statuses or []:
        if item.name == container:
            state: k8s.V1ContainerState | None = item.state
            if state is not None and state.terminated is None and item.last_state and item.last_state.terminated:
                return item.last_state  # type: ignore[no-any-return]
            return state
    return None


def _condition_text(condition: k8s.V1PodCondition | None) -> str:
    if condition is None:
        return "DisruptionTarget"
    return f"DisruptionTarget: {condition.reason or '?'}" + (f", {condition.message}" if condition.message else "")


def _resume_point(message: dict[str, Any] | None) -> str:
    if not message:
        return ""
    if message.get("checkpoint"):
        return f" from step {message.get('step')} ({message['checkpoint']})"
    return " from the start (no checkpoint committed yet)"
