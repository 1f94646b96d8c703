"""``podtrain_multinode`` end to end without a cluster: ``dag.test()`` runs the real DAG against the test Kubernetes
API server taught JobSets (``_kubejobsets.py``: the JobSet and Job controllers' pods, completion indexes, the
coordinator's DNS name resolving to 127.0.0.1, the failure policies, the restart-attempt label) and moto, both on
127.0.0.1 (``e2e_support.py``). Each pod runs ``podtrain run -- torchrun …`` from the training environment, so the
two pods form one gloo process group over 127.0.0.1 and train ``examples/train.py`` with DDP.

A preemption of pod 1 (DisruptionTarget, SIGTERM, the grace period) once it has trained: the gang stops at one step
and commits once, both pods exit 75, the JobSet restarts the whole gang without spending its restart budget (and
without an Airflow retry), the new gang resumes from the committed step and finishes; the run record has an entry
per pod per attempt and the chargeback sums all four.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_support import MotoS3Server, check_gang_resumed, deployment, free_port

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("airflow_db")]

JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
INDEX = "batch.kubernetes.io/job-completion-index"


def test_multinode_dag_one_pod_preempted_the_gang_restarts_in_the_cluster_resumes_and_is_charged(
    s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gang_ends: list[Any]
) -> None:
    from podtrain_airflow import run_id

    settings = {"NODES": "2", "PROCS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "POLL_SECONDS": "1"}
    with deployment(monkeypatch, s3, tmp_path, bucket="e2e-multinode", settings=settings) as dep:
        run = dep.run_preempting(
            "podtrain_multinode", pattern=r"checkpoint\.started", label_selector=f"podtrain-trial=train,{INDEX}=1"
        )
        dag, dag_run, states, seconds = run.dag, run.dag_run, run.states, run.seconds
        assert dag_run.state == "success", (states, gang_ends)
        assert states[("gpu_preflight", -1)] == ("success", 1)
        assert states[("train", -1)] == ("success", 1), "the JobSet restarted in the cluster: no Airflow retry"
        assert [(task, verdict.kind, exc) for task, verdict, exc in gang_ends] == [
            ("gpu_preflight", "succeeded", None),
            ("train", "succeeded", None),
        ]

        # The JobSet: restarted once, free (a preemption spends no restart budget), deleted at the end with its pods.
        jobsets = [js for js in dep.kube.jobsets(deleted=True) if js["metadata"]["name"].startswith("train-")]
        (train,) = jobsets
        assert train["status"]["restarts"] == 1
        assert int(train["status"].get("restartsCountTowardsMax") or 0) == 0
        assert not dep.kube.pods(), "the JobSets are deleted with their pods when their tasks end"

        record = dep.run_record(dag, dag_run)
        check_gang_resumed(record, (1000, 1001))
        assert max(int(e.get("steps_lost") or 0) for e in record["attempts"][:2]) <= 1, "at most a step lost"

        reports = f"{dep.base_uri}/reports/{run_id(dag.dag_id, dag_run.run_id)}"
        (row,) = dep.read_json(f"{reports}/chargeback.json")["rows"]
        charged = round(sum(float(e["gpu_seconds"]) for e in record["attempts"]), 3)
        assert (row["attempts"], row["pods"], row["preemptions"], row["outcome"]) == (2, 2, 1, "succeeded")
        assert row["gpu_seconds"] == pytest.approx(charged, abs=0.004)
    print(f"podtrain_multinode end to end: {seconds:.1f} s")
