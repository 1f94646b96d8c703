"""The DAG template end to end without a cluster: ``dag.test()`` runs the real DAGs from the DAGs folder against the
test Kubernetes API server (``kubeapi.py``: each pod a local process) and an S3 server (moto), both on
127.0.0.1 (``e2e_support.py``). The pods run the image's entrypoint, ``podtrain run --``, from the training
environment (``.venv``), with the bucket's credentials from the storage Secret; they train ``examples/train.py``
on the CPU.

* ``podtrain_train``: the preflight pod (``tini -g -- podtrain smoke --allow-cpu``: smoke's own termination
  message), then the training pod, preempted as a kubelet does it (DisruptionTarget, SIGTERM, the grace period)
  once it committed a checkpoint; podtrain exits 75, the classifier says preempted, Airflow retries the task, the
  second pod resumes from that checkpoint, finishes, exports and pushes; the run record in the bucket has both
  attempts, and the chargeback report (JSON and CSV) sums both attempts' GPU-seconds.
* ``podtrain_sweep``: two trials, one of which fails with a user error (exit 1): it is not retried, the other
  succeeds, the best-trial report names it, and the DAG run fails.
* a failing preflight (``nvidia-smi`` failing; ``podtrain smoke`` failing) stops the DAG before training, not
  retried, with smoke's cause and the likely causes in the error.

Measured on 2 cores: ``podtrain_train`` 45-55 s, ``podtrain_sweep`` 33-42 s, each failing preflight 4-6 s, plus
about 20 s once (``airflow db migrate``, the S3 server, the dataset): about 2 minutes in all.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_support import MotoS3Server, deployment, task_states

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("airflow_db")]


@pytest.fixture
def verdicts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, Any, BaseException | None]]:
    """Every pod task's end as ``cleanup()`` decided it: ``(task_id, map_index, verdict, exception raised)``."""
    from podtrain_airflow import PodtrainPodOperator

    seen: list[tuple[str, int, Any, BaseException | None]] = []
    original = PodtrainPodOperator.cleanup

    def cleanup(self: Any, *args: Any, **kwargs: Any) -> None:
        context = kwargs.get("context")
        index = getattr(context["ti"] if context else None, "map_index", -1)
        try:
            original(self, *args, **kwargs)
        except BaseException as exc:
            seen.append((self.task_id, index, self.verdict, exc))
            raise
        seen.append((self.task_id, index, self.verdict, None))

    monkeypatch.setattr(PodtrainPodOperator, "cleanup", cleanup)
    return seen


def test_train_dag_preempted_retried_resumed_and_charged(
    s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verdicts: list[Any]
) -> None:
    """podtrain_train end to end: preflight, training preempted once after a checkpoint, retried by Airflow,
    resumed from that checkpoint, finished and pushed; run record with both attempts; chargeback JSON and CSV."""
    from podtrain_airflow import run_id

    with deployment(monkeypatch, s3, tmp_path, bucket="e2e-train") as dep:
        run = dep.run_preempting("podtrain_train")
        dag, dag_run, states, seconds = run.dag, run.dag_run, run.states, run.seconds
        pods = dep.kube.pods()

        assert dag_run.state == "success", (states, verdicts)
        assert states[("gpu_preflight", -1)] == ("success", 1)
        assert states[("train", -1)] == ("success", 2)
        assert states[("report", -1)][0] == "success" and states[("all_succeeded", -1)][0] == "success"

        # What the classifier saw: the preflight's smoke message, a preemption, a success.
        ends = [(task, verdict.kind, exc) for task, _, verdict, exc in verdicts]
        assert [(t, k) for t, k, _ in ends] == [
            ("gpu_preflight", "succeeded"),
            ("train", "preempted"),
            ("train", "succeeded"),
        ]
        assert "the GPU preflight passed: smoke passed" in verdicts[0][2].message
        assert type(ends[1][2]).__name__ == "PodPreempted" and "resumes from step" in str(ends[1][2])
        assert not pods, "every pod is deleted when its task is done"

        rid = run_id(dag.dag_id, dag_run.run_id, "train")
        record = dep.read_json(f"{dep.base_uri}/artifacts/{rid}/run.json")
        first, second = record["attempts"]
        assert (first["attempt"], first["outcome"], first["exit_code"]) == (1, "preempted", 75)
        assert (second["attempt"], second["outcome"], second["exit_code"]) == (2, "succeeded", 0)
        assert first["checkpoint_step"] and second["resumed_from"] == first["checkpoint_step"]
        assert second["last_step"] == 40
        assert first["gpu_seconds"] > 0 and second["gpu_seconds"] > 0
        assert dep.fs().exists(f"{dep.base_uri}/artifacts/{rid}/export/model.safetensors".removeprefix("s3://"))

        reports = f"{dep.base_uri}/reports/{run_id(dag.dag_id, dag_run.run_id)}"
        report = dep.read_json(f"{reports}/chargeback.json")
        (row,) = report["rows"]
        charged = round(first["gpu_seconds"] + second["gpu_seconds"], 3)
        assert (row["trial"], row["attempts"], row["preemptions"], row["outcome"]) == ("train", 2, 1, "succeeded")
        assert row["gpu_seconds"] == pytest.approx(charged, abs=0.002)
        assert report["by_team"]["ml-research"] == pytest.approx(charged, abs=0.002)
        (line,) = csv.DictReader(io.StringIO(dep.read_text(f"{reports}/chargeback.csv")))
        assert (line["run_id"], line["attempts"], line["preemptions"]) == (rid, "2", "1")
        assert float(line["gpu_seconds"]) == pytest.approx(charged, abs=0.002)
    print(f"podtrain_train end to end: {seconds:.1f} s")


