"""The test Kubernetes' JobSets (tests/airflow/_kubejobsets.py, _kubejobs.py), driven through the official client
as the operator drives them: the pods each index gets, their names resolving here, success, podtrain's failure rules
(a bug fails the JobSet, a preemption restarts the gang for free, an outage restarts within maxRestarts), the gang
torn down whole before the next attempt starts, and deletion. Bodies come from ``jobset_body`` with the container's
``torchrun`` args replaced by a shell script (the ``sh:test`` image runs ``sh -c <args>``)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from kubeapi import KubeAPIServer
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from podtrain_airflow.jobset import GROUP, PLURAL, RESTART_LABEL, VERSION, jobset_body

NS = "default"
NAME = "train"
WAIT = 60.0  # generous: a loaded 2-core CI machine
JOBSET_LABEL = f"jobset.sigs.k8s.io/jobset-name={NAME}"
INDEX = "batch.kubernetes.io/job-completion-index"


@pytest.fixture
def custom(kube: KubeAPIServer) -> k8s.CustomObjectsApi:
    cfg = k8s.Configuration()
    cfg.host = kube.url
    return k8s.CustomObjectsApi(k8s.ApiClient(cfg))


def body(script: str, *, nodes: int = 2, max_restarts: int = 3, grace: int = 2) -> dict[str, Any]:
    """podtrain's JobSet on ``nodes`` pods whose container runs ``script`` under ``sh -c``."""
    pod = {
        "metadata": {"labels": {"app": "podtrain"}},
        "spec": {
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "base", "image": "sh:test", "args": []}],
        },
    }
    out = jobset_body(pod, name=NAME, nodes=nodes, procs_per_node=1, max_restarts=max_restarts)
    out["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["args"] = [script]
    return out


def create(custom: k8s.CustomObjectsApi, js: dict[str, Any]) -> dict[str, Any]:
    return dict(custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, js))


def condition(js: dict[str, Any], type_: str) -> dict[str, Any]:
    (found,) = [c for c in js["status"].get("conditions", []) if c["type"] == type_ and c["status"] == "True"]
    return dict(found)


def pods_of(kube: KubeAPIServer, attempt: int | None = None) -> list[dict[str, Any]]:
    """Every pod of the JobSet ever made (deleted ones too), of one restart attempt or all."""
    return [
        p
        for p in kube.pods(NS, deleted=True)
        if p["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == NAME
        and attempt in (None, int(p["metadata"]["labels"][RESTART_LABEL]))
    ]


def test_create_get_list_and_the_errors_of_the_jobset_endpoints(kube: KubeAPIServer, custom: Any) -> None:
    created = create(custom, body("sleep 30"))
    assert created["status"] == {"restarts": 0}
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    got = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    status = custom.get_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, NAME)
    assert status["metadata"]["name"] == NAME
    assert [
        i["metadata"]["name"] for i in custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"]
    ] == [NAME]
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, label_selector="app=other")
    assert listed["items"] == []
    with pytest.raises(ApiException) as taken:
        create(custom, body("true"))
    assert taken.value.status == 409
    with pytest.raises(ApiException) as invalid:
        create(custom, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "JobSet", "metadata": {"name": "x"}, "spec": {}})
    assert invalid.value.status == 422
    with pytest.raises(ApiException) as missing:
        custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "nobody")
    assert missing.value.status == 404
    kube.wait_for(lambda: len(kube.jobs(NS)) == 1, WAIT, "the child Job")
    (job,) = kube.jobs(NS)
    assert job["metadata"]["name"] == f"{NAME}-node-0"
    batch = k8s.BatchV1Api(custom.api_client)
    assert batch.read_namespaced_job(f"{NAME}-node-0", NS).spec.completions == 2
    listed_jobs = batch.list_namespaced_job(NS, label_selector=JOBSET_LABEL).items
    assert [j.metadata.name for j in listed_jobs] == [f"{NAME}-node-0"]


