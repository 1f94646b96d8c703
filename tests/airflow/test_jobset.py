"""The JobSet of a training task over several pods, built offline from the real training task's pod: it validates
against the JobSet CRD's schema (vendored: ``schemas/jobset.x-k8s.io_jobsets-v0.12.0.yaml``, from kubernetes-sigs/jobset
tag v0.12.0, commit f22e565ac3cc3265c7c45ef67ecffdc689af5d77, ``config/components/crd/bases/``), its Job against
Kubernetes' own (strict), and its failure rules send each way a pod can end where podtrain's contract says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient
from offline import render_and_build
from podtrain_airflow import jobset
from podtrain_airflow.exitcodes import PODTRAIN_EXIT_CODES

CRD = Path(__file__).with_name("schemas") / "jobset.x-k8s.io_jobsets-v0.12.0.yaml"
K8S_VERSION = "1.37.0"
NAME = "train-42"


@pytest.fixture(scope="module")
def train_pod(dagbag: Any) -> dict[str, Any]:
    """The podtrain_train DAG's training pod, as its worker builds it, serialized."""
    _, pod, _ = render_and_build(dagbag.dags["podtrain_train"].get_task("train"))
    return dict(ApiClient().sanitize_for_serialization(pod))


@pytest.fixture(scope="module")
def body(train_pod: dict[str, Any]) -> dict[str, Any]:
    return jobset.jobset_body(train_pod, name=NAME, nodes=4, procs_per_node=8, max_restarts=3)


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == jobset.VERSION]
    return dict(version["schema"]["openAPIV3Schema"])


