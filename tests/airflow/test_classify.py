"""The failure classifier against real ``kubernetes.client.V1Pod`` objects, shaped as the API returns them for each
way a training pod ends, and the exception and retry decision each verdict leads to."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from kubernetes.client import models as k8s
from podtrain_airflow import RETRY_KINDS, classify, error_for, retry_policy, termination_message
from podtrain_airflow.errors import (
    ConfigError,
    ImageError,
    OutOfMemory,
    PodFailure,
    PodPreempted,
    PodRetryable,
    PodVanished,
    StorageUnavailable,
    TrainingFailed,
    UnexpectedExit,
    Unschedulable,
)

NOW = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)


def message(outcome: str, code: int, **extra: Any) -> str:
    """podtrain's termination message, as `podtrain run` writes it."""
    body = {
        "outcome": outcome,
        "exit_code": code,
        "run_id": "r1",
        "attempt": 1,
        "step": 200,
        "checkpoint": "s3://b/runs/r1/step-0000000200",
        "seconds": 43.3,
        "gpu_seconds": 43.3,
        "message": f"{outcome}: details",
    }
    body.update(extra)
    return json.dumps(body)


def pod(
    phase: str,
    *,
    exit_code: int | None = None,
    reason: str | None = None,
    term_message: str | None = None,
    waiting: str | None = None,
    conditions: list[k8s.V1PodCondition] | None = None,
    pod_reason: str | None = None,
    pod_message: str | None = None,
    deleting: bool = False,
) -> k8s.V1Pod:
    """A pod named ``train-x`` with one container ``base`` in the given state."""
    state = k8s.V1ContainerState()
    if exit_code is not None:
        state.terminated = k8s.V1ContainerStateTerminated(
            exit_code=exit_code,
            reason=reason or ("Completed" if exit_code == 0 else "Error"),
            message=term_message,
            started_at=NOW,
            finished_at=NOW,
        )
    elif waiting is not None:
        state.waiting = k8s.V1ContainerStateWaiting(reason=waiting, message=f"{waiting}: details")
    else:
        state.running = k8s.V1ContainerStateRunning(started_at=NOW)
    statuses = (
        [k8s.V1ContainerStatus(name="base", image="img:1", image_id="", ready=False, restart_count=0, state=state)]
        if phase != "Pending" or waiting
        else None
    )
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="train-x", namespace="default", deletion_timestamp=NOW if deleting else None),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", image="img:1")]),
        status=k8s.V1PodStatus(
            phase=phase,
            reason=pod_reason,
            message=pod_message,
            conditions=conditions,
            container_statuses=statuses,
        ),
    )


def condition(type_: str, status: str, reason: str, message: str = "") -> k8s.V1PodCondition:
    return k8s.V1PodCondition(type=type_, status=status, reason=reason, message=message or None)


DISRUPTION = condition("DisruptionTarget", "True", "PreemptionByScheduler", "Kubernetes Scheduler: preempted")

