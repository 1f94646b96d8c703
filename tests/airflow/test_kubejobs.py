"""The test Kubernetes' batch/v1 Jobs and core/v1 Services (tests/airflow/_kubejobs.py, _kubeservices.py), driven
through the official client as ``PodtrainIndexedJobOperator`` drives them: the headless Service and the Indexed Job
from ``podtrain_airflow.indexedjob``, the pods each index gets and their names resolving under the Service, success,
podtrain's podFailurePolicy failing the Job with the Job controller's message, deletion by propagation policy, and
the Service endpoints. The container's args are replaced by a shell script (the ``sh:test`` image runs ``sh -c``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from kubeapi import KubeAPIServer
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from podtrain_airflow.indexedjob import JOB_NAME_LABEL, indexed_job_body, service_body

NS = "default"
NAME = "train-1a2b3c4d-t1"
WAIT = 60.0  # generous: a loaded 2-core CI machine
INDEX = "batch.kubernetes.io/job-completion-index"
# a container that stops gracefully: SIGTERM makes it print "term" and exit 75, as podtrain does
GRACEFUL = "trap 'echo term; exit 75' TERM; echo up; while :; do sleep 0.1; done"


@pytest.fixture
def batch(kube: KubeAPIServer) -> Iterator[k8s.BatchV1Api]:
    cfg = k8s.Configuration()
    cfg.host = kube.url
    with k8s.ApiClient(cfg) as client:
        yield k8s.BatchV1Api(client)


def pod(script: str, *, grace: int = 5) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "podtrain", "podtrain-trial": "train"}},
        "spec": {
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "base", "image": "sh:test", "args": [script]}],
        },
    }


def job_body(script: str, *, name: str = NAME, nodes: int = 2, grace: int = 5) -> dict[str, Any]:
    """podtrain's Indexed Job on ``nodes`` pods whose container runs ``script`` under ``sh -c``."""
    return indexed_job_body(pod(script, grace=grace), name=name, nodes=nodes, procs_per_node=1, torchrun=False)


def pods_of(kube: KubeAPIServer, name: str = NAME, *, deleted: bool = False) -> list[dict[str, Any]]:
    """The Job's pods by completion index (with ``deleted``: every one ever made, deleted ones too)."""
    found = [p for p in kube.pods(NS, deleted=deleted) if p["metadata"]["labels"].get(JOB_NAME_LABEL) == name]
    return sorted(found, key=lambda p: int(p["metadata"]["labels"][INDEX]))


def graceful(log: str) -> bool:
    """The log of a ``GRACEFUL`` container stopped by SIGTERM (the shell may add ``Terminated`` for its sleep)."""
    lines = [line for line in log.splitlines() if line != "Terminated"]
    return lines == ["up", "term"]


def message(error: pytest.ExceptionInfo[ApiException]) -> str:
    """The message of the Status the server answered."""
    return str(json.loads(error.value.body)["message"])


def condition(job: dict[str, Any], type_: str) -> dict[str, Any]:
    (found,) = [c for c in job["status"].get("conditions") or [] if c["type"] == type_ and c["status"] == "True"]
    return found


