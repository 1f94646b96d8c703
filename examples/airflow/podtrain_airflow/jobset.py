"""A training task over several pods as one JobSet (kubernetes-sigs/jobset, ``jobset.x-k8s.io/v1alpha2``, written
against release v0.12.0): the pod the single-pod operator builds, once per node, started and restarted as a gang.

Every pod is :mod:`podtrain_airflow.gangpod`'s template: ``torchrun`` over all nodes with ``MASTER_ADDR`` pod 0's
stable name through the headless service JobSet makes (``<jobset>-node-0-0.<jobset>``); the JobSet adds
``PODTRAIN_RESTART_ATTEMPT`` from the pod label JobSet sets (``jobset.sigs.k8s.io/restart-attempt``): podtrain then
numbers the attempt try x 1000 + restart, so a gang restarted in the cluster fences the one it replaces.

**Who restarts what.** A pod's exit code says what happened (podtrain's contract, :mod:`podtrain_airflow.exitcodes`),
and the Job's ``podFailurePolicy`` fails the Job at once on any of them (``backoffLimit: 0``: no pod is replaced
alone — the survivors would wait in a collective for it). The Job controller then writes which rule matched into
the Job's failure message (``Container base for pod <ns>/<pod> failed with exit code 75 matching FailJob rule at
index 1``; ``Pod <ns>/<pod> has condition DisruptionTarget matching FailJob rule at index 2``: kubernetes/kubernetes
``pkg/controller/job/pod_failure_policy.go``), and the JobSet's failure policy matches that message
(``onJobFailureMessagePatterns``, JobSet v0.10.0 and later):

* exit 75 (preempted) or an eviction (``DisruptionTarget``): the whole JobSet restarts without spending its restart
  budget (``RestartJobSetAndIgnoreMaxRestarts``): preemptions never use up retries;
* exit 1 or 2 (a bug, a setting to fix): the JobSet fails at once (``FailJobSet``): a bug is never retried;
* exit 69 (storage unavailable) and anything else: the JobSet restarts within ``maxRestarts``.

``restartStrategy: BlockingRecreate``: a restarted gang's pods are created only once every pod of the old one is
gone, so two gangs never write at once (fencing would stop the old one anyway; this keeps it from trying).

The JobSet restarts in the cluster, so the Airflow task waits for the JobSet's end and retries only what the JobSet
could not (its restart budget spent): a preemption never consumes the task's retries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from podtrain_airflow.gangpod import (
    CONTAINER,
    MASTER_PORT,
    RESTART_FREE,
    USER_ERROR,
    gang_pod_template,
    pod_failure_rules,
    torchrun_args,
)

__all__ = [
    "API_VERSION",
    "CONTAINER",
    "GROUP",
    "MASTER_PORT",
    "PLURAL",
    "REPLICATED_JOB",
    "RESTART_LABEL",
    "VERSION",
    "jobset_body",
    "master_addr",
    "torchrun_args",
]

GROUP, VERSION, PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
API_VERSION = f"{GROUP}/{VERSION}"
REPLICATED_JOB = "node"  # the one replicated job: a Job of N indexed pods, one per node
RESTART_LABEL = "jobset.sigs.k8s.io/restart-attempt"


def master_addr(name: str) -> str:
    """Pod 0's stable name in the JobSet ``name``: ``<jobset>-<replicated job>-<job index>-<pod index>`` under the
    JobSet's headless service (its subdomain)."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


def jobset_body(
    pod: Mapping[str, Any],
    *,
    name: str,
    nodes: int,
    procs_per_node: int,
    max_restarts: int = 3,
    port: int = MASTER_PORT,
    torchrun: bool = True,
) -> dict[str, Any]:
    """The JobSet ``name`` running ``pod`` (the single-pod operator's pod, serialized: ``ApiClient().
    sanitize_for_serialization(pod)``, its container's args the training command) on ``nodes`` pods;
    ``torchrun=False`` runs the args as they are on every pod (the preflight)."""
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, not {max_restarts}")
    restart = {
        "name": "PODTRAIN_RESTART_ATTEMPT",
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{RESTART_LABEL}']"}},
    }
    template = gang_pod_template(
        pod,
        master_addr=master_addr(name),
        nodes=nodes,
        procs_per_node=procs_per_node,
        port=port,
        torchrun=torchrun,
        env=[restart],
    )
    metadata = pod.get("metadata") or {}
    body_metadata: dict[str, Any] = {"name": name, "labels": dict(template["metadata"]["labels"])}
    if metadata.get("namespace"):
        body_metadata["namespace"] = metadata["namespace"]
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": body_metadata,
        "spec": {
            "failurePolicy": {
                "maxRestarts": max_restarts,
                "restartStrategy": "BlockingRecreate",
                "rules": _jobset_rules(),
            },
            "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": 1,
                    "template": {
                        "spec": {
                            "parallelism": nodes,
                            "completions": nodes,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "podFailurePolicy": {"rules": pod_failure_rules()},
                            "template": template,
                        }
                    },
                }
            ],
        },
    }


def _codes(codes: tuple[int, ...]) -> str:
    return "|".join(str(c) for c in codes)


def _jobset_rules() -> list[dict[str, Any]]:
    """The JobSet's rules, matching the Job controller's failure message for each podFailurePolicy rule."""
    reason = ["PodFailurePolicy"]
    return [
        {
            "name": "user-error",
            "action": "FailJobSet",
            "onJobFailureReasons": reason,
            "onJobFailureMessagePatterns": [
                rf"failed with exit code ({_codes(USER_ERROR)}) matching FailJob rule at index 0"
            ],
        },
        {
            "name": "preempted",
            "action": "RestartJobSetAndIgnoreMaxRestarts",
            "onJobFailureReasons": reason,
            "onJobFailureMessagePatterns": [
                rf"failed with exit code ({_codes(RESTART_FREE)}) matching FailJob rule at index 1",
                r"has condition DisruptionTarget matching FailJob rule at index 2",
            ],
        },
        {"name": "other", "action": "RestartJobSet"},
    ]