# (case, pod, kind, exception type or None for success)
CASES = [
    ("success", pod("Succeeded", exit_code=0, term_message=message("succeeded", 0)), "succeeded", None),
    ("exit 75", pod("Failed", exit_code=75, term_message=message("preempted", 75)), "preempted", PodPreempted),
    (
        "DisruptionTarget, exit 75",
        pod("Failed", exit_code=75, term_message=message("preempted", 75), conditions=[DISRUPTION]),
        "preempted",
        PodPreempted,
    ),
    (
        "DisruptionTarget before the container ended",
        pod("Running", conditions=[DISRUPTION], deleting=True),
        "preempted",
        PodPreempted,
    ),
    (
        "DisruptionTarget, killed after the grace period",
        pod("Failed", exit_code=137, reason="Error", conditions=[DISRUPTION]),
        "preempted",
        PodPreempted,
    ),
    (
        "Evicted",
        pod("Failed", pod_reason="Evicted", pod_message="The node was low on resource: memory."),
        "preempted",
        PodPreempted,
    ),
    (
        "OOMKilled",
        pod("Failed", exit_code=137, reason="OOMKilled", term_message="Killed\n"),
        "oom_killed",
        OutOfMemory,
    ),
    ("exit 1", pod("Failed", exit_code=1, term_message=message("failed", 1)), "failed", TrainingFailed),
    ("exit 2", pod("Failed", exit_code=2, term_message=message("config_error", 2)), "config_error", ConfigError),
    (
        "exit 69",
        pod("Failed", exit_code=69, term_message=message("storage_unavailable", 69)),
        "storage_unavailable",
        StorageUnavailable,
    ),
    (
        "not JSON: a log tail from a wrong entrypoint",
        pod("Failed", exit_code=127, term_message="sh: 1: podtrain: not found\n"),
        "unknown_exit",
        UnexpectedExit,
    ),
    (
        "not JSON, exit 1",
        pod("Failed", exit_code=1, term_message="Traceback (most recent call last):\nValueError: boom\n"),
        "failed",
        TrainingFailed,
    ),
    (
        "not JSON, exit 75",
        pod("Failed", exit_code=75, term_message="preempted, termination log not writable"),
        "preempted",
        PodPreempted,
    ),
    ("SIGTERM from outside", pod("Failed", exit_code=143, term_message=""), "preempted", PodPreempted),
    (
        "unschedulable GPU request",
        pod(
            "Pending",
            conditions=[
                condition(
                    "PodScheduled", "False", "Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
                )
            ],
        ),
        "unschedulable",
        Unschedulable,
    ),
    ("image cannot be pulled", pod("Pending", waiting="ImagePullBackOff"), "image_error", ImageError),
    ("missing Secret", pod("Pending", waiting="CreateContainerConfigError"), "image_error", ImageError),
    ("vanished pod", None, "vanished", PodVanished),
    (
        "vanished node",
        pod("Running", pod_reason="NodeLost", pod_message="Node gpu-7 which was running pod train-x is unresponsive"),
        "vanished",
        PodVanished,
    ),
    ("node state unknown", pod("Unknown"), "vanished", PodVanished),
    (
        "container status unknown",
        pod("Failed", exit_code=137, reason="ContainerStatusUnknown"),
        "vanished",
        PodVanished,
    ),
    ("still running when the task stopped", pod("Running"), "interrupted", PodVanished),
]


@pytest.mark.parametrize(("case", "the_pod", "kind", "error"), CASES, ids=[c[0] for c in CASES])
def test_classify(case: str, the_pod: k8s.V1Pod | None, kind: str, error: type[Exception] | None) -> None:
    """Each way a pod ends gets its kind, its retry decision, and the exception family that carries it."""
    verdict = classify(the_pod, "base", gpu_request="1 x nvidia.com/gpu")
    assert verdict.kind == kind, verdict
    assert verdict.retry is RETRY_KINDS[kind]
    if error is None:
        assert verdict.succeeded
        return
    exc = error_for(verdict, pod_name="train-x", hint="a hint")
    assert type(exc) is error
    assert isinstance(exc, PodRetryable) is verdict.retry
    assert isinstance(exc, PodFailure) is not verdict.retry
    assert str(exc).startswith(f"pod train-x: {kind}: ")
    assert ("(a hint)" in str(exc)) is not verdict.retry  # hints only on failures


def test_retry_only_on_preemption_storage_and_vanishing() -> None:
    """Exactly preempted, storage_unavailable, vanished and interrupted are retried."""
    assert {k for k, retry in RETRY_KINDS.items() if retry} == {
        "preempted",
        "storage_unavailable",
        "vanished",
        "interrupted",
    }


def test_podtrain_exit_codes_are_classified_by_their_retry_meaning() -> None:
    """Each of podtrain run's codes, with its termination message, becomes the kind its outcome names, retried exactly
    when the contract says retry or retry later (:mod:`podtrain_airflow.exitcodes`)."""
    from podtrain_airflow.exitcodes import PODTRAIN_EXIT_CODES, RETRIED

    for code, (outcome, retry) in PODTRAIN_EXIT_CODES.items():
        verdict = classify(pod("Failed", exit_code=code, term_message=message(outcome, code)))
        assert (verdict.kind, verdict.retry) == (outcome, retry in RETRIED), code


def test_messages_say_which() -> None:
    """The failure messages name the cause: exit code, OOMKilled, the scheduler's reason, the resume point."""
    by_case = {c[0]: classify(c[1], gpu_request="1 x nvidia.com/gpu") for c in CASES}
    assert "OOMKilled" in by_case["OOMKilled"].message and "memory limit" in by_case["OOMKilled"].message
    assert "Insufficient nvidia.com/gpu" in by_case["unschedulable GPU request"].message
    assert "for 1 x nvidia.com/gpu" in by_case["unschedulable GPU request"].message
    assert "exit 1" in by_case["exit 1"].message and "failed: details" in by_case["exit 1"].message
    assert "from step 200 (s3://b/runs/r1/step-0000000200)" in by_case["exit 75"].message
    assert "podtrain: not found" in by_case["not JSON: a log tail from a wrong entrypoint"].message
    assert "PreemptionByScheduler" in by_case["DisruptionTarget before the container ended"].message


