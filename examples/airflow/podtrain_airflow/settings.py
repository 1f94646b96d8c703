"""What a deployment changes: the image, the bucket, the GPU pool, who pays. Read once, at DAG parse time, from
``PODTRAIN_DAG_*`` environment variables of the Airflow deployment (defaults in brackets below), so the DAG
files stay the same from a laptop to production."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from airflow.providers.cncf.kubernetes.secret import Secret

from podtrain_airflow.records import chargeback_report

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """The deployment's choices for every podtrain DAG (see README.md, "Settings")."""

    image: str = "registry.example.com/podtrain-example:0.1.0"
    train_command: tuple[str, ...] = ("python", "/app/train.py")
    base_uri: str = "s3://my-bucket/podtrain"
    dataset: str = "tiny"
    team: str = "ml-research"
    project: str = "podtrain-example"
    namespace: str = "default"
    service_account: str | None = None
    storage_secret: str | None = None  # a Secret whose keys become the pod's env (AWS_ACCESS_KEY_ID, ...)
    gpus: int = 1
    gpu_type: str = ""  # nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3; empty: any GPU node
    node_selector: Mapping[str, str] = field(default_factory=dict)
    cpu: str = "8"
    memory: str = "64Gi"
    grace_seconds: int = 30
    max_parallel_trials: int = 4
    pool: str | None = None
    retry_delay_seconds: int = 30  # between a preempted attempt and the next
    startup_check_seconds: int = 5  # how often the operator looks at a pod that has not started yet
    nodes: int = 2  # pods of a training task over several nodes (podtrain_multinode)
    procs_per_node: int = 0  # processes per pod; 0: one per GPU (one on a CPU pod)
    multinode_backend: str = "jobset"  # or "indexed_job", where the cluster has no JobSet controller
    max_restarts: int = 3  # JobSet restarts that are not preemptions (preemptions restart it free)
    master_port: int = 29500  # torchrun's rendezvous port on pod 0
    poll_seconds: int = 10  # how often a deferred multi-node task looks at its gang
    read_only_root: bool = False  # the container's root filesystem read-only; /output, /cache and /tmp writable

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings with every ``PODTRAIN_DAG_<FIELD>`` that is set (``NODE_SELECTOR``: ``k=v,k=v``)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, default in cls.__dataclass_fields__.items():
            raw = env.get(f"PODTRAIN_DAG_{name.upper()}")
            if raw is None:
                continue
            if name == "train_command":
                values[name] = tuple(shlex.split(raw))
            elif name == "node_selector":
                values[name] = dict(item.split("=", 1) for item in raw.split(",") if item)
            elif name in (
                "gpus",
                "grace_seconds",
                "max_parallel_trials",
                "retry_delay_seconds",
                "startup_check_seconds",
                "nodes",
                "procs_per_node",
                "max_restarts",
                "master_port",
                "poll_seconds",
            ):
                values[name] = int(raw)
            elif name == "read_only_root":
                if raw.strip().lower() not in ("1", "true", "yes", "0", "false", "no", ""):
                    raise ValueError(f"PODTRAIN_DAG_READ_ONLY_ROOT must be 1/true/yes or 0/false/no, not {raw!r}")
                values[name] = raw.strip().lower() in ("1", "true", "yes")
            else:
                values[name] = raw or None if default.default is None else raw
        return cls(**values)

    def pod(self) -> dict[str, Any]:
        """The arguments every pod of these DAGs shares, for ``pod_kwargs``/``podtrain_pod``."""
        return {
            "image": self.image,
            "base_uri": self.base_uri,
            "team": self.team,
            "project": self.project,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "secrets": [Secret("env", None, self.storage_secret)] if self.storage_secret else [],
            "gpus": self.gpus,
            "gpu_type": self.gpu_type,
            "node_selector": dict(self.node_selector),
            "grace_seconds": self.grace_seconds,
            "retry_delay": timedelta(seconds=self.retry_delay_seconds),
            "startup_check_interval_seconds": self.startup_check_seconds,
            "read_only_root": self.read_only_root,
        }

    def training_command(self) -> list[str]:
        """The training command with the DAGs' hyperparameters appended as flags, templated from ``params``."""
        flags = ("steps", "lr", "checkpoint_every")
        return [*self.train_command, *(x for f in flags for x in (f"--{f.replace('_', '-')}", f"{{{{ params.{f} }}}}"))]

    def report(self, dag_run: Any, trials: Sequence[str]) -> dict[str, Any]:
        """The chargeback report of ``trials`` in ``dag_run``, written under the base URI (see
        :func:`~podtrain_airflow.records.chargeback_report`)."""
        return chargeback_report(
            dag_run.dag_id, dag_run.run_id, trials, base_uri=self.base_uri, team=self.team, project=self.project
        )

    def gang(self) -> dict[str, Any]:
        """The arguments a multi-node task adds, for ``multinode_pod``/``multinode_preflight``."""
        return {
            "nodes": self.nodes,
            "procs_per_node": self.procs_per_node or max(self.gpus, 1),
            "backend": self.multinode_backend,
            "master_port": self.master_port,
            "poll_interval": float(self.poll_seconds),
        }