def test_each_index_gets_a_pod_with_its_hostname_labels_and_completion_index(
    kube: KubeAPIServer, custom: Any, api: k8s.CoreV1Api
) -> None:
    """Kubernetes expands $(JOB_COMPLETION_INDEX) in args; the restart attempt comes from the label; the pods are
    named and labelled as the Job and JobSet controllers name and label them."""
    create(custom, body("echo rank=$(JOB_COMPLETION_INDEX) host=$HOSTNAME attempt=$PODTRAIN_RESTART_ATTEMPT"))
    kube.wait_for_jobset(NS, NAME, "Completed", WAIT)
    pods = api.list_namespaced_pod(NS, label_selector=JOBSET_LABEL).items
    assert len(pods) == 2
    for pod in sorted(pods, key=lambda p: p.metadata.labels[INDEX]):
        index = pod.metadata.labels[INDEX]
        assert re.fullmatch(rf"{NAME}-node-0-{index}-[0-9a-z]{{5}}", pod.metadata.name)
        assert (pod.spec.hostname, pod.spec.subdomain) == (f"{NAME}-node-0-{index}", NAME)
        labels = pod.metadata.labels
        assert labels["app"] == "podtrain"
        assert labels["jobset.sigs.k8s.io/replicatedjob-name"] == "node"
        assert labels["jobset.sigs.k8s.io/job-index"] == "0"
        assert labels[RESTART_LABEL] == "0"
        assert labels["batch.kubernetes.io/job-name"] == labels["job-name"] == f"{NAME}-node-0"
        assert pod.metadata.annotations[INDEX] == index
        assert pod.metadata.annotations[RESTART_LABEL] == "0"
        assert pod.status.phase == "Succeeded"
        assert kube.log_text(NS, pod.metadata.name) == f"rank={index} host={NAME}-node-0-{index} attempt=0\n"


def test_the_pods_dns_names_resolve_to_this_machine(kube: KubeAPIServer, custom: Any) -> None:
    """MASTER_ADDR (pod 0's <hostname>.<subdomain>), the same name expanded into an arg, and the FQDNs under
    <ns>.svc become 127.0.0.1, where every pod runs; a name that is no pod's stays."""
    script = (
        "echo env=$MASTER_ADDR; echo arg=--master-addr=$(MASTER_ADDR); "
        f"echo fqdn={NAME}-node-0-1.{NAME}.{NS}.svc.cluster.local:29500; echo other={NAME}-node-0-9.{NAME}"
    )
    create(custom, body(script))
    kube.wait_for_jobset(NS, NAME, "Completed", WAIT)
    for pod in pods_of(kube):
        assert kube.log_text(NS, pod["metadata"]["name"]).splitlines() == [
            "env=127.0.0.1",
            "arg=--master-addr=127.0.0.1",
            "fqdn=127.0.0.1:29500",
            f"other={NAME}-node-0-9.{NAME}",
        ]


def test_when_every_pod_succeeds_the_jobset_completes_and_its_pods_stay(kube: KubeAPIServer, custom: Any) -> None:
    create(custom, body("sleep 0.2"))
    js = kube.wait_for_jobset(NS, NAME, "Completed", WAIT)
    completed = condition(js, "Completed")
    assert (completed["reason"], completed["message"]) == ("AllJobsCompleted", "jobset completed successfully")
    assert js["status"]["terminalState"] == "Completed"
    assert js["status"]["restarts"] == 0
    assert [p["status"]["phase"] for p in kube.pods(NS)] == ["Succeeded", "Succeeded"]
    (job,) = kube.jobs(NS)
    assert condition(job, "Complete")["reason"] == "CompletionsReached"
    assert job["status"]["succeeded"] == 2