def test_termination_message_parsing() -> None:
    """podtrain's JSON line is parsed; a log tail, empty text or other JSON is not a termination message."""
    assert termination_message(message("preempted", 75))["step"] == 200
    assert termination_message("some log\n" + message("failed", 1))["exit_code"] == 1
    for raw in (None, "", "Traceback ...", "[1, 2]", '{"other": 1}'):
        assert termination_message(raw) is None


def test_retry_policy_decisions() -> None:
    """Airflow's ExceptionRetryPolicy retries PodRetryable, fails PodFailure and anything else at once."""
    from airflow.sdk import RetryAction

    policy = retry_policy()
    for _, the_pod, kind, error in CASES:
        if error is None:
            continue
        decision = policy.evaluate(error_for(classify(the_pod)), try_number=1, max_tries=4)
        assert decision.action is (RetryAction.RETRY if RETRY_KINDS[kind] else RetryAction.FAIL), kind
    assert policy.evaluate(RuntimeError("a bug in the DAG"), try_number=1, max_tries=4).action is RetryAction.FAIL
    from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy

    again = ExceptionRetryPolicy.deserialize(policy.serialize())
    assert again.evaluate(error_for(classify(None)), try_number=1, max_tries=4).action is RetryAction.RETRY


def test_failures_are_airflow_fail_exceptions() -> None:
    """PodFailure is an AirflowFailException (fails at once even without the policy); PodRetryable is not."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    assert issubclass(PodFailure, AirflowFailException)
    assert issubclass(PodRetryable, AirflowException) and not issubclass(PodRetryable, AirflowFailException)


def smoke_message(ok: bool, cause: str | None = None) -> str:
    """``podtrain smoke``'s termination message, as it writes it."""
    text = "smoke passed: 1 GPU(s), NVIDIA H100" if ok else f"smoke failed: torch.cuda sees no device — {cause}"
    return json.dumps(
        {
            "outcome": "smoke_passed" if ok else "smoke_failed",
            "exit_code": 0 if ok else 1,
            "seconds": 2.1,
            "gpus": 1 if ok else 0,
            "cause": cause,
            "message": text,
        }
    )


def test_preflight_verdicts() -> None:
    """A preflight pod: smoke's pass, smoke's failure with its cause, nvidia-smi failing (a log tail) are read as
    the preflight's; a preemption or an OOM kill of the preflight is read as any pod's."""
    from podtrain_airflow import PreflightFailed

    passed = classify(pod("Succeeded", exit_code=0, term_message=smoke_message(True)), preflight=True)
    assert passed.succeeded and "the GPU preflight passed: smoke passed: 1 GPU(s)" in passed.message

    smoke = classify(pod("Failed", exit_code=1, term_message=smoke_message(False, "no_gpu")), preflight=True)
    assert smoke.kind == "preflight_failed" and not smoke.retry
    assert "podtrain smoke failed (no_gpu), exit 1: smoke failed: torch.cuda sees no device" in smoke.message
    exc = error_for(smoke, pod_name="gpu-preflight-x", hint="wrong node pool?")
    assert type(exc) is PreflightFailed and isinstance(exc, PodFailure) and "(wrong node pool?)" in str(exc)

    tail = "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."
    smi = classify(pod("Failed", exit_code=9, term_message=tail), preflight=True)
    assert smi.kind == "preflight_failed" and "exited 9 before podtrain smoke" in smi.message and tail in smi.message
    missing = classify(pod("Failed", exit_code=127, term_message="sh: nvidia-smi: not found"), preflight=True)
    assert missing.kind == "preflight_failed" and "nvidia-smi: not found" in missing.message

    assert classify(pod("Failed", exit_code=143, conditions=[DISRUPTION]), preflight=True).kind == "preempted"
    assert classify(pod("Failed", exit_code=137, reason="OOMKilled"), preflight=True).kind == "oom_killed"
    # Not a preflight: smoke's exit 1 with its JSON reads as podtrain's exit 1.
    assert classify(pod("Failed", exit_code=1, term_message=smoke_message(False, "no_gpu"))).kind == "failed"
    assert policy_action(smoke) == "FAIL"


def policy_action(verdict: Any) -> str:
    return str(retry_policy().evaluate(error_for(verdict), try_number=1, max_tries=4).action.name)
