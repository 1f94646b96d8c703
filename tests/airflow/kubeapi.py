"""A small Kubernetes for tests, on 127.0.0.1: an API server whose pods run as local processes.

It serves the core/v1 endpoints that ``KubernetesPodOperator`` (through the official ``kubernetes`` client) calls
while it creates, follows, checks and cleans up a pod: pods (create with ``generateName``, read, list by label and
field selector, patch, graceful delete, log with ``follow``), events, ``/version`` and ``/healthz``; JobSets
(``jobset.x-k8s.io/v1alpha2``: create, get, list, delete, with a controller that runs them as Jobs of pods here,
restarts and fails them by their failure policies); ``batch/v1`` Jobs (create, get, list, delete by
``propagationPolicy``; the same Job controller runs a client's Jobs and the JobSets'); and core/v1 Services (create,
get, list, delete: stored, and a headless one gives the pods it selects their DNS names). Anything else is answered
with a Kubernetes ``Status`` (404 ``NotFound`` or 405 ``MethodNotAllowed``), so a call the server lacks is plain in
the client's error; ``watch=true`` is refused with a 400 Status.

It is cut where Kubernetes cuts: the API server half changes objects, the kubelet half runs processes, and they
meet only in the objects, so each half reads on its own:

* ``kubeapi.py`` (this module): :class:`KubeAPIServer`, its lifecycle, kubeconfig and the controls tests use.
* ``_kubepods.py``: what each endpoint does to the objects (and the scheduler's one-node fit);
  ``_kubehttp.py``: the HTTP wire; ``_kubedisruption.py``: preemption and eviction, objects first, then the
  kubelet.
* ``_kubelet.py``: pods as processes in their own session, their status, log and termination message;
  ``_kubecontainer.py``: the container's argv, env, cwd and volumes (``images`` maps an image to its ENTRYPOINT).
* ``_kubejobsets.py``: the JobSet endpoints and the JobSet controller (a thread, started and stopped with the
  server) that makes a JobSet's Jobs and restarts or finishes the gang; ``_kubejobs.py``: the Job create and delete
  endpoints, and the Job controller that thread runs for every Job (their pods, ``podFailurePolicy``,
  ``backoffLimit``, a foreground delete); ``_kubeservices.py``: the Service endpoints.
* ``_kubeobjects.py``: what both halves share: the node's settings, the pods, events, Secrets, ConfigMaps,
  JobSets, Jobs, Services and the pods' host names under one condition; time stamps, selectors and the ``Status``
  error.

:meth:`KubeAPIServer.preempt` terminates a pod the way a disruption does: a ``DisruptionTarget`` condition
(``PreemptionByScheduler`` by default; ``TerminationByKubelet`` also sets ``status.reason: Evicted``), SIGTERM to
the process group, the pod's grace period, SIGKILL; the finished pod keeps its status so the caller can read exit
code and message (``remove=True`` then deletes the object, as the scheduler does).

:meth:`KubeAPIServer.preempt_when` does the same from a thread, to the next pod (matching a label selector) whose
log matches a pattern, for a caller blocked in ``dag.test()``. For assertions: :meth:`~KubeAPIServer.pod`
(``deleted=True``: also the last object of a deleted pod), :meth:`~KubeAPIServer.pods` (``deleted=True``: every pod
ever made), :meth:`~KubeAPIServer.log_text`, :meth:`~KubeAPIServer.pod_dir`, :meth:`~KubeAPIServer.pid`,
:meth:`~KubeAPIServer.events`, :meth:`~KubeAPIServer.wait_for` / ``wait_for_phase`` / ``wait_for_pod``, and
``requests`` (every method and path served). For JobSets, Jobs and Services: :meth:`~KubeAPIServer.jobset`,
:meth:`~KubeAPIServer.jobsets`, :meth:`~KubeAPIServer.jobs` and :meth:`~KubeAPIServer.services` (``deleted=True``
too), :meth:`~KubeAPIServer.wait_for_jobset` and :meth:`~KubeAPIServer.wait_for_job` (a condition type or a
predicate on the object), and :meth:`~KubeAPIServer.process_span` (when a pod's process started and ended, in ns:
what a ``BlockingRecreate`` check compares).

Only the standard library is used (the server runs in the Airflow test environment, and runs the training
environment's ``podtrain`` only as a process). Typical use::

    python = repo / ".venv" / "bin" / "python"
    with KubeAPIServer(
        images={"podtrain:test": [str(python), "-m", "entrypoint", "run", "--"]},
        extra_env={"PYTHONPATH": str(repo)},
    ) as kube:
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        preempter = kube.preempt_when("checkpoint.committed", label_selector="task_id=train")
        ...  # KubernetesPodOperator(config_file=str(kubeconfig), in_cluster=False, ...), or KUBECONFIG
        preempter.join()
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _kubedisruption import Preempter, disrupt
from _kubehttp import Handler
from _kubejobs import JobsAPI
from _kubejobsets import JobSetController, JobSetsAPI
from _kubelet import Kubelet
from _kubeobjects import DEFAULT_NODE, Cluster, Node, Pod, match_labels, parse_label_selector
from _kubeservices import ServicesAPI

__all__ = ["KubeAPIServer", "Preempter", "match_labels", "parse_label_selector"]


class _Shared:
    """A server attribute that lives on its cluster (``"secrets"``) or node (``"node.name"``), where both halves
    read it: one value, so setting it on the server reaches the scheduler and the kubelet as it always did."""

    def __init__(self, where: str) -> None:
        self.on_node, self.field = where.startswith("node."), where.removeprefix("node.")

    def __get__(self, obj: KubeAPIServer | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.cluster.node if self.on_node else obj.cluster, self.field)

    def __set__(self, obj: KubeAPIServer, value: Any) -> None:
        setattr(obj.cluster.node if self.on_node else obj.cluster, self.field, value)


class KubeAPIServer(JobSetsAPI, JobsAPI, ServicesAPI):
    """The server, on ``127.0.0.1:<free port>`` in a thread; see the module docstring. The endpoints' operations
    (``api_create``, ``api_list``, ...) come from :class:`~_kubepods.PodsAPI`, the JobSet ones (``api_jobset_*``,
    ``api_job_get``/``_list``) from :class:`~_kubejobsets.JobSetsAPI`, ``api_job_create``/``_delete`` from
    :class:`~_kubejobs.JobsAPI`, the Service ones (``api_service_*``) from :class:`~_kubeservices.ServicesAPI`.

    :param images: image -> the argv of its ENTRYPOINT, or a dict with ``entrypoint`` and optionally ``cmd``
        (argv), ``env`` (the image's ENV) and ``workdir`` (its WORKDIR, used when a mount or ``paths`` maps it).
    :param extra_env: env every container gets before its own (e.g. ``PATH`` with a venv's ``bin`` first).
    :param env_overrides: env every container gets after its own.
    :param paths: container path -> local path, rewritten in env values and argv like a mount.
    :param cwd: the processes' working directory; default the pod's own directory.
    :param node_name: the node every pod is scheduled on.
    :param start_delay: seconds a pod stays ``Pending`` before its process starts.
    :param directory: where pod directories go; default a temporary directory removed on :meth:`stop`.
    :param allocatable: the node's extended resources (``{"nvidia.com/gpu": 1}``); when given, a pod asking for
        more of one (or for one the node lacks) stays ``Pending``, ``PodScheduled: False``, reason
        ``Unschedulable``, with a ``FailedScheduling`` event. Default: any request fits.
    :param node_labels: the node's labels; when given, a pod whose ``nodeSelector`` does not match them is
        unschedulable in the same way. Default: any selector matches.
    :param runtime: a container runtime that runs each pod in its real image (``_kubepodman.Podman``); default
        each container is a local process.
    """

    def __init__(
        self,
        images: Mapping[str, Sequence[str] | Mapping[str, Any]] | None = None,
        *,
        extra_env: Mapping[str, str] | None = None,
        env_overrides: Mapping[str, str] | None = None,
        paths: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        node_name: str = DEFAULT_NODE,
        start_delay: float = 0.0,
        directory: str | os.PathLike[str] | None = None,
        allocatable: Mapping[str, int | str] | None = None,
        node_labels: Mapping[str, str] | None = None,
        runtime: Any = None,
    ):
        self._own_dir = directory is None
        node = Node(
            name=node_name,
            directory=Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="kubeapi-")),
            images={
                k: dict(v) if isinstance(v, Mapping) else {"entrypoint": list(v)} for k, v in (images or {}).items()
            },
            extra_env=dict(extra_env or {}),
            env_overrides=dict(env_overrides or {}),
            paths=dict(paths or {}),
            cwd=Path(cwd) if cwd is not None else None,
            start_delay=start_delay,
            allocatable=dict(allocatable) if allocatable is not None else None,
            node_labels=dict(node_labels) if node_labels is not None else None,
            runtime=runtime,
        )
        self.cluster = Cluster(node)
        self.kubelet = Kubelet(self.cluster)
        self.requests: list[tuple[str, str]] = []  # (method, path with query) of every request
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.jobset_controller: JobSetController | None = None

    images = _Shared("node.images")
    extra_env = _Shared("node.extra_env")
    env_overrides = _Shared("node.env_overrides")
    paths = _Shared("node.paths")
    cwd = _Shared("node.cwd")
    node_name = _Shared("node.name")
    start_delay = _Shared("node.start_delay")
    directory = _Shared("node.directory")
    allocatable = _Shared("node.allocatable")
    node_labels = _Shared("node.node_labels")
    secrets = _Shared("secrets")
    config_maps = _Shared("config_maps")

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> KubeAPIServer:
        server = self

        class Bound(Handler):
            kube = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Bound)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="kubeapi", daemon=True)
        self._thread.start()
        self.jobset_controller = JobSetController(self)
        self.jobset_controller.start()
        return self

    def stop(self) -> None:
        """Stop the JobSet controller, kill every process group still running, stop serving, remove the temporary
        directory."""
        if self.jobset_controller is not None:
            self.jobset_controller.stop()
            self.jobset_controller = None
        self.kubelet.stop()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_dir:
            shutil.rmtree(self.cluster.node.directory, ignore_errors=True)

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        """A kubeconfig (as a dict) for this server: plain HTTP, no credentials."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "podtrain-test", "cluster": {"server": self.url}}],
            "users": [{"name": "podtrain-test", "user": {}}],
            "contexts": [
                {
                    "name": "podtrain-test",
                    "context": {"cluster": "podtrain-test", "user": "podtrain-test", "namespace": namespace},
                }
            ],
            "current-context": "podtrain-test",
            "preferences": {},
        }

    def write_kubeconfig(self, path: str | os.PathLike[str], namespace: str = "default") -> Path:
        """Write :meth:`kubeconfig` to ``path`` (JSON, which YAML loaders read) and return the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.kubeconfig(namespace), indent=2) + "\n")
        return out

    # ------------------------------------------------------------------------------------ test API

    def add_secret(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        """A Secret's decoded ``data`` for ``secretKeyRef``, ``envFrom.secretRef`` and secret volumes."""
        with self.cluster.cond:
            self.cluster.secrets[(namespace, name)] = dict(data)

    def add_config_map(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        with self.cluster.cond:
            self.cluster.config_maps[(namespace, name)] = dict(data)

    def pod(self, namespace: str, name: str, *, deleted: bool = False) -> dict[str, Any]:
        """A copy of the pod's API object (``KeyError`` when there is none); ``deleted``: also the last one
        of that name that was deleted, as it was when it went."""
        with self.cluster.cond:
            return copy.deepcopy(self.cluster.find(namespace, name, deleted).obj)

    def pid(self, namespace: str, name: str) -> int | None:
        """The process id (and process group id) of the pod's container, once started."""
        with self.cluster.cond:
            proc = self.cluster.find(namespace, name, True).proc
            return None if proc is None else proc.pid

    def pods(self, namespace: str | None = None, *, deleted: bool = False) -> list[dict[str, Any]]:
        """Copies of the pods; ``deleted``: every pod ever created, deleted ones as they were when they went, in
        the order they were created."""
        with self.cluster.cond:
            pods = self.cluster.all_pods if deleted else list(self.cluster.pods.values())
            return [copy.deepcopy(p.obj) for p in pods if namespace in (None, p.key[0])]

    def pod_dir(self, namespace: str, name: str) -> Path:
        with self.cluster.cond:
            return self.cluster.find(namespace, name, True).dir

    def log_text(self, namespace: str, name: str) -> str:
        with self.cluster.cond:
            log = self.cluster.find(namespace, name, True).log
            return b"".join(line for _, line in log).decode(errors="replace")

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.cluster.cond:
            events = self.cluster.events
            return [copy.deepcopy(e) for e in events if namespace in (None, e["metadata"]["namespace"])]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
        """Wait (on the cluster's condition) until ``predicate()``; ``TimeoutError`` naming ``what`` after
        ``timeout`` seconds."""
        self.cluster.wait_for(predicate, timeout, what)

    def wait_for_phase(self, namespace: str, name: str, *phases: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the pod exists and its phase is one of ``phases``; return a copy of it."""

        def ready() -> bool:
            pod = self.cluster.pods.get((namespace, name))
            return pod is not None and pod.obj["status"].get("phase") in phases

        self.wait_for(ready, timeout, f"pod {namespace}/{name} in phase {phases}")
        return self.pod(namespace, name)

    def wait_for_pod(self, namespace: str, label_selector: str = "", timeout: float = 30.0) -> dict[str, Any]:
        """Wait until exactly one pod matching ``label_selector`` runs (or has run); return a copy of it."""
        terms = parse_label_selector(label_selector)

        def found() -> list[Pod]:
            return [
                p
                for k, p in self.cluster.pods.items()
                if k[0] == namespace and p.started and match_labels(p.obj["metadata"].get("labels") or {}, terms)
            ]

        self.wait_for(lambda: len(found()) >= 1, timeout, f"a pod matching {label_selector!r}")
        with self.cluster.cond:
            return copy.deepcopy(found()[-1].obj)

    def jobset(self, namespace: str, name: str, *, deleted: bool = False) -> dict[str, Any]:
        """A copy of the JobSet (``KeyError`` when there is none); ``deleted``: also the last one of that name that
        was deleted, as it was when it went."""
        with self.cluster.cond:
            obj = self.cluster.jobsets.get((namespace, name))
            if obj is None and deleted:
                obj = self.cluster.deleted_jobsets.get((namespace, name))
            if obj is None:
                raise KeyError(f"no jobset {namespace}/{name}")
            return copy.deepcopy(obj)

    def jobsets(self, namespace: str | None = None, *, deleted: bool = False) -> list[dict[str, Any]]:
        """Copies of the JobSets; ``deleted``: also the last deleted one of each name, as it was when it went."""
        with self.cluster.cond:
            found = list(self.cluster.jobsets.items())
            if deleted:
                found += self.cluster.deleted_jobsets.items()
            return [copy.deepcopy(o) for k, o in found if namespace in (None, k[0])]

    def jobs(self, namespace: str | None = None, *, deleted: bool = False) -> list[dict[str, Any]]:
        """Copies of the batch/v1 Jobs (the JobSets' and the clients'; those of a restarted attempt go once their
        pods are gone); ``deleted``: also the last deleted client Job of each name, as it was when it went."""
        with self.cluster.cond:
            found = [(k, j.obj) for k, j in self.cluster.jobs.items()]
            if deleted:
                found += self.cluster.deleted_jobs.items()
            return [copy.deepcopy(o) for k, o in found if namespace in (None, k[0])]

    def services(self, namespace: str | None = None, *, deleted: bool = False) -> list[dict[str, Any]]:
        """Copies of the Services; ``deleted``: also the last deleted one of each name."""
        with self.cluster.cond:
            found = list(self.cluster.services.items())
            if deleted:
                found += self.cluster.deleted_services.items()
            return [copy.deepcopy(o) for k, o in found if namespace in (None, k[0])]

    def wait_for_job(
        self, namespace: str, name: str, until: str | Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        """As :meth:`wait_for_jobset`, for a batch/v1 Job (``until``: e.g. ``"Complete"``, ``"Failed"``)."""
        jobs = self.cluster.jobs
        return self._wait_for(
            f"job {namespace}/{name}", lambda: getattr(jobs.get((namespace, name)), "obj", None), until, timeout
        )

    def wait_for_jobset(
        self, namespace: str, name: str, until: str | Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait until the JobSet has condition ``until`` (a type, status True) or ``until(jobset)`` is true; return
        a copy. ``RuntimeError`` at once if the controller hit a bug (its traceback), ``TimeoutError`` after
        ``timeout`` seconds (with the JobSet's status)."""
        jobsets = self.cluster.jobsets
        return self._wait_for(f"jobset {namespace}/{name}", lambda: jobsets.get((namespace, name)), until, timeout)

    def _wait_for(
        self, kind: str, current: Callable[[], Any], until: str | Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        def ready() -> bool:
            if self.jobset_controller is not None and self.jobset_controller.errors:
                raise RuntimeError("the JobSet controller failed:\n" + self.jobset_controller.errors[-1])
            obj = current()
            if obj is None:
                return False
            if callable(until):
                return until(obj)
            return any(c["type"] == until and c["status"] == "True" for c in obj["status"].get("conditions") or [])

        try:
            self.wait_for(ready, timeout, f"{kind} to reach {getattr(until, '__name__', until)}")
        except TimeoutError as e:
            with self.cluster.cond:
                obj = current()
                raise TimeoutError(f"{e}; its status: {obj and obj['status']}") from None
        with self.cluster.cond:
            return copy.deepcopy(current())

    def process_span(self, namespace: str, name: str) -> tuple[int | None, int | None]:
        """When the pod's process started and when its end was seen (``time.time_ns()``; None: not yet), also for
        a deleted pod."""
        with self.cluster.cond:
            pod = self.cluster.find(namespace, name, True)
            return pod.started_ns, pod.finished_ns

    def preempt(
        self,
        namespace: str,
        name: str,
        *,
        reason: str = "PreemptionByScheduler",
        message: str | None = None,
        grace_seconds: float | None = None,
        wait: bool = True,
        remove: bool = False,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Disrupt a pod as Kubernetes does and (with ``wait``) return it once its container has terminated.

        Sets the ``DisruptionTarget`` condition (``reason``; ``TerminationByKubelet`` also sets the pod's
        ``status.reason: Evicted``), sends SIGTERM to the process group, waits ``grace_seconds`` (default: the
        pod's ``terminationGracePeriodSeconds``), sends SIGKILL. ``remove`` deletes the object afterwards.
        """
        return disrupt(
            self.cluster,
            self.kubelet,
            namespace,
            name,
            reason=reason,
            message=message,
            grace_seconds=grace_seconds,
            wait=wait,
            remove=remove,
            timeout=timeout,
        )

    def preempt_when(
        self,
        pattern: str,
        *,
        namespace: str = "default",
        label_selector: str = "",
        count: int = 1,
        timeout: float = 600.0,
        **preempt_kwargs: Any,
    ) -> Preempter:
        """In a thread: preempt each of the next ``count`` running pods (matching ``label_selector``) once its log
        matches the regular expression ``pattern``; for a caller that blocks meanwhile (``dag.test()``)."""
        preempter = Preempter(
            self,
            pattern=re.compile(pattern),
            namespace=namespace,
            label_selector=label_selector,
            count=count,
            timeout=timeout,
            preempt_kwargs=preempt_kwargs,
        )
        preempter.start()
        return preempter
