"""batch/v1 Jobs in the test Kubernetes: the endpoints a client creates and deletes them through (:class:`JobsAPI`;
get and list are :class:`~_kubejobsets.JobSetsAPI`'s, over every Job), and the Job controller (kubernetes
``pkg/controller/job``, 1.34) that runs both those and the ones a JobSet makes (``_kubejobsets.py``): each Job's
pods, made through the pod create path, and what their ends make of the Job. The JobSet controller's thread calls
:meth:`JobController.sync` for every Job, under ``cluster.cond``.

* create: ``name``/``generateName``; 409 for a name taken (also by a Job still being deleted); 422 without
  containers, with a pod ``restartPolicy`` other than ``Never``/``OnFailure`` (only ``Never`` under a
  ``podFailurePolicy``), or Indexed without ``completions``. The API server's defaults: ``parallelism`` 1,
  ``completionMode: NonIndexed``, ``backoffLimit`` 6, ``suspend: false``, ``podReplacementPolicy``, the Job's
  labels from the template's when it has none, and the generated selector: ``batch.kubernetes.io/controller-uid``
  (and ``controller-uid``, ``batch.kubernetes.io/job-name``, ``job-name``) on the pod template.
* delete, by ``propagationPolicy``: ``Foreground`` answers with the object (``deletionTimestamp``, the
  ``foregroundDeletion`` finalizer), then its pods are deleted gracefully and the Job goes once they are gone;
  ``Background`` removes the Job at once (a ``Success`` Status) and deletes its pods gracefully; ``Orphan``, and
  no policy (batch/v1's default), removes the Job and leaves its pods running, their owner reference dropped.
* pods: one per completion index (every index at once), ``generateName`` ``<job>-<index>-``, ``hostname``
  ``<job>-<index>``, the template's labels, annotations and ``subdomain`` plus the completion index (label and
  annotation), and ``JOB_COMPLETION_INDEX`` in every container's env, by a ``fieldRef`` on that annotation. Their
  DNS names resolve (to 127.0.0.1) under a headless Service named by the subdomain (``Cluster.hosts``).
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

Not imitated: update/patch of a Job, watches, ``parallelism`` below ``completions``, NonIndexed Jobs (run as
Indexed: their pods get indexes and host names too), ``backoffLimitPerIndex`` (``FailIndex`` counts), the
replacement back-off delay, ``activeDeadlineSeconds``, ``ttlSecondsAfterFinished``, suspend, a manual selector,
pod finalizers, the warning a delete without a policy gets, a client's ``ownerReferences`` on a Job (the JobSet
controller's garbage collector takes an owner that is no live JobSet as gone), and a container restarted in place
under ``restartPolicy: OnFailure`` (the failed pod is replaced instead).
"""

from __future__ import annotations

import copy
import secrets as _secrets
import uuid
from collections.abc import Mapping
from typing import Any

from _kubeobjects import ApiError, Job, Pod, not_found, rfc3339
from _kubepods import PodsAPI

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