def test_sweep_user_error_is_not_retried_and_best_trial_is_reported(
    s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verdicts: list[Any]
) -> None:
    """podtrain_sweep end to end: a trial that fails with a user error (exit 1) is tried once, the other trial
    succeeds and is reported best, and the DAG run fails."""
    from podtrain_airflow import run_id

    with deployment(monkeypatch, s3, tmp_path, bucket="e2e-sweep") as dep:
        dag = dep.dag("podtrain_sweep")
        started = time.monotonic()
        # heads=3 does not divide d_model=64: train.py stops with an error, exit 1.
        dag_run = dag.test(run_conf={"steps": 20, "checkpoint_every": 10, "trials": [{"lr": 0.003}, {"heads": 3}]})
        seconds = time.monotonic() - started

        states = task_states(dag_run)
        assert dag_run.state == "failed", states
        assert states[("trial", 0)] == ("success", 1)
        assert states[("trial", 1)] == ("failed", 1), "a user error is not retried"
        assert states[("best", -1)][0] == "success" and states[("report", -1)][0] == "success"
        assert states[("all_succeeded", -1)][0] == "upstream_failed"
        failed = [(v.kind, exc) for task, index, v, exc in verdicts if task == "trial" and index == 1]
        assert len(failed) == 1 and failed[0][0] == "failed"
        assert type(failed[0][1]).__name__ == "TrainingFailed" and "not retried" in str(failed[0][1])

        ids = {t: run_id(dag.dag_id, dag_run.run_id, t) for t in ("t000", "t001")}
        bad = dep.read_json(f"{dep.base_uri}/artifacts/{ids['t001']}/run.json")["attempts"]
        assert [(a["attempt"], a["outcome"], a["exit_code"]) for a in bad] == [(1, "failed", 1)]
        reports = f"{dep.base_uri}/reports/{run_id(dag.dag_id, dag_run.run_id)}"
        best = dep.read_json(f"{reports}/best_trial.json")
        assert best["best"]["trial"] == "t000" and best["best"]["run_id"] == ids["t000"]
        assert isinstance(best["best"]["loss"], float)
        assert {t["trial"]: t["outcome"] for t in best["trials"]} == {"t000": "succeeded", "t001": "failed"}
        report = dep.read_json(f"{reports}/chargeback.json")
        assert {r["trial"]: r["attempts"] for r in report["rows"]} == {"t000": 1, "t001": 1}
    print(f"podtrain_sweep end to end: {seconds:.1f} s")


@pytest.mark.parametrize(
    "case",
    [
        (9, "nvidia-smi failed or is missing"),
        (0, "podtrain smoke failed (torch_cpu)"),
    ],
    ids=["nvidia-smi-fails", "smoke-fails"],
)
def test_failing_preflight_stops_the_dag_with_the_likely_cause(
    s3: MotoS3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    verdicts: list[Any],
    case: tuple[int, str],
) -> None:
    """A GPU pod whose preflight fails (nvidia-smi exits 9; smoke finds a CPU torch) fails the DAG before any
    training, is not retried, and the error gives smoke's cause and the likely causes."""
    nvidia_smi_exit, expected = case
    with deployment(
        monkeypatch,
        s3,
        tmp_path,
        bucket=f"e2e-preflight-{nvidia_smi_exit}",
        settings={"GPUS": "1"},
        nvidia_smi_exit=nvidia_smi_exit,
    ) as dep:
        dag_run = dep.dag("podtrain_train").test()

        states = task_states(dag_run)
        assert dag_run.state == "failed", states
        assert states[("gpu_preflight", -1)] == ("failed", 1)
        assert states[("train", -1)][0] == "upstream_failed"
        ((task, _, verdict, exc),) = verdicts
        assert task == "gpu_preflight" and verdict.kind == "preflight_failed"
        assert type(exc).__name__ == "PreflightFailed"
        assert expected in str(exc), str(exc)
        assert "device plugin" in str(exc) and "wrong pool" in str(exc)  # the preflight's hint
        if nvidia_smi_exit:
            assert "could not communicate with the NVIDIA driver" in str(exc)  # the log tail
        else:
            assert verdict.termination["outcome"] == "smoke_failed"
