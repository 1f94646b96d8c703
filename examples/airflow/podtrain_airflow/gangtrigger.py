"""The trigger that follows a gang (a JobSet, or an Indexed Job) to its end without holding a worker slot.

It polls the object through the provider's :class:`AsyncKubernetesHook` (``kubernetes_asyncio``; the hook has no
custom-object calls, so it opens the API client itself, as the provider's own triggers do) and fires one event:

* ``{"status": "finished", "object": ...}`` when the JobSet has a ``Completed`` or ``Failed`` condition
  (``terminalState``) or the Job a ``Complete`` or ``Failed`` one;
* ``{"status": "gone"}`` when the object no longer exists (deleted by someone else);
* ``{"status": "unschedulable", "pod": name}`` when a pod of the gang stayed unschedulable past
  ``schedule_timeout`` seconds: a gang waits for all its pods, so one that cannot be placed stalls every other;
* ``{"status": "api_error", "message": ...}`` when the API did not answer for ``api_patience`` seconds.

Each restart of a JobSet (``status.restarts`` growing) is logged with the JobSet's restart condition. When the
user kills the deferred task (Airflow 3.3+ calls :meth:`on_kill`), the object is deleted with its pods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from functools import cached_property
from typing import Any

import yaml
from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
from airflow.triggers.base import BaseTrigger, TriggerEvent
from kubernetes_asyncio import client as async_client
from kubernetes_asyncio.client.exceptions import ApiException

from podtrain_airflow.jobset import GROUP, PLURAL, VERSION

__all__ = ["KINDS", "GangTrigger", "pod_selector", "terminal"]

KINDS = ("jobset", "job")
_TRANSIENT = {429, 500, 502, 503, 504}


def pod_selector(kind: str, name: str) -> str:
    """The label selector of the gang's pods."""
    if kind == "jobset":
        return f"jobset.sigs.k8s.io/jobset-name={name}"
    return f"batch.kubernetes.io/job-name={name}"


def terminal(kind: str, obj: dict[str, Any]) -> str:
    """``"completed"``, ``"failed"`` or ``""`` (still running) for a JobSet or Job object (as a dict)."""
    status = obj.get("status") or {}
    done = {"jobset": ("Completed", "Failed"), "job": ("Complete", "Failed")}[kind]
    for condition in status.get("conditions") or []:
        if condition.get("type") in done and condition.get("status") == "True":
            return "completed" if condition["type"] != "Failed" else "failed"
    state = str(status.get("terminalState") or "")
    return state.lower() if kind == "jobset" and state in ("Completed", "Failed") else ""