class JobsAPI(PodsAPI):
    """The Job create and delete endpoints' operations (see the module docstring)."""

    def api_job_create(self, namespace: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("kind", "Job") != "Job":
            raise ApiError(400, "BadRequest", "the body is not a Job")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = "batch/v1", "Job"
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the request")
        meta["namespace"] = namespace
        with self.cluster.cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise ApiError(422, "Invalid", "Job.batch is invalid: metadata.name: Required value")
                meta["name"] = meta["generateName"] + _secrets.token_hex(3)[:5]
            _default_and_validate(obj)
            key = (namespace, meta["name"])
            if key in self.cluster.jobs:
                details = {"name": meta["name"], "group": "batch", "kind": "jobs"}
                raise ApiError(409, "AlreadyExists", f'jobs.batch "{meta["name"]}" already exists', details)
            meta.update(creationTimestamp=rfc3339(), generation=1, resourceVersion=self.cluster.next_rv())
            obj["status"] = {"startTime": rfc3339()}
            self.cluster.jobs[key] = Job(obj)
            self.cluster.cond.notify_all()
            return copy.deepcopy(obj)

    def api_job_delete(self, namespace: str, name: str, propagation: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP code, answer): the object, still there, for ``Foreground``, else a ``Success`` Status."""
        cluster = self.cluster
        with cluster.cond:
            job = cluster.jobs.get((namespace, name))
            if job is None:
                raise not_found("jobs.batch", name)
            meta = job.obj["metadata"]
            meta.setdefault("deletionTimestamp", rfc3339())
            meta.setdefault("deletionGracePeriodSeconds", 0)
            meta["resourceVersion"] = cluster.next_rv()
            pods = [p for p in cluster.pods.values() if owned_by(p.obj, meta["uid"])]
            if propagation == "Foreground":  # the Job controller removes it once its pods are gone
                meta["finalizers"] = sorted({*(meta.get("finalizers") or []), "foregroundDeletion"})
                job.deleting = propagation
                cluster.cond.notify_all()
                return 200, copy.deepcopy(job.obj)
            del cluster.jobs[job.key]
            cluster.deleted_jobs[job.key] = job.obj
            for pod in pods:
                if propagation == "Background":  # the garbage collector, at once
                    if "deletionTimestamp" not in pod.obj["metadata"] or pod.finished:
                        self.api_delete(*pod.key, None)
                else:
                    refs = pod.obj["metadata"].get("ownerReferences") or []
                    pod.obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != meta["uid"]]
                    cluster.touch(pod)
            cluster.cond.notify_all()
            details = {"name": name, "group": "batch", "kind": "jobs", "uid": meta["uid"]}
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}


def _default_and_validate(obj: dict[str, Any]) -> None:
    """The API server's defaults for a Job, the selector it generates, and the checks this server needs."""
    meta, spec = obj["metadata"], obj.get("spec")
    invalid = f'Job.batch "{meta["name"]}" is invalid: '
    if not isinstance(spec, dict) or not isinstance(spec.get("template"), dict):
        raise ApiError(422, "Invalid", invalid + "spec.template: Required value")
    template = spec["template"]
    pod_spec = template.get("spec") or {}
    if not pod_spec.get("containers") or not all(c.get("name") for c in pod_spec["containers"]):
        raise ApiError(422, "Invalid", invalid + "spec.template.spec.containers: Required value")
    restart = pod_spec.get("restartPolicy")
    if restart not in ("Never", "OnFailure"):
        what = f'Unsupported value: "{restart}": supported' if restart else "Required value: valid"
        message = f'spec.template.spec.restartPolicy: {what} values: "OnFailure", "Never"'
        raise ApiError(422, "Invalid", invalid + message)
    if spec.get("podFailurePolicy") and restart != "Never":
        raise ApiError(
            422,
            "Invalid",
            invalid + f'spec.template.spec.restartPolicy: Invalid value: "{restart}": only "Never" is supported '
            "when podFailurePolicy is specified",
        )
    spec.setdefault("completionMode", "NonIndexed")
    if spec["completionMode"] == "Indexed" and spec.get("completions") is None:
        raise ApiError(422, "Invalid", invalid + "spec.completions: Required value: when completion mode is Indexed")
    spec.setdefault("parallelism", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    tmeta = template.setdefault("metadata", {})
    if not meta.get("labels") and tmeta.get("labels"):
        meta["labels"] = dict(tmeta["labels"])
    uid = meta["uid"] = str(uuid.uuid4())
    generated = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": meta["name"]}
    tmeta["labels"] = {**(tmeta.get("labels") or {}), **generated, "controller-uid": uid, "job-name": meta["name"]}
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}


class JobController:
    """Syncs the cluster's Jobs, creating and terminating pods through ``pods`` (the API's pod operations)."""

    def __init__(self, pods: PodsAPI):
        self.pods, self.cluster = pods, pods.cluster

    def sync(self, job: Job) -> None:
        """One pass over the Job: count its pods' ends, fail or complete it, make the pods its indexes lack; for a
        client's foreground delete, delete its pods and then the Job."""
        obj = job.obj
        if job.deleting:
            self._delete(job)
            return
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

    def _delete(self, job: Job) -> None:
        """The garbage collector's foreground delete: the Job's pods deleted gracefully, the Job once they are gone."""
        cluster = self.cluster
        pods = [p for p in cluster.pods.values() if owned_by(p.obj, job.obj["metadata"]["uid"])]
        for pod in pods:
            if "deletionTimestamp" not in pod.obj["metadata"] or pod.finished:
                self.pods.api_delete(*pod.key, None)
        if not pods and cluster.jobs.get(job.key) is job:
            del cluster.jobs[job.key]
            job.obj["metadata"]["finalizers"] = []
            cluster.deleted_jobs[job.key] = job.obj
            cluster.cond.notify_all()

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
