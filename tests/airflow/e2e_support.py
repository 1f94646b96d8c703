"""What the end-to-end DAG tests run against, all on 127.0.0.1: an S3 server (moto), the test Kubernetes API
server (``kubeapi.py``) whose pods run podtrain from the training environment, and the DAG parsed with a
deployment's settings pointing at both.

The training side (torch, podtrain, moto) lives in ``.venv`` (``make venv``), never in Airflow's environment: the
S3 server and every pod run with ``.venv``'s Python; this process only speaks HTTP to them (s3fs, the
``kubernetes`` client). Without ``.venv`` the end-to-end tests are skipped with that reason.

* :func:`free_port` — a free TCP port of 127.0.0.1 (a gang's torchrun master port).
* :class:`TrainingS3Server` — ``tests/servers.py``'s moto server, started with ``.venv``'s Python.
* :func:`stub_bin` — a folder for the pods' ``PATH`` with ``tini`` (runs what follows ``--``, as ``tini -g``
  does once the server gives every pod its own process group) and a ``nvidia-smi`` that prints a GPU table or
  fails with the given exit code: there is no GPU here.
* :func:`upload_dataset` — ``examples/dataset.py``'s shards, made by ``.venv`` and put in the bucket.
* :class:`Deployment` — a :class:`~kubeapi.KubeAPIServer` whose image ``podtrain:test`` is ``podtrain run --``,
  the storage Secret, the ``kubernetes_default`` connection, ``PODTRAIN_DAG_*`` and the DAG parsed from the DAGs
  folder with them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubeapi import KubeAPIServer

__all__ = [
    "IMAGE",
    "REPO",
    "Deployment",
    "MotoS3Server",
    "PreemptedRun",
    "TrainingS3Server",
    "check_gang_resumed",
    "deployment",
    "free_port",
    "stub_bin",
    "task_states",
    "training_env_missing",
    "upload_dataset",
]

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "examples" / "airflow"
TRAINING_VENV = Path(os.environ.get("PODTRAIN_TRAINING_VENV", REPO / ".venv"))
TRAINING_PYTHON = TRAINING_VENV / "bin" / "python"
IMAGE = "podtrain:test"
STORAGE_SECRET = "podtrain-s3"

if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from tests.servers import MotoS3Server, free_port  # noqa: E402  (standard library only)


def training_env_missing() -> str:
    """Why the end-to-end tests cannot run here, or ``""`` when they can."""
    if not TRAINING_PYTHON.exists():
        return f"the training environment {TRAINING_VENV} is missing (make venv): pods run podtrain from it"
    probe = subprocess.run(
        [str(TRAINING_PYTHON), "-c", "import torch, moto, entrypoint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        return f"{TRAINING_PYTHON} cannot import torch, moto and podtrain: {probe.stderr.strip()[-300:]}"
    return ""


class TrainingS3Server(MotoS3Server):
    """moto's S3 server run by the training environment's Python (moto is not in Airflow's environment)."""

    def command(self) -> list[str]:
        return [str(TRAINING_PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


def stub_bin(folder: Path, *, nvidia_smi_exit: int = 0) -> Path:
    """``folder`` with ``tini`` and ``nvidia-smi`` stand-ins, for the front of the pods' ``PATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    tini = folder / "tini"
    tini.write_text('#!/bin/sh\nwhile [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    smi = folder / "nvidia-smi"
    if nvidia_smi_exit:
        smi.write_text(
            "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\n"
            f"exit {int(nvidia_smi_exit)}\n"
        )
    else:
        smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 580.00  Driver Version: 580.00  CUDA Version: 13.0 |'\n")
    for path in (tini, smi):
        path.chmod(0o755)
    return folder


def s3fs_for(s3: MotoS3Server) -> Any:
    """An s3fs file system on ``s3`` (a fresh instance, not fsspec's cached one)."""
    import s3fs

    env = s3.env()
    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3.endpoint,
        client_kwargs={"region_name": s3.region},
        skip_instance_cache=True,
    )


def upload_dataset(s3: MotoS3Server, url: str, work: Path, *, mib: float = 0.25) -> None:
    """``examples/dataset.py``'s shards (seed 0) at ``url`` (``s3://bucket/prefix``)."""
    local = work / "dataset"
    subprocess.run(
        [str(TRAINING_PYTHON), str(REPO / "examples" / "dataset.py"), "--out", str(local), "--mib", str(mib)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fs = s3fs_for(s3)
    for shard in sorted(local.iterdir()):
        fs.put_file(str(shard), f"{url.removeprefix('s3://')}/{shard.name}")


def task_states(dag_run: Any) -> dict[tuple[str, int], tuple[str, int]]:
    """``(task_id, map_index) -> (state, try_number)`` of every task instance of ``dag_run``."""
    return {(ti.task_id, ti.map_index): (ti.state, ti.try_number) for ti in dag_run.get_task_instances()}


@dataclasses.dataclass(frozen=True)
class PreemptedRun:
    """A DAG run during which one pod was preempted: the DAG, its run, the task states and the run's seconds."""

    dag: Any
    dag_run: Any
    states: dict[tuple[str, int], tuple[str, int]]
    seconds: float


def check_gang_resumed(record: Any, attempts: tuple[int, int], steps: int = 40) -> None:
    """A two-pod gang's run record: both pods of the first attempt exited 75 (the one never signalled stopped with
    the gang), both of the second succeeded, resuming from the first's committed step, to ``steps``."""
    entries = [(e["attempt"], e.get("pod"), e["outcome"], e["exit_code"]) for e in record["attempts"]]
    first_try, second_try = attempts
    assert entries == [
        (first_try, 0, "preempted", 75),
        (first_try, 1, "preempted", 75),
        (second_try, 0, "succeeded", 0),
        (second_try, 1, "succeeded", 0),
    ], "both pods of the first attempt exit 75, both of the second succeed"
    first, second = record["attempts"][0], record["attempts"][2]
    assert first["checkpoint_step"] and second["resumed_from"] == first["checkpoint_step"]
    assert second["last_step"] == steps


class Deployment:
    """One deployment of the DAG template: the API server, the connection and ``PODTRAIN_DAG_*`` in the
    environment (set through ``monkeypatch``), and DAGs parsed with them."""

    def __init__(self, kube: KubeAPIServer, s3: MotoS3Server, base_uri: str) -> None:
        self.kube, self.s3, self.base_uri = kube, s3, base_uri

    def dag(self, dag_id: str) -> Any:
        """``dag_id`` parsed now from the DAGs folder (a DagBag reads the settings afresh)."""
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(DAGS), bundle_path=DAGS)
        assert not bag.import_errors, bag.import_errors
        return bag.dags[dag_id]

    def run_preempting(
        self,
        dag_id: str,
        run_conf: Mapping[str, Any] | None = None,
        *,
        pattern: str = "checkpoint.committed",
        label_selector: str = "task_id=train",
    ) -> PreemptedRun:
        """``dag_id`` run by ``dag.test()`` (``run_conf`` default: 40 steps, a checkpoint every 10) while the first
        pod matching ``label_selector`` (default: the training task's) is preempted once its log matches
        ``pattern`` (default: a committed checkpoint); fails unless exactly that one preemption happened."""
        run_conf = {"steps": 40, "checkpoint_every": 10} if run_conf is None else run_conf
        preempter = self.kube.preempt_when(pattern, label_selector=label_selector, count=1)
        dag = self.dag(dag_id)
        started = time.monotonic()
        dag_run = dag.test(run_conf=dict(run_conf))
        seconds = time.monotonic() - started
        preempter.join(timeout=30)
        assert preempter.error is None and len(preempter.preempted) == 1, preempter.error
        return PreemptedRun(dag, dag_run, task_states(dag_run), seconds)

    def run_record(self, dag: Any, dag_run: Any, trial: str = "train") -> Any:
        """The run record (``run.json``) of ``trial`` in ``dag_run``, from the bucket."""
        from podtrain_airflow import run_id

        return self.read_json(f"{self.base_uri}/artifacts/{run_id(dag.dag_id, dag_run.run_id, trial)}/run.json")

    def fs(self) -> Any:
        return s3fs_for(self.s3)

    def read_json(self, url: str) -> Any:
        return json.loads(self.fs().cat_file(url.removeprefix("s3://")))

    def read_text(self, url: str) -> str:
        return bytes(self.fs().cat_file(url.removeprefix("s3://"))).decode()


@contextmanager
def deployment(
    monkeypatch: Any,
    s3: MotoS3Server,
    work: Path,
    *,
    bucket: str,
    settings: Mapping[str, str] | None = None,
    nvidia_smi_exit: int = 0,
    runtime: Any = None,
) -> Iterator[Deployment]:
    """The template deployed against ``s3`` (a fresh bucket) and a fresh API server: pods run ``podtrain run --``
    from the training environment, get the bucket's credentials from the storage Secret and see one GPU
    (``NVIDIA_VISIBLE_DEVICES=0``, so GPU-seconds count their wall time) though they train on the CPU.

    With a container ``runtime`` (``_kubepodman.Podman`` mapping ``podtrain:test`` to a built image) the pods run
    in that image instead: its ENTRYPOINT, its ``/app/train.py``, the stub ``nvidia-smi`` injected."""
    import s3fs

    # The report tasks read the bucket through fsspec's cached file systems, keyed by their options (the endpoint
    # comes from the environment): one cached for another module's S3 server would point at a closed port.
    s3fs.S3FileSystem.clear_instance_cache()
    s3.create_bucket(bucket)
    base_uri = f"s3://{bucket}/podtrain"
    upload_dataset(s3, f"{base_uri}/datasets/tiny", work)
    stubs = stub_bin(work / "bin", nvidia_smi_exit=nvidia_smi_exit)
    path = os.pathsep.join([str(stubs), str(TRAINING_VENV / "bin"), os.environ.get("PATH", "/usr/bin:/bin")])
    script = REPO / "examples" / "train.py"
    if runtime is not None:
        runtime = dataclasses.replace(
            runtime,
            env={"NVIDIA_VISIBLE_DEVICES": "0", **runtime.env},
            inject={"/usr/local/bin/nvidia-smi": str(stubs / "nvidia-smi"), **runtime.inject},
        )
        script = Path("/app/train.py")  # docker/Dockerfile.example's
    kube = KubeAPIServer(
        images={IMAGE: [str(TRAINING_PYTHON), "-m", "entrypoint", "run", "--"]},
        extra_env={
            "PATH": path,
            "PYTHONPATH": str(REPO),
            "NVIDIA_VISIBLE_DEVICES": "0",
        },
        directory=work / "kube",
        runtime=runtime,
    )
    with kube:
        kube.add_secret("default", STORAGE_SECRET, s3.env())
        kubeconfig = kube.write_kubeconfig(work / "kubeconfig")
        connection = {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig), "in_cluster": False}}
        monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(connection))
        for key, value in s3.env().items():  # the report tasks run here and read the bucket with s3fs
            monkeypatch.setenv(key, value)
        values = {
            "IMAGE": IMAGE,
            "BASE_URI": base_uri,
            "STORAGE_SECRET": STORAGE_SECRET,
            "GPUS": "0",
            "CPU": "1",
            "MEMORY": "2Gi",
            "TRAIN_COMMAND": f"python {script} --device cpu --threads 1 --log-every 10",
            "RETRY_DELAY_SECONDS": "0",
            "STARTUP_CHECK_SECONDS": "1",
            "GRACE_SECONDS": "20",
            **dict(settings or {}),
        }
        for key, value in values.items():
            monkeypatch.setenv(f"PODTRAIN_DAG_{key}", value)
        yield Deployment(kube, s3, base_uri)