def test_exit_1_fails_the_jobset_at_once_and_nothing_restarts(kube: KubeAPIServer, custom: Any) -> None:
    """podtrain's user-error rule: the Job fails by its podFailurePolicy (the Job controller's message), the JobSet
    by FailJobSet; the other pod is terminated and stays, no pod of a second attempt is made."""
    create(custom, body('if [ "$JOB_COMPLETION_INDEX" = 1 ]; then sleep 0.2; exit 1; fi; sleep 30 & wait'))
    js = kube.wait_for_jobset(NS, NAME, "Failed", WAIT)
    failed = condition(js, "Failed")
    assert failed["reason"] == "FailJobSetFailurePolicyAction"
    assert failed["message"] == f"applying FailJobSet failure policy action (first failed job: {NAME}-node-0)"
    assert js["status"]["terminalState"] == "Failed"
    assert js["status"]["restarts"] == 0
    (job,) = kube.jobs(NS)
    (culprit,) = [p for p in kube.pods(NS) if p["metadata"]["labels"][INDEX] == "1"]
    job_failed = condition(job, "Failed")
    assert job_failed["reason"] == "PodFailurePolicy"
    assert job_failed["message"] == (
        f"Container base for pod {NS}/{culprit['metadata']['name']} failed with exit code 1 "
        "matching FailJob rule at index 0"
    )
    assert len(pods_of(kube)) == 2
    assert [p["status"]["phase"] for p in kube.pods(NS)] == ["Failed", "Failed"]
    (survivor,) = [p for p in kube.pods(NS) if p["metadata"]["labels"][INDEX] == "0"]
    assert survivor["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143  # SIGTERM


def test_exit_75_restarts_the_gang_without_spending_the_budget_once_the_old_pods_are_gone(
    kube: KubeAPIServer, custom: Any
) -> None:
    """podtrain's preempted rule: RestartJobSetAndIgnoreMaxRestarts. Two Jobs (replicas 2) of one pod each: the pod
    of Job 1 exits 75 and fails its Job; Job 0's pod, still running, takes a second to stop on SIGTERM. Every pod
    of attempt 0 is deleted, and the pods of attempt 1 (labelled so) start only after the slowest old pod's process
    has ended (BlockingRecreate)."""
    script = (
        'if [ "$PODTRAIN_RESTART_ATTEMPT" = 0 ]; then'
        '  if [ "$JOB_INDEX" = 1 ]; then sleep 0.3; exit 75; fi;'
        "  trap 'sleep 1; exit 143' TERM; sleep 30 & wait; "
        "fi; echo attempt=$PODTRAIN_RESTART_ATTEMPT"
    )
    js = body(script, nodes=1, grace=5)
    rjob = js["spec"]["replicatedJobs"][0]
    rjob["replicas"] = 2
    container = rjob["template"]["spec"]["template"]["spec"]["containers"][0]
    field = {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}
    container["env"].append({"name": "JOB_INDEX", "valueFrom": {"fieldRef": field}})
    create(custom, js)
    done = kube.wait_for_jobset(NS, NAME, "Completed", WAIT)
    assert done["status"]["restarts"] == 1
    assert done["status"].get("restartsCountTowardsMax", 0) == 0
    old = sorted(pods_of(kube, 0), key=lambda p: p["metadata"]["labels"]["jobset.sigs.k8s.io/job-index"])
    new = pods_of(kube, 1)
    assert len(old) == len(new) == 2
    live = {p["metadata"]["name"] for p in kube.pods(NS)}
    assert live == {p["metadata"]["name"] for p in new}, "the old attempt's pods are deleted"
    for pod in new:
        assert kube.log_text(NS, pod["metadata"]["name"]) == "attempt=1\n"
    with pytest.raises(KeyError):
        kube.pod(NS, old[0]["metadata"]["name"])
    culprit = kube.pod(NS, old[1]["metadata"]["name"], deleted=True)
    assert culprit["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75
    old_ends = [kube.process_span(NS, p["metadata"]["name"])[1] for p in old]
    new_starts = [kube.process_span(NS, p["metadata"]["name"])[0] for p in new]
    assert None not in old_ends and None not in new_starts
    assert min(new_starts) > max(old_ends)
    messages = [e["message"] for e in kube.events(NS) if e["reason"].startswith("RestartJobSetAndIgnore")]
    assert messages == [
        f"applying RestartJobSetAndIgnoreMaxRestarts failure policy action (first failed job: {NAME}-node-1)"
    ]


def test_exit_69_restarts_within_max_restarts_then_fails_the_jobset(kube: KubeAPIServer, custom: Any) -> None:
    """The catch-all rule (RestartJobSet) counts each restart; at maxRestarts the JobSet fails."""
    create(custom, body('[ "$JOB_COMPLETION_INDEX" = 0 ] && exit 69; sleep 30 & wait', max_restarts=2, grace=1))
    js = kube.wait_for_jobset(NS, NAME, "Failed", WAIT)
    failed = condition(js, "Failed")
    assert failed["reason"] == "ReachedMaxRestarts"
    assert (
        failed["message"] == f"jobset failed due to reaching max number of restarts (first failed job: {NAME}-node-0)"
    )
    assert (js["status"]["restarts"], js["status"]["restartsCountTowardsMax"]) == (2, 2)
    assert [len(pods_of(kube, attempt)) for attempt in (0, 1, 2, 3)] == [2, 2, 2, 0]


def test_a_preempted_pod_restarts_the_whole_gang(kube: KubeAPIServer, custom: Any) -> None:
    """A DisruptionTarget on one pod of a running gang: the Job fails by the condition rule, the other pod is
    terminated too, and the JobSet restarts without spending maxRestarts."""
    script = 'if [ "$PODTRAIN_RESTART_ATTEMPT" = 0 ]; then echo started; sleep 30 & wait; fi; echo done'
    create(custom, body(script, max_restarts=0, grace=1))
    preempter = kube.preempt_when("started", label_selector=f"{RESTART_LABEL}=0,{INDEX}=1", timeout=WAIT)
    js = kube.wait_for_jobset(NS, NAME, "Completed", WAIT)
    preempter.join(timeout=WAIT)
    assert preempter.error is None and len(preempter.preempted) == 1
    assert (js["status"]["restarts"], js["status"].get("restartsCountTowardsMax", 0)) == (1, 0)
    old = {p["metadata"]["labels"][INDEX]: p for p in pods_of(kube, 0)}
    assert [c["type"] for c in old["1"]["status"]["conditions"]].count("DisruptionTarget") == 1
    assert "DisruptionTarget" not in [c["type"] for c in old["0"]["status"]["conditions"]]
    assert old["0"]["status"]["phase"] == "Failed", "the survivor was terminated with the gang"
    assert all(kube.log_text(NS, p["metadata"]["name"]) == "done\n" for p in pods_of(kube, 1))
    messages = [e["message"] for e in kube.events(NS) if e["reason"].startswith("RestartJobSetAndIgnore")]
    assert messages == [
        f"applying RestartJobSetAndIgnoreMaxRestarts failure policy action (first failed job: {NAME}-node-0)"
    ]


def test_without_a_failure_policy_a_job_past_its_backoff_limit_fails_the_jobset(
    kube: KubeAPIServer, custom: Any
) -> None:
    """No podFailurePolicy, backoffLimit 1: the first failure gets a new pod for its index, the second fails the
    Job (BackoffLimitExceeded) and, with no failurePolicy, the JobSet (FailedJobs)."""
    js = body('[ "$JOB_COMPLETION_INDEX" = 0 ] && exit 3; sleep 30 & wait', grace=1)
    del js["spec"]["failurePolicy"]
    job_spec = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    del job_spec["podFailurePolicy"]
    job_spec["backoffLimit"] = 1
    create(custom, js)
    done = kube.wait_for_jobset(NS, NAME, "Failed", WAIT)
    failed = condition(done, "Failed")
    assert failed["reason"] == "FailedJobs"
    assert failed["message"] == f"jobset failed due to one or more job failures (first failed job: {NAME}-node-0)"
    (job,) = kube.jobs(NS)
    job_failed = condition(job, "Failed")
    assert (job_failed["reason"], job_failed["message"]) == (
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    )
    assert sorted(p["metadata"]["labels"][INDEX] for p in pods_of(kube)) == ["0", "0", "1"]


@pytest.mark.parametrize("propagation", ["Foreground", "Background"])
def test_deleting_the_jobset_terminates_its_pods_and_removes_it(
    kube: KubeAPIServer, custom: Any, propagation: str
) -> None:
    create(custom, body("trap 'exit 0' TERM; echo up; sleep 30 & wait", grace=2))
    kube.wait_for(lambda: sum(kube.log_text(NS, p["metadata"]["name"]) == "up\n" for p in pods_of(kube)) == 2, WAIT)
    answer = custom.delete_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, NAME, body=k8s.V1DeleteOptions(propagation_policy=propagation)
    )
    if propagation == "Foreground":
        assert answer["metadata"]["deletionTimestamp"] and answer["metadata"]["finalizers"] == ["foregroundDeletion"]
    else:
        assert (answer["kind"], answer["status"]) == ("Status", "Success")
    kube.wait_for(lambda: not kube.jobsets(NS) and not kube.pods(NS) and not kube.jobs(NS), WAIT, "all gone")
    with pytest.raises(ApiException) as gone:
        custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
    assert gone.value.status == 404
    assert kube.jobset(NS, NAME, deleted=True)["metadata"]["deletionTimestamp"]
    assert [js["metadata"]["name"] for js in kube.jobsets(NS, deleted=True)] == [NAME]
    for pod in pods_of(kube):
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0, "SIGTERM, not SIGKILL"


def test_the_async_client_reads_a_jobset(kube: KubeAPIServer, custom: Any) -> None:
    from kubernetes_asyncio import client as aio

    create(custom, body("sleep 0.2"))

    async def read() -> dict[str, Any]:
        cfg = aio.Configuration()
        cfg.host = kube.url
        async with aio.ApiClient(cfg) as client:
            return dict(
                await aio.CustomObjectsApi(client).get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
            )

    assert asyncio.run(read())["metadata"]["name"] == NAME