def test_job_endpoints_create_with_the_api_servers_defaults_and_answer_their_errors(
    kube: KubeAPIServer, batch: k8s.BatchV1Api
) -> None:
    created = batch.create_namespaced_job(NS, job_body("sleep 30"))
    uid = created.metadata.uid
    assert uid and created.metadata.creation_timestamp
    assert created.metadata.labels == {"app": "podtrain", "podtrain-trial": "train"}
    assert created.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": uid}
    labels = created.spec.template.metadata.labels
    assert labels["batch.kubernetes.io/controller-uid"] == labels["controller-uid"] == uid
    assert labels[JOB_NAME_LABEL] == labels["job-name"] == NAME
    assert (created.spec.completion_mode, created.spec.backoff_limit, created.spec.suspend) == ("Indexed", 0, False)
    assert created.spec.pod_replacement_policy == "Failed", "the default under a podFailurePolicy"
    assert batch.read_namespaced_job_status(NAME, NS).metadata.uid == uid
    assert [j.metadata.name for j in batch.list_namespaced_job(NS, label_selector="app=podtrain").items] == [NAME]
    assert batch.list_namespaced_job(NS, label_selector="app=other").items == []

    with pytest.raises(ApiException) as taken:
        batch.create_namespaced_job(NS, job_body("true"))
    assert taken.value.status == 409 and f'jobs.batch "{NAME}" already exists' in message(taken)
    always = job_body("true", name="always")
    always["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    with pytest.raises(ApiException) as invalid:
        batch.create_namespaced_job(NS, always)
    assert invalid.value.status == 422 and 'Unsupported value: "Always"' in message(invalid)
    on_failure = job_body("true", name="on-failure")
    on_failure["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    with pytest.raises(ApiException) as invalid:
        batch.create_namespaced_job(NS, on_failure)
    assert invalid.value.status == 422 and 'only "Never" is supported when podFailurePolicy' in message(invalid)
    no_completions = job_body("true", name="no-completions")
    del no_completions["spec"]["completions"]
    with pytest.raises(ApiException) as invalid:
        batch.create_namespaced_job(NS, no_completions)
    assert invalid.value.status == 422 and "spec.completions: Required value" in message(invalid)
    with pytest.raises(ApiException) as missing:
        batch.read_namespaced_job("nobody", NS)
    assert missing.value.status == 404
    with pytest.raises(ApiException) as missing:
        batch.delete_namespaced_job("nobody", NS)
    assert missing.value.status == 404
    assert [j["metadata"]["name"] for j in kube.jobs(NS)] == [NAME], "no invalid Job was stored"


def test_an_indexed_job_runs_a_pod_per_index_named_under_its_headless_service_and_completes(
    kube: KubeAPIServer, api: k8s.CoreV1Api, batch: k8s.BatchV1Api
) -> None:
    """As PodtrainIndexedJobOperator creates them: the Service, then the Job. Each pod is named, labelled and
    given its index as the Job controller does; MASTER_ADDR (``<job>-0.<job>``) and the longer names resolve here
    (to 127.0.0.1) because the headless Service selects the pods."""
    api.create_namespaced_service(NS, service_body(pod(""), name=NAME))
    script = (
        "echo rank=$(JOB_COMPLETION_INDEX) env=$JOB_COMPLETION_INDEX host=$HOSTNAME master=$MASTER_ADDR "
        f"fqdn={NAME}-1.{NAME}.{NS}.svc.cluster.local"
    )
    batch.create_namespaced_job(NS, job_body(script))
    job = kube.wait_for_job(NS, NAME, "Complete", WAIT)
    assert condition(job, "SuccessCriteriaMet")["reason"] == "CompletionsReached"
    assert (job["status"]["succeeded"], job["status"]["failed"], job["status"]["active"]) == (2, 0, 0)
    assert job["status"]["completedIndexes"] == "0,1" and job["status"]["completionTime"]
    assert batch.read_namespaced_job_status(NAME, NS).status.succeeded == 2

    pods = api.list_namespaced_pod(NS, label_selector=f"{JOB_NAME_LABEL}={NAME}").items
    assert len(pods) == 2
    for each in sorted(pods, key=lambda p: p.metadata.labels[INDEX]):
        index = each.metadata.labels[INDEX]
        assert re.fullmatch(rf"{NAME}-{index}-[0-9a-z]{{5}}", each.metadata.name)
        assert (each.spec.hostname, each.spec.subdomain) == (f"{NAME}-{index}", NAME)
        assert each.metadata.labels["job-name"] == NAME and each.metadata.labels["podtrain-trial"] == "train"
        assert each.metadata.annotations[INDEX] == index
        assert [(r.kind, r.name, r.controller) for r in each.metadata.owner_references] == [("Job", NAME, True)]
        assert each.status.phase == "Succeeded"
        log = kube.log_text(NS, each.metadata.name)
        assert log == f"rank={index} env={index} host={NAME}-{index} master=127.0.0.1 fqdn=127.0.0.1\n"


def test_without_the_headless_service_the_pods_names_do_not_resolve(
    kube: KubeAPIServer, api: k8s.CoreV1Api, batch: k8s.BatchV1Api
) -> None:
    """The names come from the Service: a Job whose Service was not created (or selects other pods) gets none."""
    other = service_body(pod(""), name=NAME)
    other["spec"]["selector"] = {JOB_NAME_LABEL: "someone-else"}
    api.create_namespaced_service(NS, other)
    batch.create_namespaced_job(NS, job_body("echo master=$MASTER_ADDR", nodes=1))
    kube.wait_for_job(NS, NAME, "Complete", WAIT)
    (only,) = pods_of(kube)
    assert kube.log_text(NS, only["metadata"]["name"]) == f"master={NAME}-0.{NAME}\n"


def test_exit_75_under_podtrains_failure_policy_fails_the_job_at_once_with_the_job_controllers_message(
    kube: KubeAPIServer, batch: k8s.BatchV1Api
) -> None:
    """Pod 1 exits 75 (preempted): FailJob rule 1 matches; the Job is failing (FailureTarget), pod 0 is terminated
    gracefully, and Failed follows once no pod runs; backoffLimit 0 and FailJob: no pod is ever replaced."""
    batch.create_namespaced_job(NS, job_body(f'[ "$JOB_COMPLETION_INDEX" = 1 ] && sleep 1 && exit 75; {GRACEFUL}'))
    job = kube.wait_for_job(NS, NAME, "Failed", WAIT)
    first, second = pods_of(kube, deleted=True)
    failed = condition(job, "Failed")
    expected = (
        f"Container base for pod {NS}/{second['metadata']['name']} failed with exit code 75 "
        "matching FailJob rule at index 1"
    )
    assert (failed["reason"], failed["message"]) == ("PodFailurePolicy", expected)
    assert condition(job, "FailureTarget")["message"] == expected
    assert (job["status"]["failed"], job["status"]["active"], job["status"]["succeeded"]) == (1, 0, 0)
    assert [p["status"]["phase"] for p in (first, second)] == ["Failed", "Failed"]
    assert first["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75
    assert graceful(kube.log_text(NS, first["metadata"]["name"])), "pod 0 was stopped by SIGTERM"
    assert len(pods_of(kube, deleted=True)) == 2, "no pod was replaced"
    read = batch.read_namespaced_job_status(NAME, NS)
    assert [(c.type, c.reason) for c in read.status.conditions if c.type == "Failed"] == [
        ("Failed", "PodFailurePolicy")
    ]


@pytest.mark.parametrize("policy", ["Foreground", "Background", "Orphan"])
def test_delete_by_propagation_policy(kube: KubeAPIServer, batch: k8s.BatchV1Api, policy: str) -> None:
    """Foreground: the Job stays (deletionTimestamp, the foregroundDeletion finalizer) until its pods, terminated
    gracefully, are gone; Background: the Job goes at once, its pods after, gracefully; Orphan: the pods stay and
    run, no longer owned."""
    batch.create_namespaced_job(NS, job_body(GRACEFUL, grace=10))

    def both_up() -> bool:
        pods = pods_of(kube)
        return len(pods) == 2 and all(kube.log_text(NS, p["metadata"]["name"]) == "up\n" for p in pods)

    kube.wait_for(both_up, WAIT, "both pods up")
    options = k8s.V1DeleteOptions(propagation_policy=policy)
    answer = json.loads(batch.delete_namespaced_job(NAME, NS, body=options, _preload_content=False).data)
    if policy == "Foreground":  # the Job, still there until its pods are gone
        assert (answer["kind"], answer["metadata"]["name"]) == ("Job", NAME)
        assert answer["metadata"]["deletionTimestamp"] and answer["metadata"]["finalizers"] == ["foregroundDeletion"]
    else:
        assert (answer["kind"], answer["status"], answer["details"]["name"]) == ("Status", "Success", NAME)
        assert kube.jobs(NS) == [], "Background and Orphan remove the Job at once"
    if policy == "Orphan":
        pods = pods_of(kube)
        assert len(pods) == 2 and all(not p["metadata"].get("ownerReferences") for p in pods)
        assert all("deletionTimestamp" not in p["metadata"] for p in pods)
        assert all(p["status"]["phase"] == "Running" for p in pods)
        return
    kube.wait_for(lambda: not kube.jobs(NS) and not pods_of(kube), WAIT, "the Job and its pods gone")
    for gone in pods_of(kube, deleted=True):
        assert gone["metadata"]["deletionTimestamp"]
        assert graceful(kube.log_text(NS, gone["metadata"]["name"])), "terminated gracefully"
    (deleted,) = kube.jobs(NS, deleted=True)
    assert deleted["metadata"]["name"] == NAME and deleted["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiException) as gone:
        batch.read_namespaced_job(NAME, NS)
    assert gone.value.status == 404
    batch.create_namespaced_job(NS, job_body("true"))  # the name is free again
    kube.wait_for_job(NS, NAME, "Complete", WAIT)


def test_service_endpoints_create_get_list_delete_and_a_name_taken(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    created = api.create_namespaced_service(NS, service_body(pod(""), name=NAME, port=29501))
    assert created.metadata.uid and created.metadata.labels == {"app": "podtrain", "podtrain-trial": "train"}
    assert (created.spec.cluster_ip, created.spec.type) == ("None", "ClusterIP")
    assert created.spec.selector == {JOB_NAME_LABEL: NAME} and created.spec.publish_not_ready_addresses
    assert [(p.port, p.target_port, p.protocol) for p in created.spec.ports] == [(29501, 29501, "TCP")]
    assert api.read_namespaced_service(NAME, NS).metadata.uid == created.metadata.uid
    assert [s.metadata.name for s in api.list_namespaced_service(NS, label_selector="app=podtrain").items] == [NAME]
    with pytest.raises(ApiException) as taken:
        api.create_namespaced_service(NS, service_body(pod(""), name=NAME))
    assert taken.value.status == 409 and f'services "{NAME}" already exists' in message(taken)
    plain = {"metadata": {"name": "plain"}, "spec": {"ports": [{"port": 80, "targetPort": 8080}]}}
    assert re.fullmatch(r"10\.96\.\d+\.\d+", api.create_namespaced_service(NS, plain).spec.cluster_ip)
    with pytest.raises(ApiException) as invalid:
        api.create_namespaced_service(NS, {"metadata": {"name": "portless"}, "spec": {"selector": {"a": "b"}}})
    assert invalid.value.status == 422 and "spec.ports: Required value" in message(invalid)

    deleted = api.delete_namespaced_service(NAME, NS)
    assert deleted.metadata.uid == created.metadata.uid
    assert [s["metadata"]["name"] for s in kube.services(NS)] == ["plain"]
    assert {s["metadata"]["name"] for s in kube.services(NS, deleted=True)} == {"plain", NAME}
    for call in (api.read_namespaced_service, api.delete_namespaced_service):
        with pytest.raises(ApiException) as missing:
            call(NAME, NS)
        assert missing.value.status == 404