def _pod_spec(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"])


def test_the_jobset_validates_against_the_crd_schema_of_its_release(body: dict[str, Any]) -> None:
    """Every field is one the JobSet v0.12.0 CRD defines, of its type and enum (actions, strategies)."""
    crd = yaml.safe_load(CRD.read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["plural"]) == (jobset.GROUP, jobset.PLURAL)
    jsonschema.validate(body, _schema())
    broken = {**body, "spec": {**body["spec"], "failurePolicy": {"rules": [{"name": "x", "action": "Retry"}]}}}
    with pytest.raises(jsonschema.ValidationError, match="Retry"):
        jsonschema.validate(broken, _schema())


def test_its_job_validates_against_the_kubernetes_schema_strictly(body: dict[str, Any]) -> None:
    """The replicated job's template, as the Job JobSet creates, is a valid batch/v1 Job: no unknown field."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{NAME}-{jobset.REPLICATED_JOB}-0"},
        "spec": body["spec"]["replicatedJobs"][0]["template"]["spec"],
    }
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True) == "1.37"  # the schema used; raises on a problem
    typo = {**job, "spec": {**job["spec"], "backofLimit": 0}}
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_each_pod_is_the_single_pod_template_with_torchrun_over_every_node(
    body: dict[str, Any], train_pod: dict[str, Any]
) -> None:
    """The training pod's settings (resources, tolerations, selectors, grace, security, volumes, labels, the env
    contract) stay; restartPolicy is Never; the args start torchrun on 4 nodes of 8 with pod 0 as the master; the
    restart count comes from the label JobSet sets."""
    spec, single = _pod_spec(body), train_pod["spec"]
    assert spec["restartPolicy"] == "Never"
    for key in ("tolerations", "nodeSelector", "securityContext", "volumes", "terminationGracePeriodSeconds"):
        assert spec.get(key) == single.get(key), key
    (container,) = spec["containers"]
    (original,) = single["containers"]
    for key in ("image", "resources", "securityContext", "volumeMounts", "terminationMessagePolicy"):
        assert container.get(key) == original.get(key), key
    assert container["args"] == [
        "torchrun",
        "--nnodes=4",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--nproc-per-node=8",
        "--master-addr=$(MASTER_ADDR)",
        f"--master-port={jobset.MASTER_PORT}",
        "--no-python",  # the command is `python /app/train.py`: torchrun runs it as it is on every rank
        *original["args"],
    ]
    assert jobset.torchrun_args(["train.py", "--lr", "1"], nodes=2, procs_per_node=1)[-4:-3] == [
        f"--master-port={jobset.MASTER_PORT}"
    ], "a script alone is run by torchrun's own Python"
    env = {e["name"]: e for e in container["env"]}
    assert {e["name"] for e in original["env"]} <= env.keys()
    assert env["MASTER_ADDR"]["value"] == f"{NAME}-node-0-0.{NAME}"
    assert env["PODTRAIN_RESTART_ATTEMPT"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/restart-attempt']"}
    }
    template = body["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (template["parallelism"], template["completions"], template["completionMode"]) == (4, 4, "Indexed")
    assert template["backoffLimit"] == 0, "no pod is replaced alone: the gang restarts together"
    assert template["template"]["metadata"]["labels"] == train_pod["metadata"]["labels"]
    assert body["spec"]["network"]["subdomain"] == NAME
    assert body["spec"]["failurePolicy"]["restartStrategy"] == "BlockingRecreate"


def _message(body: dict[str, Any], *, exit_code: int | None = None, condition: str | None = None) -> str | None:
    """The Job controller's failure message for a pod that ended so, as kubernetes/kubernetes
    pkg/controller/job/pod_failure_policy.go writes it: the first podFailurePolicy rule that matches, else None."""
    rules = body["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    for index, rule in enumerate(rules):
        codes = rule.get("onExitCodes")
        if exit_code is not None and codes and exit_code in codes["values"]:
            return (
                f"Container {codes['containerName']} for pod default/{NAME}-node-0-1 failed with exit code "
                f"{exit_code} matching {rule['action']} rule at index {index}"
            )
        conditions = [c["type"] for c in rule.get("onPodConditions", [])]
        if condition is not None and condition in conditions:
            return (
                f"Pod default/{NAME}-node-0-1 has condition {condition} matching {rule['action']} rule at index {index}"
            )
    return None


def _action(body: dict[str, Any], message: str | None, reason: str = "PodFailurePolicy") -> str:
    """The JobSet's action for a Job failed with ``reason`` and ``message``: its first applicable rule, as
    jobset pkg/controllers/failure_policy.go's ruleIsApplicable decides (empty lists match anything)."""
    for rule in body["spec"]["failurePolicy"]["rules"]:
        reasons = rule.get("onJobFailureReasons", [])
        patterns = rule.get("onJobFailureMessagePatterns", [])
        if (not reasons or reason in reasons) and (not patterns or any(re.search(p, message or "") for p in patterns)):
            return str(rule["action"])
    return "RestartJobSet"


def test_a_preemption_restarts_the_gang_free_a_bug_fails_it_and_the_rest_restarts_within_the_budget(
    body: dict[str, Any],
) -> None:
    """Every exit code of podtrain's contract (and an eviction) against the rules: 75 and DisruptionTarget restart
    the JobSet without spending maxRestarts, 1 and 2 fail it at once, 69 restarts within maxRestarts; a pod killed
    by something else (137) fails the Job by backoffLimit 0 and restarts within the budget too."""
    assert set(PODTRAIN_EXIT_CODES) == {0, 1, 2, 69, 75}, "a code was added to the contract: give it a rule"
    expected = {75: "RestartJobSetAndIgnoreMaxRestarts", 1: "FailJobSet", 2: "FailJobSet", 69: "RestartJobSet"}
    for code, action in expected.items():
        assert _action(body, _message(body, exit_code=code)) == action, code
    evicted = _message(body, condition="DisruptionTarget")
    assert _action(body, evicted) == "RestartJobSetAndIgnoreMaxRestarts"
    assert _message(body, exit_code=137) is None
    assert (
        _action(body, "Job has reached the specified backoff limit", reason="BackoffLimitExceeded") == "RestartJobSet"
    )


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        jobset.torchrun_args(["train.py"], nodes=0, procs_per_node=8)
    with pytest.raises(ValueError, match="max_restarts"):
        jobset.jobset_body(
            {"spec": {"containers": [{"name": "base"}]}}, name="x", nodes=2, procs_per_node=1, max_restarts=-1
        )
