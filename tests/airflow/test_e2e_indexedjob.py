"""``podtrain_multinode`` end to end without a cluster, on the Indexed Job backend and on a user error: ``dag.test()``
runs the real DAG against the test Kubernetes API server (``kubeapi.py``: a client's Indexed Job run by the Job
controller of ``_kubejobs.py``, the headless Service of ``_kubeservices.py`` giving pod 0 its DNS name) and moto,
both on 127.0.0.1 (``e2e_support.py``), as ``test_e2e_multinode.py`` does for the JobSet backend.

* ``PODTRAIN_DAG_MULTINODE_BACKEND=indexed_job``, pod 1 preempted once it has trained: the Job's podFailurePolicy
  fails it at once (exit 75, FailJob), both pods stop and commit, the task fails as preempted and Airflow retries
  it (a new Job and Service, named for try 2), which resumes from the committed step and finishes; the run record
  has an entry per pod per try, the chargeback counts both tries, nothing is left in the cluster.
* the JobSet backend with a training command that cannot run (``--heads 3`` does not divide ``d_model`` 64:
  ``examples/train.py`` exits 1): the JobSet fails at once (FailJobSet), the task fails as ``TrainingFailed`` on
  its first try and is never retried.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_support import REPO, MotoS3Server, check_gang_resumed, deployment, free_port

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("airflow_db")]

INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME = "batch.kubernetes.io/job-name"
# e2e_support.deployment's TRAIN_COMMAND, with a model examples/train.py refuses (heads must divide d_model 64)
BAD_TRAIN_COMMAND = f"python {REPO / 'examples' / 'train.py'} --device cpu --threads 1 --log-every 10 --heads 3"


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    (found,) = [c for c in obj["status"].get("conditions") or [] if c["type"] == type_ and c["status"] == "True"]
    return found


def test_indexed_job_one_pod_preempted_the_job_fails_airflow_retries_it_resumes_and_is_charged(
    s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gang_ends: list[Any]
) -> None:
    from podtrain_airflow import run_id
    from podtrain_airflow.errors import PodPreempted

    settings = {
        "MULTINODE_BACKEND": "indexed_job",
        "NODES": "2",
        "PROCS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "POLL_SECONDS": "1",
    }
    with deployment(monkeypatch, s3, tmp_path, bucket="e2e-indexedjob", settings=settings) as dep:
        run = dep.run_preempting(
            "podtrain_multinode", pattern=r"checkpoint\.started", label_selector=f"podtrain-trial=train,{INDEX}=1"
        )
        dag, dag_run, states, seconds = run.dag, run.dag_run, run.states, run.seconds
        assert dag_run.state == "success", (states, gang_ends)
        assert states[("gpu_preflight", -1)] == ("success", 1)
        assert states[("train", -1)] == ("success", 2), "the failed Job was retried by Airflow, once"
        assert [(task, verdict.kind, type(exc)) for task, verdict, exc in gang_ends] == [
            ("gpu_preflight", "succeeded", type(None)),
            ("train", "preempted", PodPreempted),
            ("train", "succeeded", type(None)),
        ]

        # Two Jobs, one per try, each with its headless Service; the first failed by podtrain's podFailurePolicy.
        jobs = {j["metadata"]["name"]: j for j in dep.kube.jobs(deleted=True)}
        trains = sorted(name for name in jobs if name.startswith("train-"))
        assert [name[-3:] for name in trains] == ["-t1", "-t2"], sorted(jobs)
        first_job, second_job = jobs[trains[0]], jobs[trains[1]]
        failed = _condition(first_job, "Failed")
        assert failed["reason"] == "PodFailurePolicy"
        assert re.fullmatch(
            rf"Container base for pod default/{trains[0]}-[01]-[0-9a-z]{{5}} failed with exit code 75 "
            r"matching FailJob rule at index 1",
            failed["message"],
        ), failed["message"]
        assert _condition(second_job, "Complete")["reason"] == "CompletionsReached"
        services = {s["metadata"]["name"]: s for s in dep.kube.services(deleted=True)}
        assert set(trains) <= set(services) and services[trains[0]]["spec"]["clusterIP"] == "None"
        pods = [p for p in dep.kube.pods(deleted=True) if p["metadata"]["labels"].get(JOB_NAME) in trains]
        assert sorted((p["metadata"]["labels"][JOB_NAME][-2:], p["metadata"]["labels"][INDEX]) for p in pods) == [
            ("t1", "0"),
            ("t1", "1"),
            ("t2", "0"),
            ("t2", "1"),
        ], "no pod was replaced within a Job"
        assert not dep.kube.jobs() and not dep.kube.services() and not dep.kube.pods(), "all deleted at the end"

        record = dep.run_record(dag, dag_run)
        check_gang_resumed(record, (1, 2))

        reports = f"{dep.base_uri}/reports/{run_id(dag.dag_id, dag_run.run_id)}"
        (row,) = dep.read_json(f"{reports}/chargeback.json")["rows"]
        charged = round(sum(float(e["gpu_seconds"]) for e in record["attempts"]), 3)
        assert (row["attempts"], row["pods"], row["preemptions"], row["outcome"]) == (2, 2, 1, "succeeded")
        assert row["gpu_seconds"] == pytest.approx(charged, abs=0.004)
    print(f"podtrain_multinode on an Indexed Job end to end: {seconds:.1f} s")


def test_jobset_a_user_error_fails_the_jobset_at_once_and_the_task_without_a_retry(
    s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gang_ends: list[Any]
) -> None:
    from podtrain_airflow.errors import TrainingFailed

    settings = {
        "NODES": "2",
        "PROCS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "POLL_SECONDS": "1",
        "TRAIN_COMMAND": BAD_TRAIN_COMMAND,
    }
    with deployment(monkeypatch, s3, tmp_path, bucket="e2e-multinode-bug", settings=settings) as dep:
        dag = dep.dag("podtrain_multinode")
        started = time.monotonic()
        dag_run = dag.test(run_conf={"steps": 10, "checkpoint_every": 5})
        seconds = time.monotonic() - started

        states = {(ti.task_id, ti.map_index): (ti.state, ti.try_number) for ti in dag_run.get_task_instances()}
        assert dag_run.state == "failed", (states, gang_ends)
        assert states[("gpu_preflight", -1)] == ("success", 1)
        assert states[("train", -1)] == ("failed", 1), "a bug is never retried"
        assert [(task, verdict.kind) for task, verdict, _ in gang_ends] == [
            ("gpu_preflight", "succeeded"),
            ("train", "failed"),
        ], gang_ends
        train_exc = gang_ends[-1][2]
        assert isinstance(train_exc, TrainingFailed), repr(train_exc)

        (train,) = [js for js in dep.kube.jobsets(deleted=True) if js["metadata"]["name"].startswith("train-")]
        failed = _condition(train, "Failed")
        assert failed["reason"] == "FailJobSetFailurePolicyAction", failed
        assert train["status"]["restarts"] == 0, "a bug fails the JobSet without a restart"
        pods = [p for p in dep.kube.pods(deleted=True) if p["metadata"]["labels"].get("podtrain-trial") == "train"]
        codes = sorted(p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods)
        # a rank that failed first fails its Job, whose other pod is stopped (75) unless it had failed too (1)
        assert codes in ([1, 1], [1, 75]), codes
        assert not dep.kube.jobsets() and not dep.kube.pods(), "deleted at the end"
    print(f"podtrain_multinode with a user error: {seconds:.1f} s")
