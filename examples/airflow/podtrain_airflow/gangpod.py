"""The pod of a gang: the single-pod operator's pod, serialized, turned into the template every pod of a training
task over several nodes runs (a JobSet's or an Indexed Job's), and the Job's ``podFailurePolicy``.

Every pod runs ``podtrain run -- torchrun --nnodes=N --node-rank=$(JOB_COMPLETION_INDEX) --nproc-per-node=G
--master-addr=$(MASTER_ADDR) --master-port=P <command>``: a static rendezvous, no elastic store, ``MASTER_ADDR`` pod
0's stable DNS name (given by the caller: the JobSet's or the headless Service's). The Job controller sets
``JOB_COMPLETION_INDEX`` on an Indexed Job's pods. It keeps every setting of the single-pod template (resources,
tolerations, selectors, grace period, security context, ``/dev/shm``, termination message policy, labels, the
environment contract) with ``restartPolicy: Never`` (``podFailurePolicy`` requires it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CONTAINER", "MASTER_PORT", "gang_pod_template", "pod_failure_rules", "torchrun_args"]

CONTAINER = "base"  # the KubernetesPodOperator's container name
MASTER_PORT = 29500

USER_ERROR = (1, 2)  # a bug, a setting to fix: never retried
RESTART_FREE = (75,)  # preempted: the gang restarts, no retry spent
RESTART_COUNTED = (69,)  # storage unavailable: restarts, within a budget


def torchrun_args(command: Sequence[str], *, nodes: int, procs_per_node: int, port: int = MASTER_PORT) -> list[str]:
    """The container's args for ``command`` on ``nodes`` pods of ``procs_per_node`` processes each; Kubernetes
    expands ``$(JOB_COMPLETION_INDEX)`` and ``$(MASTER_ADDR)`` from the pod's env. A command that is a script
    (``train.py …``) is run by torchrun's Python; any other (``python /app/train.py …``, ``python -m pkg``) is run
    as it is, with ``--no-python``."""
    if nodes < 1 or procs_per_node < 1:
        raise ValueError(f"nodes and procs_per_node must be at least 1, not {nodes} and {procs_per_node}")
    return [
        "torchrun",
        f"--nnodes={nodes}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--nproc-per-node={procs_per_node}",
        "--master-addr=$(MASTER_ADDR)",
        f"--master-port={port}",
        *([] if command and str(command[0]).endswith(".py") else ["--no-python"]),
        *command,
    ]


def gang_pod_template(
    pod: Mapping[str, Any],
    *,
    master_addr: str,
    nodes: int,
    procs_per_node: int,
    port: int = MASTER_PORT,
    torchrun: bool = True,
    env: Sequence[Mapping[str, Any]] = (),
    subdomain: str | None = None,
) -> dict[str, Any]:
    """The pod template (``metadata`` with the pod's labels and annotations, ``spec``) for ``pod`` (a serialized
    V1Pod whose base container's args are the training command). ``torchrun=False`` keeps the args as they are
    (a preflight on every node); ``env`` is added to the base container (replacing variables of the same name)."""
    metadata = pod.get("metadata") or {}
    spec = copy.deepcopy(dict(pod["spec"]))
    spec["restartPolicy"] = "Never"
    for key in ("hostname", "subdomain", "nodeName"):  # the Job controller names the pods, the scheduler places them
        spec.pop(key, None)
    if subdomain:
        spec["subdomain"] = subdomain
    matching = [c for c in spec.get("containers") or [] if c.get("name") == CONTAINER]
    if len(matching) != 1:
        raise ValueError(f"the pod has no container named {CONTAINER!r} (the KubernetesPodOperator's)")
    (container,) = matching
    if torchrun:
        container["args"] = torchrun_args(
            container.get("args") or [], nodes=nodes, procs_per_node=procs_per_node, port=port
        )
    added = [{"name": "MASTER_ADDR", "value": master_addr}, *[dict(e) for e in env]]
    names = {e["name"] for e in added}
    container["env"] = [e for e in container.get("env") or [] if e.get("name") not in names] + added
    template_metadata: dict[str, Any] = {"labels": dict(metadata.get("labels") or {})}
    if metadata.get("annotations"):
        template_metadata["annotations"] = dict(metadata["annotations"])
    return {"metadata": template_metadata, "spec": spec}


def pod_failure_rules() -> list[dict[str, Any]]:
    """The Job's podFailurePolicy: every failure fails the Job at once (a pod replaced alone would leave the
    others waiting in a collective); the index of the matching rule, which the Job controller writes into the
    Job's failure message, says which kind: 0 a user error, 1 exit 75 or 69, 2 a ``DisruptionTarget``."""
    return [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(codes)}}
        for codes in (USER_ERROR, RESTART_FREE + RESTART_COUNTED)
    ] + [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
