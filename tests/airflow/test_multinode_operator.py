"""The multi-node task, offline: the podtrain_multinode DAG's operators build their gang from the real training
pod (a JobSet valid against its CRD; an Indexed Job and headless Service valid against Kubernetes' schema), name it
validly per try, follow it with a trigger that survives serialization, and refuse bad sizes."""

from __future__ import annotations

import importlib
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from offline import render_and_build
from podtrain_airflow import gangtrigger, indexedjob, jobset
from podtrain_airflow.gangpod import CONTAINER
from podtrain_airflow.multinode import (
    PodtrainIndexedJobOperator,
    PodtrainJobSetOperator,
    multinode_pod,
    multinode_preflight,
)
from test_jobset import K8S_VERSION, _schema

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _built(dagbag: Any, task_id: str, **kwargs: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    op, pod, context = render_and_build(dagbag.dags["podtrain_multinode"].get_task(task_id), **kwargs)
    return op, dict(ApiClient().sanitize_for_serialization(pod)), context


def test_the_dags_training_task_is_a_deferrable_jobset_of_two_nodes(dagbag: Any) -> None:
    op, pod, context = _built(dagbag, "train")
    assert isinstance(op, PodtrainJobSetOperator) and op.deferrable
    assert (op.nodes, op.procs_per_node, op.max_restarts) == (2, 1, 3)
    (body,) = op.bodies(pod, op.gang_name(context))
    jsonschema.validate(body, _schema())
    container = body["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["torchrun", "--nnodes=2"]
    assert container["args"][6:9] == ["--no-python", "python", "/app/train.py"]


def test_the_preflight_runs_on_every_node_as_it_is_without_torchrun_or_restarts(dagbag: Any) -> None:
    op, pod, context = _built(dagbag, "gpu_preflight")
    assert op.preflight and not op.torchrun and op.max_restarts == 0 and op.nodes == 2
    (body,) = op.bodies(pod, op.gang_name(context))
    jsonschema.validate(body, _schema())
    container = body["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["tini", "-g", "--"]
    assert container["args"] == ["sh", "-c", "nvidia-smi && podtrain smoke --gpus 1"]


def test_the_gang_is_named_per_task_run_and_try_as_a_dns_label_short_enough_for_its_pods(dagbag: Any) -> None:
    op, _, first = _built(dagbag, "train")
    _, _, retry = _built(dagbag, "train", try_number=2)
    _, _, other_run = _built(dagbag, "train", run_id="manual__2026-12-01T00:00:00+00:00")
    names = {op.gang_name(first), op.gang_name(retry), op.gang_name(other_run)}
    assert len(names) == 3, names
    assert op.gang_name(first) == op.gang_name(_built(dagbag, "train")[2]), "stable for one try"
    long = PodtrainJobSetOperator(
        task_id="x" * 200 + "_Train.Step", nodes=2, image="i", base_uri="s3://b", team="t", project="p"
    )
    for name in [*names, long.gang_name(first)]:
        assert DNS_1035.match(name) and len(name) <= 40, name
        # the longest host name JobSet gives a pod: <jobset>-node-0-<index>, and Job pod names add 6 more
        assert len(f"{name}-{jobset.REPLICATED_JOB}-0-9999-abcde") <= 63


def test_the_indexed_job_fallback_is_a_valid_job_and_headless_service(dagbag: Any, monkeypatch: Any) -> None:
    op, pod, context = _built(dagbag, "train")
    fallback = multinode_pod(
        "train",
        nodes=3,
        backend="indexed_job",
        image="img:1",
        base_uri="s3://b/p",
        team="t",
        project="p",
        command=["python", "train.py"],
        gpus=2,
    )
    assert isinstance(fallback, PodtrainIndexedJobOperator) and fallback.procs_per_node == 2
    name = op.gang_name(context)
    service, job = fallback.bodies(pod, name)
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True) == "1.37"
    assert kubernetes_validate.validate(service, K8S_VERSION, strict=True) == "1.37"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        3,
        3,
        0,
    )
    template = spec["template"]["spec"]
    assert template["subdomain"] == name == service["metadata"]["name"]
    assert template["restartPolicy"] == "Never"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {indexedjob.JOB_NAME_LABEL: name}
    (container,) = [c for c in template["containers"] if c["name"] == CONTAINER]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MASTER_ADDR"] == f"{name}-0.{name}", "the Job controller names pod 0's host <job>-0"
    assert "PODTRAIN_RESTART_ATTEMPT" not in env, "no restart in the cluster: the attempt is the try"
    assert container["args"][:4] == [
        "torchrun",
        "--nnodes=3",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--nproc-per-node=2",
    ]
    rules = spec["podFailurePolicy"]["rules"]
    assert {r["action"] for r in rules} == {"FailJob"}
    assert [75 in (r.get("onExitCodes") or {}).get("values", []) for r in rules] == [False, True, False]
    assert rules[2]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_bad_sizes_and_backends_are_refused_with_what_to_fix() -> None:
    base = {"image": "i", "base_uri": "s3://b", "team": "t", "project": "p", "command": ["train.py"]}
    with pytest.raises(ValueError, match="backend must be one of"):
        multinode_pod("t", nodes=2, backend="ray", **base)
    with pytest.raises(ValueError, match="nodes must be a whole number >= 1"):
        multinode_pod("t", nodes=0, **base)
    with pytest.raises(ValueError, match="procs_per_node must be a whole number >= 1"):
        multinode_pod("t", nodes=2, procs_per_node=0, **base)
    preflight = multinode_preflight(nodes=2, backend="indexed_job", image="i", base_uri="s3://b", team="t", project="p")
    assert isinstance(preflight, PodtrainIndexedJobOperator) and not preflight.torchrun


def test_the_trigger_survives_serialization_to_the_triggerer() -> None:
    trigger = gangtrigger.GangTrigger(
        kind="jobset",
        name="train-1a2b3c4d-t1",
        namespace="ml",
        config_file="/k",
        poll_interval=2.0,
        schedule_timeout=60.0,
        grace_seconds=20,
    )
    classpath, kwargs = trigger.serialize()
    module, _, cls = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), cls)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    with pytest.raises(ValueError, match="kind must be one of"):
        gangtrigger.GangTrigger(kind="pod", name="x", namespace="ml")


@pytest.mark.parametrize(
    ("kind", "status", "state"),
    [
        ("jobset", {"restarts": 1}, ""),
        ("jobset", {"conditions": [{"type": "Completed", "status": "True"}]}, "completed"),
        ("jobset", {"conditions": [{"type": "Failed", "status": "True"}], "terminalState": "Failed"}, "failed"),
        ("jobset", {"conditions": [{"type": "RestartingJobSet", "status": "True"}]}, ""),
        ("jobset", {"terminalState": "Completed"}, "completed"),
        ("job", {"conditions": [{"type": "Complete", "status": "True"}]}, "completed"),
        ("job", {"conditions": [{"type": "Failed", "status": "False"}]}, ""),
        ("job", {"conditions": [{"type": "Failed", "status": "True"}]}, "failed"),
    ],
)
def test_the_end_of_a_gang_is_read_from_its_conditions(kind: str, status: dict[str, Any], state: str) -> None:
    assert gangtrigger.terminal(kind, {"status": status}) == state
