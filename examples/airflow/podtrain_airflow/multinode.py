"""A training task over several pods: the operators that run the training pod once per node as one gang (a JobSet,
or an Indexed Job where the cluster has no JobSet controller), wait for it without holding a worker slot, show pod
0's log, judge the gang as one and clean up; and the factories that build them.

Both operators build their pod exactly as :class:`~podtrain_airflow.operator.PodtrainPodOperator` does (the env
contract, the labels, every setting of :func:`~podtrain_airflow.operator.pod_kwargs`), so a DAG moves a task from one
pod to several by changing its factory. The gang is named for the task, the DAG run and the try
(:meth:`GangOperator.gang_name`), so a retry never meets the gang of the try before.

**Who retries.** A JobSet restarts in the cluster: a preemption restarts the gang without spending its
``max_restarts`` or the task's retries, a bug fails it at once, storage trouble restarts it within
``max_restarts`` (:mod:`podtrain_airflow.jobset`); the task then retries only a JobSet that spent its budget on a
retryable cause. An Indexed Job fails on any pod failure, and the task's retry policy retries the whole gang on a
preemption only (:mod:`podtrain_airflow.indexedjob`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from kubernetes.client import ApiClient
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from podtrain_airflow import indexedjob, jobset
from podtrain_airflow.classify import Verdict, classify
from podtrain_airflow.errors import KubernetesUnavailable, error_for
from podtrain_airflow.gang import COMPLETION_INDEX, gang_verdict
from podtrain_airflow.gangpod import MASTER_PORT
from podtrain_airflow.gangtrigger import GangTrigger, pod_selector
from podtrain_airflow.naming import dns_label
from podtrain_airflow.operator import PodtrainPodOperator, pod_kwargs, preflight_kwargs

__all__ = [
    "GangOperator",
    "PodtrainIndexedJobOperator",
    "PodtrainJobSetOperator",
    "multinode_pod",
    "multinode_preflight",
]

_TRANSIENT_API = {429, 500, 502, 503, 504}


class GangOperator(PodtrainPodOperator):
    """The training pod on ``nodes`` pods of ``procs_per_node`` processes each, as one gang; subclasses say which
    objects make the gang (:meth:`create`, :meth:`delete`) and which of its pods ran last (:meth:`final_pods`).

    ``deferrable`` (default): the task defers to :class:`~podtrain_airflow.gangtrigger.GangTrigger` once the gang
    is created; otherwise it follows the gang in the worker. ``on_finish_action``: ``delete_pod`` deletes the gang
    with its pods when it ends (or the task is killed), ``delete_succeeded_pod`` only when it succeeded,
    ``keep_pod`` never. ``log_lines``: how many of pod 0's last log lines go to the task log (``None``: all)."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        *,
        nodes: int,
        procs_per_node: int = 1,
        master_port: int = MASTER_PORT,
        torchrun: bool = True,
        poll_interval: float = 10.0,
        log_lines: int | None = 2000,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("deferrable", True)
        super().__init__(**kwargs)
        if not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes must be a whole number >= 1, not {nodes!r}")
        if not isinstance(procs_per_node, int) or procs_per_node < 1:
            raise ValueError(f"procs_per_node must be a whole number >= 1, not {procs_per_node!r}")
        self.nodes, self.procs_per_node, self.master_port = nodes, procs_per_node, master_port
        self.torchrun, self.poll_interval, self.log_lines = torchrun, poll_interval, log_lines
        self.gang = ""
        self.gang_namespace = self.namespace or "default"  # the pod's, once built (the connection's default)

    # ------------------------------------------------------------------ what a subclass says

    def bodies(self, pod: dict[str, Any], name: str) -> list[dict[str, Any]]:
        """The objects that make the gang ``name`` of ``pod`` (serialized), in the order they are created."""
        raise NotImplementedError

    def create(self, pod: dict[str, Any], name: str) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def final_pods(self, name: str, obj: Mapping[str, Any] | None) -> list[k8s.V1Pod]:
        """The pods of the gang's last attempt (``obj``: the gang's object as it ended, when known)."""
        return self._pods(name)

    # ------------------------------------------------------------------ the task

    def gang_name(self, context: Mapping[str, Any]) -> str:
        """The gang's name: the task id, 8 hex digits of the run id, and the try (``train-1a2b3c4d-t2``)."""
        digest = hashlib.sha256(self.podtrain_run_id(context).encode()).hexdigest()[:8]
        return dns_label(self.task_id[:24], digest, f"t{context['ti'].try_number}")

    def execute(self, context: Any) -> Any:
        name = self.gang_name(context)
        self.gang = name
        pod = dict(ApiClient().sanitize_for_serialization(self.build_pod_request_obj(context)))
        self.gang_namespace = (pod.get("metadata") or {}).get("namespace") or self.gang_namespace
        try:
            self.create(pod, name)
        except ApiException as exc:
            if exc.status == 409:
                self.log.warning("%s %s already exists: following it", self.kind, name)
            elif exc.status in _TRANSIENT_API:
                raise KubernetesUnavailable(f"the Kubernetes API answered {exc.status} {exc.reason}") from exc
            else:
                raise
        except HTTPError as exc:
            raise KubernetesUnavailable(f"the Kubernetes API could not be reached: {exc}") from exc
        self.log.info(
            "%s %s/%s created: %d pods of %d processes",
            self.kind,
            self.namespace,
            name,
            self.nodes,
            self.procs_per_node,
        )
        trigger = self.trigger(name)
        if self.deferrable:
            self.defer(trigger=trigger, method_name="gang_finished")
        return self.gang_finished(context, asyncio.run(trigger.follow()))

    def trigger(self, name: str) -> GangTrigger:
        return GangTrigger(
            kind=self.kind,
            name=name,
            namespace=self.gang_namespace,
            kubernetes_conn_id=self.kubernetes_conn_id,
            config_file=self.config_file,
            in_cluster=self.in_cluster,
            cluster_context=self.cluster_context,
            poll_interval=self.poll_interval,
            schedule_timeout=float(self.schedule_timeout_seconds or 1800),
            grace_seconds=int(self.termination_grace_period or 30),
            on_kill_action="keep_pod" if self.on_finish_action.value == "keep_pod" else "delete_pod",
        )

    def gang_finished(self, context: Any, event: Mapping[str, Any]) -> dict[str, Any]:
        """The trigger's event: judge the gang, show pod 0's log, clean up, and succeed or raise the verdict's
        exception (:func:`~podtrain_airflow.errors.error_for`)."""
        name = str(event.get("name") or self.gang)
        self.gang = name
        self.gang_namespace = str(event.get("namespace") or self.gang_namespace)
        verdict, culprit = Verdict("vanished", "the gang's end was not seen"), ""
        try:
            verdict, culprit, restarts = self._judge(name, event)
        finally:
            self._finish(name, verdict.succeeded)
        self.verdict = verdict
        self.log.info("%s %s: %s (%s)", self.kind, name, verdict.kind, verdict.message)
        if verdict.succeeded:
            return {"name": name, "kind": self.kind, "nodes": self.nodes, "restarts": restarts}
        raise error_for(verdict, pod_name=culprit, hint=self.failure_hint)

    def on_kill(self) -> None:
        """The task was stopped while it followed the gang in the worker: delete the gang (unless ``keep_pod``)."""
        self._killed = True
        if self.gang and self.on_finish_action.value != "keep_pod":
            self.log.info("deleting %s %s: the task was stopped", self.kind, self.gang)
            self._delete_quietly(self.gang)

    # ------------------------------------------------------------------ the parts

    def _judge(self, name: str, event: Mapping[str, Any]) -> tuple[Verdict, str, int]:
        status = event.get("status")
        obj = event.get("object")
        restarts = int(((obj or {}).get("status") or {}).get("restarts") or 0)
        if status == "api_error":
            raise KubernetesUnavailable(f"following {self.kind} {name}: {event.get('message', '')}")
        if status == "gone":
            return Verdict("vanished", f"the {self.kind} {name} was deleted before it ended"), "", restarts
        if status == "unschedulable":
            pod_name = str(event.get("pod", ""))
            pod = self._read_pod(pod_name)
            return classify(pod, self.base_container_name, gpu_request=self.gpu_request), pod_name, restarts
        pods = self.final_pods(name, obj)
        self._show_log(pods)
        judged = gang_verdict(
            pods,
            nodes=self.nodes,
            container=self.base_container_name,
            gpu_request=self.gpu_request,
            preflight=self.preflight,
        )
        for pod_name, each in judged.pods.items():
            self.log.info("pod %s: %s (%s)", pod_name, each.kind, each.message)
        ended = ((obj or {}).get("status") or {}).get("conditions") or []
        if not judged.verdict.succeeded and status == "finished" and _condition(ended, "Completed", "Complete"):
            # the gang completed (the object says so) though its pods are gone: trust the controller
            return Verdict("succeeded", f"the {self.kind} completed", exit_code=0), "", restarts
        return judged.verdict, judged.pod, restarts

    def _pods(self, name: str) -> list[k8s.V1Pod]:
        listed = self.client.list_namespaced_pod(self.gang_namespace, label_selector=pod_selector(self.kind, name))
        return list(listed.items)

    def _read_pod(self, name: str) -> k8s.V1Pod | None:
        try:
            return self.client.read_namespaced_pod(name, self.gang_namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _show_log(self, pods: Sequence[k8s.V1Pod]) -> None:
        if not self.get_logs:
            return
        first = [p for p in pods if (p.metadata.labels or {}).get(COMPLETION_INDEX) == "0"]
        if not first:
            self.log.info("no pod 0 left to show the log of")
            return
        pod = first[0]
        try:
            response = self.client.read_namespaced_pod_log(
                pod.metadata.name,
                pod.metadata.namespace,
                container=self.base_container_name,
                tail_lines=self.log_lines,
                _preload_content=False,  # the bytes as they are: the client would give str(bytes) for them
            )
            text = response.data.decode("utf-8", errors="replace")
        except ApiException as exc:
            self.log.warning("could not read pod %s's log: %s %s", pod.metadata.name, exc.status, exc.reason)
            return
        self.log.info("pod 0 (%s), the last %s lines of its log:", pod.metadata.name, self.log_lines or "all")
        for line in text.splitlines():
            self.log.info("[pod 0] %s", line)

    def _finish(self, name: str, succeeded: bool) -> None:
        action = self.on_finish_action.value
        if action == "delete_pod" or (action == "delete_succeeded_pod" and succeeded):
            self._delete_quietly(name)

    def _delete_quietly(self, name: str) -> None:
        try:
            self.delete(name)
        except ApiException as exc:
            if exc.status != 404:
                self.log.warning("could not delete %s %s: %s %s", self.kind, name, exc.status, exc.reason)
        except HTTPError as exc:
            self.log.warning("could not delete %s %s: %s", self.kind, name, exc)


class PodtrainJobSetOperator(GangOperator):
    """The gang as a JobSet (:mod:`podtrain_airflow.jobset`), restarted in the cluster; ``max_restarts`` counts the
    restarts that are not preemptions."""

    kind = "jobset"

    def __init__(self, *, max_restarts: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_restarts = max_restarts

    def bodies(self, pod: dict[str, Any], name: str) -> list[dict[str, Any]]:
        return [
            jobset.jobset_body(
                pod,
                name=name,
                nodes=self.nodes,
                procs_per_node=self.procs_per_node,
                max_restarts=self.max_restarts,
                port=self.master_port,
                torchrun=self.torchrun,
            )
        ]

    def create(self, pod: dict[str, Any], name: str) -> None:
        (body,) = self.bodies(pod, name)
        self.hook.create_custom_object(jobset.GROUP, jobset.VERSION, jobset.PLURAL, body, self.gang_namespace)

    def delete(self, name: str) -> None:
        self.hook.delete_custom_object(
            jobset.GROUP,
            jobset.VERSION,
            jobset.PLURAL,
            name,
            self.gang_namespace,
            body=k8s.V1DeleteOptions(propagation_policy="Foreground"),
        )

    def final_pods(self, name: str, obj: Mapping[str, Any] | None) -> list[k8s.V1Pod]:
        restarts = str(((obj or {}).get("status") or {}).get("restarts") or 0)
        pods = self._pods(name)
        return [p for p in pods if (p.metadata.labels or {}).get(jobset.RESTART_LABEL, "0") == restarts]


class PodtrainIndexedJobOperator(GangOperator):
    """The gang as an Indexed Job and its headless Service (:mod:`podtrain_airflow.indexedjob`): no restart in the
    cluster, Airflow retries the whole gang on a preemption only."""

    kind = "job"

    def bodies(self, pod: dict[str, Any], name: str) -> list[dict[str, Any]]:
        """The headless Service, then the Job."""
        job = indexedjob.indexed_job_body(
            pod,
            name=name,
            nodes=self.nodes,
            procs_per_node=self.procs_per_node,
            port=self.master_port,
            torchrun=self.torchrun,
        )
        return [indexedjob.service_body(pod, name=name, port=self.master_port), job]

    def create(self, pod: dict[str, Any], name: str) -> None:
        namespace = self.gang_namespace
        service, job = self.bodies(pod, name)
        try:
            self.client.create_namespaced_service(namespace, service)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.hook.batch_v1_client.create_namespaced_job(namespace, job)

    def delete(self, name: str) -> None:
        namespace = self.gang_namespace
        options = k8s.V1DeleteOptions(propagation_policy="Foreground")
        try:
            self.hook.batch_v1_client.delete_namespaced_job(name, namespace, body=options)
        finally:
            self.client.delete_namespaced_service(name, namespace)


_OPERATORS: dict[str, type[GangOperator]] = {
    "jobset": PodtrainJobSetOperator,
    "indexed_job": PodtrainIndexedJobOperator,
}


def multinode_pod(
    task_id: str,
    *,
    nodes: int,
    procs_per_node: int | None = None,
    backend: str = "jobset",
    max_restarts: int = 3,
    master_port: int = MASTER_PORT,
    poll_interval: float = 10.0,
    torchrun: bool = True,
    **kwargs: Any,
) -> GangOperator:
    """The training task ``task_id`` on ``nodes`` pods, each the pod :func:`~podtrain_airflow.operator.pod_kwargs`
    builds from ``kwargs`` (``command`` is the training script and its arguments: ``torchrun`` is put before it),
    ``procs_per_node`` processes per pod (default: its GPUs, or 1). ``backend``: ``"jobset"`` (restarted in the
    cluster) or ``"indexed_job"`` (for clusters without the JobSet controller); ``torchrun=False`` runs the command
    as it is on every pod."""
    if backend not in _OPERATORS:
        raise ValueError(f"backend must be one of {sorted(_OPERATORS)}, not {backend!r}")
    options = pod_kwargs(**kwargs)
    options["deferrable"] = kwargs.get("deferrable", True)
    procs = procs_per_node if procs_per_node is not None else max(int(kwargs.get("gpus", 1)), 1)
    extra: dict[str, Any] = {"max_restarts": max_restarts} if backend == "jobset" else {}
    return _OPERATORS[backend](
        task_id=task_id,
        nodes=nodes,
        procs_per_node=procs,
        master_port=master_port,
        poll_interval=poll_interval,
        torchrun=torchrun,
        **extra,
        **options,
    )


def multinode_preflight(
    task_id: str = "gpu_preflight", *, nodes: int, backend: str = "jobset", **kwargs: Any
) -> GangOperator:
    """The GPU preflight (``nvidia-smi`` and ``podtrain smoke``) on every one of ``nodes`` pods at once, with the
    training pods' GPU request, selector and tolerations: a gang that cannot be placed, or one bad node, fails in
    minutes. ``kwargs`` as for :func:`multinode_pod`."""
    small = {**preflight_kwargs(kwargs.get("gpus", 1)), "torchrun": False}
    if backend == "jobset":
        small["max_restarts"] = 0  # a node that fails the preflight fails it; the task's retries decide
    return multinode_pod(task_id, nodes=nodes, backend=backend, **{**small, **kwargs})


def _condition(conditions: Sequence[Mapping[str, Any]], *types: str) -> bool:
    return any(c.get("type") in types and c.get("status") == "True" for c in conditions)
