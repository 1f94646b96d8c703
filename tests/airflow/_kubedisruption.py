"""Pod disruption for tests: a pod preempted or evicted as Kubernetes does it, at once or when its log says so.

A disruption has an API half and a kubelet half, and this is where the two are put in order: first the objects
change (the ``DisruptionTarget`` condition, ``status.reason: Evicted`` for a kubelet eviction, the scheduler's
``Preempted`` event), then the kubelet terminates the process (SIGTERM to the group, the grace period, SIGKILL),
and the finished pod keeps its status so the caller reads exit code and message. It is a test control, not an
endpoint: :meth:`~kubeapi.KubeAPIServer.preempt` and :meth:`~kubeapi.KubeAPIServer.preempt_when` call it.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from _kubelet import Kubelet
from _kubeobjects import Cluster, Pod, match_labels, parse_label_selector, rfc3339

if TYPE_CHECKING:
    from kubeapi import KubeAPIServer

_MESSAGES = {
    "PreemptionByScheduler": "default-scheduler: preempting to accommodate a higher priority pod",
    "TerminationByKubelet": "The node was low on resource: memory.",
    "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint",
    "EvictionByEvictionAPI": "Eviction API: evicting",
    "DeletionByPodGC": "PodGC: node no longer exists",
}


def disrupt(
    cluster: Cluster,
    kubelet: Kubelet,
    namespace: str,
    name: str,
    *,
    reason: str,
    message: str | None,
    grace_seconds: float | None,
    wait: bool,
    remove: bool,
    timeout: float,
) -> dict[str, Any]:
    """:meth:`~kubeapi.KubeAPIServer.preempt`: mark the pod, terminate it, and (``wait``) return its final object."""
    with cluster.cond:
        pod = cluster.pods.get((namespace, name))
        if pod is None:
            raise KeyError(f"no pod {namespace}/{name}")
        if message is None:
            message = _MESSAGES.get(reason, f"{reason}: terminating the pod")
        status = pod.obj["status"]
        conds = [c for c in status.setdefault("conditions", []) if c["type"] != "DisruptionTarget"]
        conds.insert(
            0,
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": reason,
                "message": message,
                "lastProbeTime": None,
                "lastTransitionTime": rfc3339(),
            },
        )
        status["conditions"] = conds
        if reason == "TerminationByKubelet":
            status["reason"] = "Evicted"
            status["message"] = message
        if reason == "PreemptionByScheduler":
            cluster.event(
                pod,
                "Preempted",
                f"Preempted by pod on node {cluster.node.name}",
                "Normal",
                component="default-scheduler",
                field_path=None,
            )
        cluster.touch(pod)
        if remove:
            pod.delete_when_done = True
        grace = pod.grace(grace_seconds)
        finished = pod.finished
    if finished and remove:
        with cluster.cond:
            cluster.done(pod)
    kubelet.terminate(pod, grace)
    if not wait:
        with cluster.cond:
            return copy.deepcopy(cluster.find(namespace, name, True).obj)
    cluster.wait_for(lambda: pod.finished, timeout, f"pod {namespace}/{name} to terminate")
    with cluster.cond:
        return copy.deepcopy(pod.obj)


class Preempter(threading.Thread):
    """The thread of :meth:`KubeAPIServer.preempt_when`: ``preempted`` lists the pods it preempted (in order),
    ``error`` what stopped it early (a timeout, the server stopping); :meth:`join` it to wait for all."""

    def __init__(
        self,
        kube: KubeAPIServer,
        *,
        pattern: re.Pattern[str],
        namespace: str,
        label_selector: str,
        count: int,
        timeout: float,
        preempt_kwargs: Mapping[str, Any],
    ):
        super().__init__(name="preempter", daemon=True)
        self.kube, self.pattern, self.namespace = kube, pattern, namespace
        self.terms = parse_label_selector(label_selector)
        self.count, self.timeout, self.preempt_kwargs = count, timeout, dict(preempt_kwargs)
        self.preempted: list[str] = []
        self.error: BaseException | None = None

    def _candidate(self) -> Pod | None:
        for (ns, name), pod in self.kube.cluster.pods.items():
            if (
                ns == self.namespace
                and name not in self.preempted
                and pod.proc is not None
                and not pod.finished
                and not pod.terminating
                and match_labels(pod.obj["metadata"].get("labels") or {}, self.terms)
                and self.pattern.search(b"".join(line for _, line in pod.log).decode(errors="replace"))
            ):
                return pod
        return None

    def run(self) -> None:
        kube = self.kube
        try:
            while len(self.preempted) < self.count:
                found: list[Pod] = []

                def ready(found: list[Pod] = found) -> bool:
                    if kube.cluster.stopping:
                        raise RuntimeError("the server stopped")
                    pod = self._candidate()
                    if pod is not None:
                        found.append(pod)
                    return pod is not None

                kube.wait_for(ready, self.timeout, f"a pod whose log matches {self.pattern.pattern!r}")
                namespace, name = found[0].key
                self.preempted.append(name)
                kube.preempt(namespace, name, **self.preempt_kwargs)
        except BaseException as e:  # reported to the test through .error
            self.error = e
