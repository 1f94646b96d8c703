"""JobSets (kubernetes-sigs/jobset ``jobset.x-k8s.io/v1alpha2``, as of v0.12) in the test Kubernetes: their endpoints,
and the controller thread that reconciles them (and runs the Job controller of ``_kubejobs.py`` for their Jobs).

A JobSet runs here as on a cluster, through the same objects: for each ``replicatedJobs[]`` entry the controller
makes ``replicas`` batch/v1 Jobs (``<jobset>-<rjob>-<jobIndex>``), whose pods the Job controller makes through the
pod create path, so the scheduler and kubelet run them as any pod and the tests' controls (``preempt``,
``preempt_when``, ``pods``, ``log_text``) work on them. Like ``_kubepods.py`` it only changes objects, under
``cluster.cond``; processes are the kubelet's. The thread starts and stops with the server.

* endpoints (:class:`JobSetsAPI`): create (``name``/``generateName``; 409 for a name taken; 422 without
  ``spec.replicatedJobs`` or with a failure action or restart strategy not imitated; the webhook's defaults:
  ``successPolicy`` All, ``completionMode: Indexed``, pod ``restartPolicy: OnFailure``,
  ``network.enableDNSHostnames``, rule names ``failurePolicyRule<i>``; ``status: {"restarts": 0}``), get, list
  (``labelSelector``), delete (``propagationPolicy``: ``Background``, the default, answers a ``Success`` Status
  and removes the object at once, then the garbage collector deletes the Jobs and their pods; ``Foreground``
  answers with the object, which goes once every pod is gone; ``Orphan`` leaves Jobs and pods running). The
  child Jobs are the Job controller's (``_kubejobs.py``), which also runs Jobs a client creates.
* Jobs and pods carry the JobSet's labels and annotations (``jobset-name``, ``jobset-uid``,
  ``replicatedjob-name``, ``replicatedjob-replicas``, ``job-index``, ``job-key``, ``restart-attempt`` =
  ``status.restarts``); the pods' ``subdomain`` is ``network.subdomain`` (default the JobSet's name), and their DNS
  names (``<hostname>.<subdomain>``, ``...<ns>.svc``, ``...svc.cluster.local``) go into ``cluster.hosts``, which
  ``_kubecontainer.py`` applies: there is no DNS, and every pod is 127.0.0.1.
* a failed Job is matched against ``failurePolicy.rules`` in order (``onJobFailureReasons``,
  ``onJobFailureMessagePatterns`` as ``re.search``, ``targetReplicatedJobs``; per rule the earliest failed Job):
  ``FailJobSet``; ``RestartJobSet`` (counts toward ``maxRestarts``; at the limit ``ReachedMaxRestarts``; also the
  action when no rule matches); ``RestartJobSetAndIgnoreMaxRestarts``; with no ``failurePolicy``: ``FailedJobs``.
  Conditions, reasons, messages and events are the controller's own (pkg/controllers/failure_policy.go).
* a restart bumps ``status.restarts`` (and ``restartsCountTowardsMax``), sets ``RestartingJobSet`` (False again
  once every Job is ready), deletes every Job of the old attempt, its pods terminated gracefully and removed, and
  creates the new attempt's Jobs only once all are gone: ``BlockingRecreate``; ``Recreate`` alike, since a Job's
  name stays taken until its pods are gone.
* the success policy (All/Any over ``targetReplicatedJobs``) sets ``Completed``; a finished JobSet deletes its
  Jobs still active and keeps the rest (completed or failed pods stay); ``status.replicatedJobsStatus`` has the
  counts.

Not imitated: watches, update/patch of a JobSet, suspend, startup policy, coordinator, exclusive placement, group
labels, volume claim policies, TTL, ``managedBy``, the ``RestartJob`` actions and ``InPlaceRestart``, the headless
Service object (only its DNS names, which resolve from any namespace), and what ``_kubejobs.py`` lists.
"""

from __future__ import annotations

import copy
import hashlib
import re
import threading
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

from _kubejobs import JobController, condition, owned_by, owner_reference, set_condition
from _kubeobjects import ApiError, Job, not_found, rfc3339
from _kubepods import PodsAPI

GROUP = "jobset.x-k8s.io"
API_VERSION = f"{GROUP}/v1alpha2"
KIND = "JobSet"
JOBSET_NAME, JOBSET_UID = "jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/jobset-uid"
REPLICATED_JOB, JOB_INDEX = "jobset.sigs.k8s.io/replicatedjob-name", "jobset.sigs.k8s.io/job-index"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
ACTIONS = ("FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts")
POD_IP = "127.0.0.1"


