"""What a finished gang of pods says: one verdict for a training task that ran on several pods (a JobSet's or an
Indexed Job's), from each pod's own :func:`~podtrain_airflow.classify.classify`.

The pods of one gang fail together: when one is preempted, the others stop with it (exit 75, ``stopped``); when
one fails in ``train.py``, the others exit 1 rather than hang; when one vanishes, the others exit 75 naming it. So
the verdict is not the first pod's but the strongest evidence among all of them:

1. every index has a pod that succeeded: ``succeeded``;
2. any pod that failed for a reason retrying cannot fix (a bug, a setting, OOMKilled, an image error,
   unschedulable): that verdict, the lowest index first: a bug is never retried because a peer was preempted;
3. else the retryable verdict of the pod whose container ended first: the cause, where the others are its
   consequences (pod 0 exits 69, then the Job controller stops pod 1 with SIGTERM: storage, not a preemption);
   a tie (Kubernetes keeps whole seconds) goes to ``storage_unavailable`` (podtrain's own answer; peers stopped
   after it exit 75 or by a signal), then ``preempted``, ``vanished``, ``interrupted``;
4. no pod at all: ``vanished``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kubernetes.client import models as k8s

from podtrain_airflow.classify import Verdict, classify

__all__ = ["COMPLETION_INDEX", "GangVerdict", "completion_index", "gang_verdict"]

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # set by the Job controller on an Indexed Job's pods
_RETRY_ORDER = ("storage_unavailable", "preempted", "vanished", "interrupted")


@dataclass(frozen=True)
class GangVerdict:
    """The gang's verdict, the pod it came from (``""`` when none) and every pod's, by name."""

    verdict: Verdict
    pod: str
    pods: dict[str, Verdict]


def completion_index(pod: k8s.V1Pod) -> int | None:
    """The pod's completion index (its node rank), from the Job controller's label or annotation."""
    meta = pod.metadata or k8s.V1ObjectMeta()
    for source in (meta.labels or {}, meta.annotations or {}):
        value = source.get(COMPLETION_INDEX)
        if value is not None and str(value).isdigit():
            return int(value)
    return None


def gang_verdict(
    pods: Iterable[k8s.V1Pod],
    *,
    nodes: int,
    container: str = "base",
    gpu_request: str = "",
    preflight: bool = False,
) -> GangVerdict:
    """The verdict of the gang whose (final attempt's) pods are ``pods``, ``nodes`` of them expected, one per
    completion index; see the module docstring for the order of evidence."""
    ranked = sorted(pods, key=lambda p: (_index_or_last(p), _name(p)))
    verdicts = {_name(p): classify(p, container, gpu_request=gpu_request, preflight=preflight) for p in ranked}
    done = {completion_index(p) for p in ranked if verdicts[_name(p)].succeeded}
    if nodes > 0 and done >= set(range(nodes)):
        return GangVerdict(Verdict("succeeded", f"all {nodes} pods succeeded", exit_code=0), "", verdicts)
    failing = [(name, v) for name, v in verdicts.items() if not v.succeeded]
    for name, verdict in failing:
        if not verdict.retry:
            return GangVerdict(verdict, name, verdicts)
    ended = {_name(p): _finished_at(p) for p in ranked}
    retryable = [
        (ended[name], _RETRY_ORDER.index(v.kind) if v.kind in _RETRY_ORDER else len(_RETRY_ORDER), i)
        for i, (name, v) in enumerate(failing)
    ]
    if retryable:
        *_, first = min(retryable)
        name, verdict = failing[first]
        return GangVerdict(verdict, name, verdicts)
    missing = sorted(set(range(nodes)) - done)
    return GangVerdict(
        Verdict("vanished", f"the pods of node(s) {_ranks(missing)} no longer exist and never finished"),
        "",
        verdicts,
    )


def _finished_at(pod: k8s.V1Pod) -> float:
    """When the pod's first container to end ended (seconds since the epoch), infinity when none has."""
    times = [
        s.state.terminated.finished_at.timestamp()
        for s in (pod.status.container_statuses or [] if pod.status else [])
        if s.state is not None and s.state.terminated is not None and s.state.terminated.finished_at is not None
    ]
    return min(times) if times else float("inf")


def _index_or_last(pod: k8s.V1Pod) -> int:
    index = completion_index(pod)
    return index if index is not None else 1 << 30


def _name(pod: k8s.V1Pod) -> str:
    return pod.metadata.name if pod.metadata is not None and pod.metadata.name else "?"


def _ranks(indexes: Sequence[int]) -> str:
    return ", ".join(str(i) for i in indexes) or "?"
