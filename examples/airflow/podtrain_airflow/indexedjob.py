"""A training task over several pods as one Indexed Job and its headless Service, for clusters without the JobSet
controller: the same pods as :mod:`podtrain_airflow.jobset`'s, but no restart in the cluster.

``completionMode: Indexed``: the Job controller gives each pod ``JOB_COMPLETION_INDEX`` (its node rank) and the host
name ``<job>-<index>``; with ``subdomain: <job>`` and a headless Service of that name selecting the Job's pods
(``publishNotReadyAddresses``: pod 0 is resolvable before it is ready), pod 0 is ``<job>-0.<job>``, the master.

The Job's ``podFailurePolicy`` fails it at once on any pod failure (``backoffLimit: 0``; exit 75 and
``DisruptionTarget`` included): a pod is never replaced alone while the others wait for it in a collective. The
operator then classifies the pods together (:mod:`podtrain_airflow.gang`) and Airflow retries the whole Job, as a
new Job named for the next try, on a preemption only: a bug fails the task at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from podtrain_airflow.gangpod import MASTER_PORT, gang_pod_template, pod_failure_rules

__all__ = ["JOB_NAME_LABEL", "indexed_job_body", "master_addr", "service_body"]

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # the Job controller's label on its pods


def master_addr(name: str) -> str:
    """Pod 0's stable name: ``<job>-0`` under the headless Service ``<job>``."""
    return f"{name}-0.{name}"


def indexed_job_body(
    pod: Mapping[str, Any],
    *,
    name: str,
    nodes: int,
    procs_per_node: int,
    port: int = MASTER_PORT,
    torchrun: bool = True,
) -> dict[str, Any]:
    """The batch/v1 Job ``name`` running ``pod`` (serialized, its base container's args the training command) on
    ``nodes`` indexed pods."""
    template = gang_pod_template(
        pod,
        master_addr=master_addr(name),
        nodes=nodes,
        procs_per_node=procs_per_node,
        port=port,
        torchrun=torchrun,
        subdomain=name,
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(pod, name),
        "spec": {
            "parallelism": nodes,
            "completions": nodes,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": pod_failure_rules()},
            "template": template,
        },
    }


def service_body(pod: Mapping[str, Any], *, name: str, port: int = MASTER_PORT) -> dict[str, Any]:
    """The headless Service ``name`` that gives the Job ``name``'s pods their DNS names."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pod, name),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABEL: name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _metadata(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    source = pod.get("metadata") or {}
    out: dict[str, Any] = {"name": name, "labels": dict(source.get("labels") or {})}
    if source.get("namespace"):
        out["namespace"] = source["namespace"]
    return out