class JobSetsAPI(PodsAPI):
    """The JobSet and Job endpoints' operations (the pod ones inherited): each takes what the request carried and
    returns the JSON answer or raises :class:`~_kubeobjects.ApiError`."""

    def api_jobset_create(self, namespace: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("kind", KIND) != KIND:
            raise ApiError(400, "BadRequest", "the body is not a JobSet")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = API_VERSION, KIND
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the request")
        meta["namespace"] = namespace
        _default_and_validate(obj)
        with self.cluster.cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise ApiError(422, "Invalid", "JobSet.jobset.x-k8s.io is invalid: metadata.name: Required value")
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            key = (namespace, meta["name"])
            if key in self.cluster.jobsets:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'jobsets.{GROUP} "{meta["name"]}" already exists',
                    {"name": meta["name"], "group": GROUP, "kind": "jobsets"},
                )
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(), generation=1)
            meta["resourceVersion"] = self.cluster.next_rv()
            obj["status"] = {"restarts": 0}
            self.cluster.jobsets[key] = obj
            self.cluster.cond.notify_all()
            return copy.deepcopy(obj)

    def api_jobset_get(self, namespace: str, name: str) -> dict[str, Any]:
        with self.cluster.cond:
            obj = self.cluster.jobsets.get((namespace, name))
            if obj is None:
                raise not_found(f"jobsets.{GROUP}", name)
            return copy.deepcopy(obj)

    def api_jobset_list(self, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        jobsets = self.cluster.jobsets
        found = self._list(
            f"{KIND}List", lambda: (o for (ns, _), o in jobsets.items() if namespace in (None, ns)), query
        )
        return {**found, "apiVersion": API_VERSION}

    def api_jobset_delete(self, namespace: str, name: str, propagation: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP code, answer): the object, still there, for ``Foreground``, else a ``Success`` Status (200 both:
        the API server answers 202 only for the deprecated ``orphanDependents: false``)."""
        cluster = self.cluster
        with cluster.cond:
            obj = cluster.jobsets.get((namespace, name))
            if obj is None:
                raise not_found(f"jobsets.{GROUP}", name)
            meta = obj["metadata"]
            meta.setdefault("deletionTimestamp", rfc3339())
            meta.setdefault("deletionGracePeriodSeconds", 0)
            meta["resourceVersion"] = cluster.next_rv()
            if propagation == "Foreground":  # the controller removes it once its pods are gone
                meta["finalizers"] = sorted({*(meta.get("finalizers") or []), "foregroundDeletion"})
                cluster.cond.notify_all()
                return 200, copy.deepcopy(obj)
            del cluster.jobsets[(namespace, name)]
            cluster.deleted_jobsets[(namespace, name)] = obj
            if propagation == "Orphan":
                for job in cluster.jobs.values():
                    refs = job.obj["metadata"].get("ownerReferences") or []
                    job.obj["metadata"]["ownerReferences"] = [r for r in refs if r["uid"] != meta["uid"]]
            cluster.cond.notify_all()
            details = {"name": name, "group": GROUP, "kind": "jobsets", "uid": meta["uid"]}
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def api_job_get(self, namespace: str, name: str) -> dict[str, Any]:
        with self.cluster.cond:
            job = self.cluster.jobs.get((namespace, name))
            if job is None:
                raise not_found("jobs.batch", name)
            return copy.deepcopy(job.obj)

    def api_job_list(self, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        jobs = self.cluster.jobs
        found = self._list("JobList", lambda: (j.obj for (ns, _), j in jobs.items() if namespace in (None, ns)), query)
        return {**found, "apiVersion": "batch/v1"}


def _default_and_validate(obj: dict[str, Any]) -> None:
    """The JobSet webhook's defaults, and the checks this server needs (422 ``Invalid``)."""
    spec = obj.get("spec")
    name = obj["metadata"].get("name", "")
    rjobs = (spec or {}).get("replicatedJobs")
    if not rjobs or not all(isinstance(r, dict) and r.get("name") for r in rjobs):
        raise ApiError(422, "Invalid", f'JobSet.{GROUP} "{name}" is invalid: spec.replicatedJobs: Required value')
    assert isinstance(spec, dict)
    spec.setdefault("successPolicy", {"operator": "All"})
    network = spec.setdefault("network", {})
    network.setdefault("enableDNSHostnames", True)
    network.setdefault("publishNotReadyAddresses", True)
    for rjob in rjobs:
        rjob.setdefault("replicas", 1)
        job_spec = rjob.setdefault("template", {}).setdefault("spec", {})
        job_spec.setdefault("completionMode", "Indexed")
        pod_spec = job_spec.setdefault("template", {}).setdefault("spec", {})
        pod_spec.setdefault("restartPolicy", "OnFailure")
    policy = spec.get("failurePolicy")
    if policy is not None:
        policy.setdefault("restartStrategy", "Recreate")
        if policy["restartStrategy"] not in ("Recreate", "BlockingRecreate"):
            raise ApiError(422, "Invalid", f"restartStrategy {policy['restartStrategy']} is not imitated here")
        for i, rule in enumerate(policy.get("rules") or []):
            rule.setdefault("name", f"failurePolicyRule{i}")
            if rule.get("action") not in ACTIONS:
                raise ApiError(422, "Invalid", f"failure policy action {rule.get('action')!r} is not imitated here")


class JobSetController(threading.Thread):
    """The JobSet and Job controllers, one thread over ``api``'s cluster (see the module docstring): each pass,
    under ``cluster.cond``, syncs every Job, then every JobSet, then collects the Jobs no JobSet owns; it wakes on
    any change. ``errors`` keeps the traceback of any pass that failed (a bug here), for the tests to show."""

    def __init__(self, api: JobSetsAPI):
        super().__init__(name="jobset-controller", daemon=True)
        self.api, self.cluster = api, api.cluster
        self.job_controller = JobController(api)
        self.errors: list[str] = []
        self.halt = threading.Event()
        self._names: dict[str, set[str]] = {}  # JobSet uid -> its pods' DNS names

    def run(self) -> None:
        cluster = self.cluster
        with cluster.cond:
            while not (self.halt.is_set() or cluster.stopping):
                try:
                    for job in list(cluster.jobs.values()):
                        self.job_controller.sync(job)
                    for obj in list(cluster.jobsets.values()):
                        self._reconcile(obj)
                    self._collect_garbage()
                except Exception:
                    self.errors.append(traceback.format_exc())
                cluster.cond.wait(0.2)

    def stop(self) -> None:
        self.halt.set()
        with self.cluster.cond:
            self.cluster.cond.notify_all()
        self.join(timeout=10)

    # -------------------------------------------------------------------------------------- JobSet controller

    def _reconcile(self, js: dict[str, Any]) -> None:
        cluster, meta, status = self.cluster, js["metadata"], js["status"]
        jobs = [j for j in cluster.jobs.values() if owned_by(j.obj, meta["uid"])]
        if "deletionTimestamp" in meta:  # a foreground delete: the object goes once its pods are gone
            if self._delete_jobs(jobs):
                key = (meta["namespace"], meta["name"])
                del cluster.jobsets[key]
                cluster.deleted_jobsets[key] = js
                cluster.cond.notify_all()
            return
        current = [j for j in jobs if j.obj["metadata"]["labels"][RESTART_ATTEMPT] == str(status["restarts"])]
        previous = [j for j in jobs if j not in current]
        new_status = {**status, "replicatedJobsStatus": _replicated_jobs_status(js, current)}
        if new_status != status:
            js["status"] = status = new_status
            self._touch(js)
        if status.get("terminalState"):
            self._delete_jobs([j for j in current if not (condition(j.obj, "Complete") or condition(j.obj, "Failed"))])
            return
        if previous and not self._delete_jobs(previous):
            return  # (Blocking)Recreate: the new attempt waits for every pod of the old one to be gone
        failed = [j for j in current if condition(j.obj, "Failed")]
        if failed:
            self._apply_failure_policy(js, failed)
            return
        policy = js["spec"]["successPolicy"]
        targets = policy.get("targetReplicatedJobs") or [r["name"] for r in js["spec"]["replicatedJobs"]]
        done = [
            j
            for j in current
            if condition(j.obj, "Complete") and j.obj["metadata"]["labels"][REPLICATED_JOB] in targets
        ]
        expected = (
            1
            if policy.get("operator") == "Any"
            else sum(r["replicas"] for r in js["spec"]["replicatedJobs"] if r["name"] in targets)
        )
        if done and len(done) >= expected:
            self._finish(js, "Completed", "AllJobsCompleted", "jobset completed successfully", "Normal")
            return
        for rjob in js["spec"]["replicatedJobs"]:
            for job_index in range(rjob["replicas"]):
                if (meta["namespace"], f"{meta['name']}-{rjob['name']}-{job_index}") not in cluster.jobs:
                    self._create_job(js, rjob, job_index)
        ready = sum(s["ready"] + s["succeeded"] for s in status["replicatedJobsStatus"])
        all_ready = ready == sum(r["replicas"] for r in js["spec"]["replicatedJobs"])
        if all_ready and set_condition(js, "RestartingJobSet", "False", "JobsReady", "all jobs are ready", job=False):
            self._touch(js)

    def _apply_failure_policy(self, js: dict[str, Any], failed: list[Job]) -> None:
        """jobset pkg/controllers/failure_policy.go: the first rule that applies to a failed Job, and its action."""

        def failed_at(job: Job) -> str:
            return (condition(job.obj, "Failed") or {})["lastTransitionTime"]

        first = min(failed, key=failed_at)
        policy = js["spec"].get("failurePolicy")
        if policy is None:
            msg = f"jobset failed due to one or more job failures (first failed job: {first.key[1]})"
            self._finish(js, "Failed", "FailedJobs", msg, "Warning")
            return
        rule: dict[str, Any] | None = None
        for candidate in policy.get("rules") or []:
            matching = [j for j in failed if _rule_applies(candidate, j)]
            if matching:
                rule, first = candidate, min(matching, key=failed_at)
                break
        action = rule["action"] if rule else "RestartJobSet"
        suffix = f"(first failed job: {first.key[1]})"
        status = js["status"]
        if action == "FailJobSet":
            msg = f"applying FailJobSet failure policy action {suffix}"
            self._finish(js, "Failed", "FailJobSetFailurePolicyAction", msg, "Warning")
            return
        counts = action == "RestartJobSet"
        if counts and status.get("restartsCountTowardsMax", 0) >= policy.get("maxRestarts", 0):
            msg = f"jobset failed due to reaching max number of restarts {suffix}"
            self._finish(js, "Failed", "ReachedMaxRestarts", msg, "Warning")
            return
        status["restarts"] += 1
        if counts:
            status["restartsCountTowardsMax"] = status.get("restartsCountTowardsMax", 0) + 1
        message = f"applying {action} failure policy action {suffix}"
        reason = f"FailurePolicy_{rule['name']}" if rule else "DefaultFailurePolicy"
        self.cluster.object_event(js, f"{action}FailurePolicyAction", message, "Warning", component="jobset")
        set_condition(js, "RestartingJobSet", "True", reason, message, job=False)
        self.cluster.object_event(js, reason, message, "Warning", component="jobset")
        self._touch(js)

    def _finish(self, js: dict[str, Any], state: str, reason: str, message: str, type_: str) -> None:
        set_condition(js, state, "True", reason, message, job=False)
        restarting = ("JobSetFailed", "jobset failed") if state == "Failed" else ("JobSetCompleted", message)
        set_condition(js, "RestartingJobSet", "False", *restarting, job=False)
        js["status"]["terminalState"] = state
        self.cluster.object_event(js, reason, message, type_, component="jobset")
        self._touch(js)

    def _create_job(self, js: dict[str, Any], rjob: dict[str, Any], job_index: int) -> None:
        cluster, meta = self.cluster, js["metadata"]
        ns, name = meta["namespace"], f"{meta['name']}-{rjob['name']}-{job_index}"
        uid = str(uuid.uuid4())
        spec = copy.deepcopy(rjob["template"]["spec"])
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", spec["parallelism"])
        spec.setdefault("backoffLimit", 6)
        jobset_labels = {
            JOBSET_NAME: meta["name"],
            JOBSET_UID: meta["uid"],
            REPLICATED_JOB: rjob["name"],
            RESTART_ATTEMPT: str(js["status"]["restarts"]),
            "jobset.sigs.k8s.io/replicatedjob-replicas": str(rjob["replicas"]),
            JOB_INDEX: str(job_index),
            "jobset.sigs.k8s.io/job-key": hashlib.sha1(f"{ns}/{name}".encode()).hexdigest(),
        }
        job_labels = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name}
        job_labels.update({"controller-uid": uid, "job-name": name})
        template = spec.setdefault("template", {})
        tmeta = template.setdefault("metadata", {})
        tmeta["labels"] = {**(tmeta.get("labels") or {}), **jobset_labels, **job_labels}
        tmeta["annotations"] = {**(tmeta.get("annotations") or {}), **jobset_labels}
        network = js["spec"]["network"]
        if network.get("enableDNSHostnames"):
            subdomain = network.get("subdomain") or meta["name"]
            template["spec"]["subdomain"] = subdomain
            names = self._names.setdefault(meta["uid"], set())
            for index in range(spec["completions"]):
                host = f"{name}-{index}.{subdomain}"
                names.update({host, f"{host}.{ns}.svc", f"{host}.{ns}.svc.cluster.local"})
            self._publish_hosts()
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        spec["suspend"] = False
        obj = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": uid,
                "creationTimestamp": rfc3339(),
                "resourceVersion": cluster.next_rv(),
                "labels": {**(rjob["template"].get("metadata") or {}).get("labels", {}), **jobset_labels},
                "annotations": {**(rjob["template"].get("metadata") or {}).get("annotations", {}), **jobset_labels},
                "ownerReferences": [owner_reference(js)],
            },
            "spec": spec,
            "status": {"startTime": rfc3339()},
        }
        cluster.jobs[(ns, name)] = Job(obj)
        cluster.cond.notify_all()

    def _delete_jobs(self, jobs: list[Job]) -> bool:
        """Delete the Jobs as a foreground delete does: their pods deleted gracefully, each Job once its pods are
        gone. True when none is left."""
        cluster = self.cluster
        for job in jobs:
            job.obj["metadata"].setdefault("deletionTimestamp", rfc3339())
            pods = [p for p in cluster.pods.values() if owned_by(p.obj, job.obj["metadata"]["uid"])]
            for pod in pods:
                if "deletionTimestamp" not in pod.obj["metadata"] or pod.finished:
                    self.api.api_delete(*pod.key, None)
            if not pods:
                del cluster.jobs[job.key]
                cluster.cond.notify_all()
        return not any(job.key in cluster.jobs for job in jobs)

    def _collect_garbage(self) -> None:
        """The garbage collector: Jobs whose JobSet is gone go (their pods first); the DNS names go with it."""
        live = {js["metadata"]["uid"] for js in self.cluster.jobsets.values()}
        orphans = [
            j
            for j in self.cluster.jobs.values()
            if any(r["uid"] not in live for r in j.obj["metadata"].get("ownerReferences") or [])
        ]
        if orphans:
            self._delete_jobs(orphans)
        if set(self._names) - live:
            self._names = {uid: names for uid, names in self._names.items() if uid in live}
            self._publish_hosts()

    def _publish_hosts(self) -> None:
        self.cluster.hosts = {name: POD_IP for names in self._names.values() for name in names}

    def _touch(self, js: dict[str, Any]) -> None:
        js["metadata"]["resourceVersion"] = self.cluster.next_rv()
        self.cluster.cond.notify_all()


