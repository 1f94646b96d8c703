"""A training task over several pods as one JobSet (kubernetes-sigs/jobset, ``jobset.x-k8s.io/v1alpha2``, written
against release v0.12.0): the pod the single-pod operator builds, once per node, started and restarted as a gang.

Every pod runs ``podtrain run -- torchrun --nnodes=N --node-rank=$(JOB_COMPLETION_INDEX) --nproc-per-node=G
--master-addr=$(MASTER_ADDR) --master-port=29500 <command>``: a static rendezvous, ``MASTER_ADDR`` pod 0's stable
name through the headless service JobSet makes (``<jobset>-node-0-0.<jobset>``). It keeps every setting of the
single-pod template (resources, tolerations, selectors, grace period, security context, ``/dev/shm``, termination
message policy, labels, the environment contract), with ``restartPolicy: Never``, and adds
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

import copy
from collections.abc import Mapping, Sequence
from typing import Any

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
    "torchrun_args",
]

GROUP, VERSION, PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
API_VERSION = f"{GROUP}/{VERSION}"
REPLICATED_JOB = "node"  # the one replicated job: a Job of N indexed pods, one per node
CONTAINER = "base"  # the KubernetesPodOperator's container name
RESTART_LABEL = "jobset.sigs.k8s.io/restart-attempt"
MASTER_PORT = 29500

_USER_ERROR = (1, 2)  # a bug, a setting to fix: never retried
_RESTART_FREE = (75,)  # preempted: the gang restarts, the restart budget untouched
_RESTART_COUNTED = (69,)  # storage unavailable: restarts, within maxRestarts


def torchrun_args(command: Sequence[str], *, nodes: int, procs_per_node: int, port: int = MASTER_PORT) -> list[str]:
    """The container's args for ``command`` (a script and its arguments) on ``nodes`` pods of ``procs_per_node``
    processes each; Kubernetes expands ``$(JOB_COMPLETION_INDEX)`` and ``$(MASTER_ADDR)`` from the pod's env."""
    if nodes < 1 or procs_per_node < 1:
        raise ValueError(f"nodes and procs_per_node must be at least 1, not {nodes} and {procs_per_node}")
    return [
        "torchrun",
        f"--nnodes={nodes}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--nproc-per-node={procs_per_node}",
        "--master-addr=$(MASTER_ADDR)",
        f"--master-port={port}",
        *command,
    ]


def jobset_body(
    pod: Mapping[str, Any],
    *,
    name: str,
    nodes: int,
    procs_per_node: int,
    max_restarts: int = 3,
    port: int = MASTER_PORT,
) -> dict[str, Any]:
    """The JobSet ``name`` running ``pod`` (the single-pod operator's pod, serialized: ``ApiClient().
    sanitize_for_serialization(pod)``, its container's args the training command) on ``nodes`` pods."""
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, not {max_restarts}")
    metadata = pod.get("metadata") or {}
    spec = copy.deepcopy(dict(pod["spec"]))
    spec["restartPolicy"] = "Never"
    for key in ("hostname", "subdomain", "nodeName"):  # JobSet names the pods and places them
        spec.pop(key, None)
    containers = spec["containers"]
    (container,) = [c for c in containers if c.get("name") == CONTAINER]
    container["args"] = torchrun_args(
        container.get("args") or [], nodes=nodes, procs_per_node=procs_per_node, port=port
    )
    env = [e for e in container.get("env") or [] if e.get("name") not in ("MASTER_ADDR", "PODTRAIN_RESTART_ATTEMPT")]
    env += [
        {"name": "MASTER_ADDR", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}"},
        {
            "name": "PODTRAIN_RESTART_ATTEMPT",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{RESTART_LABEL}']"}},
        },
    ]
    container["env"] = env
    labels = dict(metadata.get("labels") or {})
    template_metadata: dict[str, Any] = {"labels": labels}
    if metadata.get("annotations"):
        template_metadata["annotations"] = dict(metadata["annotations"])
    body_metadata: dict[str, Any] = {"name": name, "labels": labels}
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
                            "podFailurePolicy": {"rules": _pod_rules()},
                            "template": {"metadata": template_metadata, "spec": spec},
                        }
                    },
                }
            ],
        },
    }


def _pod_rules() -> list[dict[str, Any]]:
    """The Job's podFailurePolicy: every failure fails the Job at once; the index of the rule says which kind."""
    return [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(codes)}}
        for codes in (_USER_ERROR, _RESTART_FREE + _RESTART_COUNTED)
    ] + [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]


def _codes(codes: Sequence[int]) -> str:
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
                rf"failed with exit code ({_codes(_USER_ERROR)}) matching FailJob rule at index 0"
            ],
        },
        {
            "name": "preempted",
            "action": "RestartJobSetAndIgnoreMaxRestarts",
            "onJobFailureReasons": reason,
            "onJobFailureMessagePatterns": [
                rf"failed with exit code ({_codes(_RESTART_FREE)}) matching FailJob rule at index 1",
                r"has condition DisruptionTarget matching FailJob rule at index 2",
            ],
        },
        {"name": "other", "action": "RestartJobSet"},
    ]