class GangTrigger(BaseTrigger):
    """Fires once the gang ``kind`` (``"jobset"`` or ``"job"``) ``name`` in ``namespace`` has ended; see the
    module docstring. The connection arguments are the operator's (``kubernetes_conn_id``, ``config_file``, ...)."""

    def __init__(
        self,
        *,
        kind: str,
        name: str,
        namespace: str,
        kubernetes_conn_id: str | None = None,
        config_file: str | None = None,
        in_cluster: bool | None = None,
        cluster_context: str | None = None,
        poll_interval: float = 10.0,
        schedule_timeout: float = 1800.0,
        api_patience: float = 600.0,
        grace_seconds: int = 30,
        on_kill_action: str = "delete_pod",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind, self.name, self.namespace = kind, name, namespace
        self.kubernetes_conn_id, self.config_file = kubernetes_conn_id, config_file
        self.in_cluster, self.cluster_context = in_cluster, cluster_context
        self.poll_interval, self.schedule_timeout, self.api_patience = poll_interval, schedule_timeout, api_patience
        self.grace_seconds, self.on_kill_action = grace_seconds, on_kill_action
        self._fired = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "kind": self.kind,
                "name": self.name,
                "namespace": self.namespace,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "config_file": self.config_file,
                "in_cluster": self.in_cluster,
                "cluster_context": self.cluster_context,
                "poll_interval": self.poll_interval,
                "schedule_timeout": self.schedule_timeout,
                "api_patience": self.api_patience,
                "grace_seconds": self.grace_seconds,
                "on_kill_action": self.on_kill_action,
            },
        )

    @cached_property
    def hook(self) -> AsyncKubernetesHook:
        # The async hook reads a kubeconfig only from the connection or the default place, never from
        # ``config_file`` (provider 10.25): an operator's ``config_file`` is given to it as a config dict.
        config = None
        if self.config_file:
            with open(self.config_file, encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
        return AsyncKubernetesHook(
            conn_id=self.kubernetes_conn_id,
            in_cluster=self.in_cluster,
            config_file=self.config_file,
            config_dict=config,
            cluster_context=self.cluster_context,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        event = await self.follow()
        self._fired = True
        yield TriggerEvent(event)

    async def follow(self, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
        """Poll until the gang ends; the event's payload (see the module docstring)."""
        restarts, unplaced, failing_since = 0, {}, None
        while True:
            try:
                async with self.hook.get_conn() as api:
                    obj = await self._read(api)
                    if obj is None:
                        return {"status": "gone", "name": self.name, "namespace": self.namespace}
                    if terminal(self.kind, obj):
                        return {"status": "finished", "name": self.name, "namespace": self.namespace, "object": obj}
                    restarts = self._note_restart(obj, restarts)
                    stuck = await self._unschedulable(api, unplaced, clock())
                    if stuck:
                        return {"status": "unschedulable", "name": self.name, "namespace": self.namespace, "pod": stuck}
                failing_since = None
            except (ApiException, OSError, asyncio.TimeoutError) as exc:
                status = getattr(exc, "status", None)
                if isinstance(exc, ApiException) and status not in _TRANSIENT:
                    return {
                        "status": "api_error",
                        "name": self.name,
                        "namespace": self.namespace,
                        "message": _text(exc),
                    }
                failing_since = failing_since if failing_since is not None else clock()
                self.log.warning("the Kubernetes API did not answer (%s); asking again", _text(exc))
                if clock() - failing_since > self.api_patience:
                    message = f"the Kubernetes API did not answer for {self.api_patience:.0f} s: {_text(exc)}"
                    return {"status": "api_error", "name": self.name, "namespace": self.namespace, "message": message}
            await asyncio.sleep(self.poll_interval)

    async def _read(self, api: async_client.ApiClient) -> dict[str, Any] | None:
        try:
            if self.kind == "jobset":
                obj = await async_client.CustomObjectsApi(api).get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name
                )
                return dict(obj)
            job = await async_client.BatchV1Api(api).read_namespaced_job_status(self.name, self.namespace)
            return dict(api.sanitize_for_serialization(job))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _note_restart(self, obj: dict[str, Any], seen: int) -> int:
        restarts = int((obj.get("status") or {}).get("restarts") or 0)
        if restarts > seen:
            why = [
                f"{c.get('reason', '')}: {c.get('message', '')}"
                for c in (obj.get("status") or {}).get("conditions") or []
                if c.get("type") == "RestartingJobSet"
            ]
            self.log.info(
                "%s %s restarted its gang (restart %d)%s", self.kind, self.name, restarts, f": {why[0]}" if why else ""
            )
        return restarts

    async def _unschedulable(self, api: async_client.ApiClient, unplaced: dict[str, float], now: float) -> str:
        """The name of a pod unschedulable for over ``schedule_timeout`` seconds, or ``""``."""
        pods = await async_client.CoreV1Api(api).list_namespaced_pod(
            self.namespace, label_selector=pod_selector(self.kind, self.name)
        )
        current = set()
        for pod in pods.items:
            conditions = {c.type: c for c in (pod.status.conditions or [])} if pod.status else {}
            scheduled = conditions.get("PodScheduled")
            if scheduled is not None and scheduled.status == "False" and scheduled.reason == "Unschedulable":
                current.add(pod.metadata.name)
                unplaced.setdefault(pod.metadata.name, now)
        for name in list(unplaced):
            if name not in current:
                del unplaced[name]
        late = [name for name, since in unplaced.items() if now - since > self.schedule_timeout]
        return sorted(late)[0] if late else ""

    async def on_kill(self) -> None:
        """The user killed the deferred task: delete the gang (unless ``on_kill_action`` is ``keep_pod``)."""
        if self._fired or self.on_kill_action == "keep_pod":
            return
        self.log.info("deleting %s %s/%s: its task was stopped", self.kind, self.namespace, self.name)
        try:
            async with self.hook.get_conn() as api:
                body = async_client.V1DeleteOptions(
                    propagation_policy="Foreground", grace_period_seconds=self.grace_seconds
                )
                if self.kind == "jobset":
                    await async_client.CustomObjectsApi(api).delete_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, PLURAL, self.name, body=body
                    )
                else:
                    await async_client.BatchV1Api(api).delete_namespaced_job(self.name, self.namespace, body=body)
        except Exception:
            self.log.exception("could not delete %s %s/%s", self.kind, self.namespace, self.name)


def _text(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