def _rule_applies(rule: Mapping[str, Any], job: Job) -> bool:
    failed = condition(job.obj, "Failed") or {}
    reasons, patterns = rule.get("onJobFailureReasons") or [], rule.get("onJobFailureMessagePatterns") or []
    targets = rule.get("targetReplicatedJobs") or []
    return (
        (not reasons or failed.get("reason") in reasons)
        and (not patterns or any(re.search(p, failed.get("message", "")) for p in patterns))
        and (not targets or job.obj["metadata"]["labels"].get(REPLICATED_JOB) in targets)
    )


def _replicated_jobs_status(js: Mapping[str, Any], jobs: list[Job]) -> list[dict[str, Any]]:
    out = []
    for rjob in js["spec"]["replicatedJobs"]:
        mine = [j.obj for j in jobs if j.obj["metadata"]["labels"][REPLICATED_JOB] == rjob["name"]]
        finished = [o for o in mine if condition(o, "Complete") or condition(o, "Failed")]
        active = [o for o in mine if o not in finished]
        out.append(
            {
                "name": rjob["name"],
                "ready": sum(
                    o["status"].get("ready", 0) + o["status"].get("succeeded", 0)
                    >= min(o["spec"]["parallelism"], o["spec"]["completions"])
                    for o in active
                ),
                "succeeded": sum(bool(condition(o, "Complete")) for o in mine),
                "failed": sum(bool(condition(o, "Failed")) for o in mine),
                "active": sum(o["status"].get("active", 0) > 0 for o in active),
                "suspended": 0,
            }
        )
    return out
