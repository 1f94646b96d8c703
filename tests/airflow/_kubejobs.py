"""The Job controller of the test Kubernetes, for the batch/v1 Jobs its JobSets make (``_kubejobsets.py``): each
Job's pods, made through the pod create path, and what their ends make of the Job (kubernetes
``pkg/controller/job``, 1.34), cut from the JobSet controller as Kubernetes cuts them; the JobSet controller's
thread calls :meth:`JobController.sync` for every Job, under ``cluster.cond``.

* pods: one per completion index (every index at once), ``generateName`` ``<job>-<index>-``, ``hostname``
  ``<job>-<index>``, the template's labels and annotations plus the completion index (label and annotation), and
  ``JOB_COMPLETION_INDEX`` in every container's env, by a ``fieldRef`` on that annotation.
* a pod that exits 0 completes its index; all done: ``SuccessCriteriaMet`` and ``Complete``.
* a failed pod is matched against ``podFailurePolicy.rules`` in order (:func:`pod_failure_policy`: ``onExitCodes``
  In/NotIn on a non-zero exit code of the named container, ``onPodConditions``): ``FailJob`` fails the Job with
  reason ``PodFailurePolicy`` and the Job controller's message (``Container base for pod ns/p failed with exit
  code 75 matching FailJob rule at index 1``, ``Pod ns/p has condition DisruptionTarget matching FailJob rule at
  index 2``); ``Ignore`` replaces the pod uncounted; ``Count``, ``FailIndex`` and no match count against
  ``backoffLimit`` (default 6): past it the Job fails with ``BackoffLimitExceeded``, ``Job has reached the
  specified backoff limit``, else the index gets a new pod at once.
* a failing Job gets ``FailureTarget`` at once and its running pods are terminated (SIGTERM, grace, SIGKILL; the
  objects stay, ``Failed``); ``Failed`` follows once none runs, as in Kubernetes 1.31 and later.

Not imitated: ``parallelism`` below ``completions``, NonIndexed Jobs (run as Indexed), ``backoffLimitPerIndex``
(``FailIndex`` counts), the replacement back-off delay, ``activeDeadlineSeconds``, suspend, pod finalizers, and a
container restarted in place under ``restartPolicy: OnFailure`` (the failed pod is replaced instead).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from _kubeobjects import Job, Pod, rfc3339

if TYPE_CHECKING:
    from _kubepods import PodsAPI

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


class JobController:
    """Syncs the cluster's Jobs, creating and terminating pods through ``pods`` (the API's pod operations)."""

    def __init__(self, pods: PodsAPI):
        self.pods, self.cluster = pods, pods.cluster

    def sync(self, job: Job) -> None:
        """One pass over the Job: count its pods' ends, fail or complete it, make the pods its indexes lack."""
        obj = job.obj
        if "deletionTimestamp" in obj["metadata"] or condition(obj, "Complete") or condition(obj, "Failed"):
            return
        changed = self._count_ends(job)
        target = condition(obj, "FailureTarget")
        running = [p for p in job.pods.values() if not p.finished]
        completions = obj["spec"].get("completions", obj["spec"].get("parallelism", 1))
        if target and not running:
            changed |= set_condition(obj, "Failed", "True", target["reason"], target["message"], job=True)
        elif not target and len(job.succeeded) >= completions:
            for type_ in ("SuccessCriteriaMet", "Complete"):
                reason, message = "CompletionsReached", "Reached expected number of succeeded pods"
                changed |= set_condition(obj, type_, "True", reason, message, job=True)
            obj["status"]["completionTime"] = rfc3339()
        elif not target:
            for index in range(completions):
                if index not in job.succeeded and index not in job.pods:
                    self._create_pod(job, index)
                    changed = True
        status = {
            **obj["status"],
            "active": sum(not p.finished for p in job.pods.values()),
            "ready": sum(not p.finished and p.obj["status"].get("phase") == "Running" for p in job.pods.values()),
            "terminating": sum(p.terminating and not p.finished for p in job.pods.values()),
            "succeeded": len(job.succeeded),
            "failed": job.failed,
            "completedIndexes": ",".join(str(i) for i in sorted(job.succeeded)),
        }
        if changed or status != obj["status"]:
            obj["status"] = status
            obj["metadata"]["resourceVersion"] = self.cluster.next_rv()
            self.cluster.cond.notify_all()

    def _count_ends(self, job: Job) -> bool:
        """Count each newly ended pod (until the Job is failing): True when one was."""
        obj, counted = job.obj, False
        for index, pod in sorted(job.pods.items()):
            uid = pod.obj["metadata"]["uid"]
            if condition(obj, "FailureTarget") or not pod.finished or uid in job.counted:
                continue
            job.counted.add(uid)
            counted = True
            if pod.obj["status"]["phase"] == "Succeeded":
                job.succeeded.add(index)
                continue
            action, message = pod_failure_policy(obj, pod)
            del job.pods[index]  # the index gets a new pod unless the Job fails
            if action == "Ignore":
                continue
            job.failed += 1
            if action == "FailJob":
                self._fail(job, "PodFailurePolicy", message)
            elif job.failed > obj["spec"].get("backoffLimit", 6):
                self._fail(job, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        return counted

    def _fail(self, job: Job, reason: str, message: str) -> None:
        set_condition(job.obj, "FailureTarget", "True", reason, message, job=True)
        for pod in job.pods.values():
            if not pod.finished:
                self.pods.kubelet.terminate(pod, pod.grace(None))

    def _create_pod(self, job: Job, index: int) -> None:
        ns, name = job.key
        template = copy.deepcopy(job.obj["spec"]["template"])
        meta, spec = template.get("metadata") or {}, template["spec"]
        labels = {**(meta.get("labels") or {}), COMPLETION_INDEX: str(index)}
        annotations = {**(meta.get("annotations") or {}), COMPLETION_INDEX: str(index)}
        spec.setdefault("hostname", f"{name}-{index}")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in c.get("env") or []):
                field = {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}
                c["env"] = [*(c.get("env") or []), {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": field}}]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{name}-{index}-",
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [owner_reference(job.obj)],
            },
            "spec": spec,
        }
        created = self.pods.api_create(ns, body)
        job.pods[index] = self.cluster.pods[(ns, created["metadata"]["name"])]


def condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    """The object's condition ``type_`` when its status is True."""
    for c in obj.get("status", {}).get("conditions") or []:
        if c["type"] == type_ and c["status"] == "True":
            return dict(c)
    return None


def set_condition(obj: dict[str, Any], type_: str, status: str, reason: str, message: str, *, job: bool) -> bool:
    """metav1 ``updateCondition`` (Job conditions also get ``lastProbeTime``); True when something changed."""
    conds = obj["status"].setdefault("conditions", [])
    new = {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": rfc3339()}
    if job:
        new["lastProbeTime"] = new["lastTransitionTime"]
    for i, old in enumerate(conds):
        if old["type"] == type_:
            if old["status"] == status and (old["reason"], old["message"]) == (reason, message):
                return False
            if old["status"] == status:
                new["lastTransitionTime"] = old["lastTransitionTime"]
            conds[i] = new
            return True
    if status == "True":
        conds.append(new)
    return status == "True"


def pod_failure_policy(job: Mapping[str, Any], pod: Pod) -> tuple[str | None, str]:
    """The action of the first ``podFailurePolicy`` rule the failed pod matches (None: none) and, for
    ``FailJob``, the Job controller's message (kubernetes pkg/controller/job/pod_failure_policy.go)."""
    ns, name = pod.key
    status = pod.obj["status"]
    for index, rule in enumerate((job["spec"].get("podFailurePolicy") or {}).get("rules") or []):
        action = rule.get("action")
        on_codes = rule.get("onExitCodes")
        if on_codes:
            for cs in status.get("containerStatuses") or []:
                terminated = cs.get("state", {}).get("terminated")
                if terminated is None or on_codes.get("containerName") not in (None, cs["name"]):
                    continue
                code = terminated["exitCode"]
                if code != 0 and (code in on_codes.get("values", [])) == (on_codes.get("operator") == "In"):
                    return action, (
                        f"Container {cs['name']} for pod {ns}/{name} failed with exit code {code} "
                        f"matching {action} rule at index {index}"
                    )
        for pattern in rule.get("onPodConditions") or []:
            for cond in status.get("conditions") or []:
                if cond["type"] == pattern.get("type") and cond["status"] == pattern.get("status", "True"):
                    return (
                        action,
                        f"Pod {ns}/{name} has condition {cond['type']} matching {action} rule at index {index}",
                    )
    return None, ""


def owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
