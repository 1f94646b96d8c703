"""A small Kubernetes API server for tests: pods run as local processes, on 127.0.0.1.

It serves the core/v1 endpoints that ``KubernetesPodOperator`` (through the official ``kubernetes`` client)
calls while it creates, follows, checks and cleans up a pod, and plays the kubelet for every pod created:

* ``POST   /api/v1/namespaces/{ns}/pods``                  create (``generateName`` honoured), 201
* ``GET    /api/v1/namespaces/{ns}/pods``                  list, ``labelSelector`` and ``fieldSelector``
* ``GET    /api/v1/pods``                                  list in all namespaces
* ``GET    /api/v1/namespaces/{ns}/pods/{name}``           read (also ``.../status``)
* ``GET    /api/v1/namespaces/{ns}/pods/{name}/log``       ``container``, ``follow``, ``timestamps``,
  ``sinceSeconds``, ``sinceTime``, ``tailLines``, ``limitBytes``; a followed log is a chunked stream that
  ends when the container has terminated
* ``PATCH  /api/v1/namespaces/{ns}/pods/{name}``           JSON merge, strategic merge (as a merge) and JSON
  patch
* ``DELETE /api/v1/namespaces/{ns}/pods/{name}``           graceful: SIGTERM, ``gracePeriodSeconds`` (query or
  body, else the pod's ``terminationGracePeriodSeconds``), SIGKILL; the object goes once the container is gone
* ``GET    /api/v1/namespaces/{ns}/events``                the pods' events (Scheduled, Pulled, Created,
  Started, Killing, Preempted), ``fieldSelector`` such as ``involvedObject.name=...``
* ``GET    /version``, ``GET /healthz``

Anything else is answered with a Kubernetes ``Status`` (404 ``NotFound`` or 405 ``MethodNotAllowed``), so a
call the server lacks is plain in the client's error. ``watch=true`` is refused with a 400 Status.

The kubelet part, per pod (one container is run: ``spec.containers[0]``; init containers and sidecars are
not run, and no container is restarted, as with ``restartPolicy: Never``):

* argv = the container's ``command`` + ``args`` (``$(VAR)`` expanded as Kubernetes does); without a
  ``command`` the image's ENTRYPOINT comes from the ``images`` mapping (image -> argv, or a dict with
  ``entrypoint``, ``cmd``, ``env``, ``workdir``), followed by the pod's ``args`` or else the image's ``cmd``.
  An image with no mapping and no ``command`` leaves the container waiting with reason ``ErrImageNeverPull``
  (the operator fails such a pod at once); an argv whose program is missing ends as exit 128, reason
  ``StartError``.
* the process runs in its own session (so a signal reaches its whole group, as ``tini -g`` forwards it),
  with stdout and stderr together as the pod log, in ``cwd`` (default: the pod's own directory; the
  container's ``workingDir`` or the image's ``workdir`` when a mount or ``paths`` maps it).
* env: ``PATH`` (the server's), ``HOSTNAME``, ``HOME`` (the pod directory), then ``extra_env``, then the
  mapped image's ``env``, then the container's ``envFrom``/``env``: plain ``value``; ``valueFrom.fieldRef``
  (``metadata.name``, ``metadata.namespace``, ``metadata.uid``, ``metadata.labels['k']``,
  ``metadata.annotations['k']``, ``spec.nodeName``, ``spec.serviceAccountName``, ``status.podIP``,
  ``status.hostIP``); ``valueFrom.secretKeyRef``/``configMapKeyRef`` and ``envFrom`` from the in-memory
  stores (:meth:`KubeAPIServer.add_secret`, :meth:`KubeAPIServer.add_config_map`; a missing required key
  leaves the container waiting with ``CreateContainerConfigError``); ``resourceFieldRef`` gives the limit
  (or request) as written. ``env_overrides`` come last.
* volumes: every ``volumeMount`` (except under ``/dev``) is a local directory: ``emptyDir`` ->
  ``<pod dir>/volumes/<volume>``, a ``persistentVolumeClaim`` -> ``<server dir>/pvc/<namespace>/<claim>``
  (shared by every pod that mounts the claim, and kept across pods as a claim is), ``secret``/``configMap``
  -> a directory holding one file per key. Env values and argv items that name a mount path (``/data``,
  ``/data/x``, ``--dir=/data``, ``file:///data/x``) are rewritten to the local directory (``extra_env`` and
  the image's ``env`` too), as are the ``paths`` the server is given (container path -> local path). In
  ``extra_env``, ``env_overrides`` and ``paths``, ``{pod_dir}``, ``{pod_name}``, ``{namespace}`` are
  replaced.
* the termination message: the container's ``terminationMessagePath`` (default ``/dev/termination-log``) is
  ``<pod dir>/termination-log``; ``PODTRAIN_TERMINATION_LOG`` is set to that file when the pod leaves it
  unset or sets it to ``terminationMessagePath``. The message is that file (at most 4096 bytes) or, under
  ``terminationMessagePolicy: FallbackToLogsOnError`` when the file is empty and the container failed, the
  last 80 lines of the log (at most 2048 bytes).
* scheduling: every pod lands on the one node (``node_name``), unless ``allocatable``/``node_labels`` are given
  and the pod's extended resources (``nvidia.com/gpu``) or ``nodeSelector`` do not fit: then it stays
  ``Pending`` with ``PodScheduled: False``, reason ``Unschedulable``, as on a cluster without such a node.
* status: ``Pending`` (PodScheduled, container waiting ``ContainerCreating``) -> ``Running`` (all conditions
  True, ``state.running``) -> ``Succeeded`` (exit 0) / ``Failed``, ``state.terminated`` with ``exitCode``
  (128 + N when a signal N ended the process), ``reason`` ``Completed``/``Error``, ``message``,
  ``startedAt``/``finishedAt``.

:meth:`KubeAPIServer.preempt` terminates a pod the way a disruption does: a ``DisruptionTarget`` condition
(``PreemptionByScheduler`` by default; ``TerminationByKubelet`` also sets ``status.reason: Evicted``),
SIGTERM to the process group, the pod's grace period, SIGKILL; the finished pod keeps its status so the
caller can read exit code and message (``remove=True`` then deletes the object, as the scheduler does).

:meth:`KubeAPIServer.preempt_when` does the same from a thread, to the next pod (matching a label selector)
whose log matches a pattern, for a caller blocked in ``dag.test()``. For assertions: :meth:`~KubeAPIServer.pod`
(``deleted=True``: also the last object of a deleted pod), :meth:`~KubeAPIServer.pods`,
:meth:`~KubeAPIServer.log_text`, :meth:`~KubeAPIServer.pod_dir`, :meth:`~KubeAPIServer.pid`,
:meth:`~KubeAPIServer.events`, :meth:`~KubeAPIServer.wait_for` / ``wait_for_phase`` / ``wait_for_pod``, and
``requests`` (every method and path served).

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

import contextlib
import copy
import datetime as _dt
import json
import os
import re
import secrets as _secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["KubeAPIServer", "Preempter", "match_labels", "parse_label_selector"]

DEFAULT_NODE = "podtrain-test-node"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
TERMINAL_PHASES = ("Succeeded", "Failed")
_VERSION = {
    "major": "1",
    "minor": "34",
    "gitVersion": "v1.34.0-podtrain-test",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.24",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _rfc3339(t: _dt.datetime | None = None) -> str:
    return (t or _now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339_nano(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac:09d}Z"


def _parse_time(text: str) -> float:
    """An RFC 3339 time (``Z`` or an offset, optional fraction) as seconds since the epoch."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text.strip())
    if not m:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    base = _dt.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)


# --------------------------------------------------------------------------------------------- selectors

_SELECTOR_TERM = re.compile(
    r"""\s*(?:
        (?P<not>!)\s*(?P<nkey>[^\s,!=()]+)                                  # !key
      | (?P<skey>[^\s,!=()]+)\s+(?P<op>in|notin)\s*\((?P<vals>[^)]*)\)       # key in (a,b)
      | (?P<ekey>[^\s,!=()]+)\s*(?P<eop>==|=|!=)\s*(?P<val>[^\s,()]*)        # key=v, key==v, key!=v
      | (?P<key>[^\s,!=()]+)                                                 # key
    )\s*(?:,|$)""",
    re.VERBOSE,
)


def parse_label_selector(selector: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """``"a=b,c!=d,!e,f,g in (h,i)"`` -> ``[(key, op, values)]`` with op in ``= != exists !exists in notin``."""
    terms: list[tuple[str, str, tuple[str, ...]]] = []
    pos, text = 0, selector.strip()
    while pos < len(text):
        m = _SELECTOR_TERM.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unable to parse requirement in selector {selector!r}")
        if m.group("not"):
            terms.append((m.group("nkey"), "!exists", ()))
        elif m.group("op"):
            vals = tuple(v.strip() for v in m.group("vals").split(",") if v.strip())
            terms.append((m.group("skey"), m.group("op"), vals))
        elif m.group("eop"):
            op = "!=" if m.group("eop") == "!=" else "="
            terms.append((m.group("ekey"), op, (m.group("val"),)))
        else:
            terms.append((m.group("key"), "exists", ()))
        pos = m.end()
    return terms


def match_labels(labels: Mapping[str, str], terms: Sequence[tuple[str, str, tuple[str, ...]]]) -> bool:
    for key, op, vals in terms:
        have = labels.get(key)
        if op == "=" and have != vals[0]:
            return False
        if op == "!=" and have == vals[0]:
            return False
        if op == "exists" and have is None:
            return False
        if op == "!exists" and have is not None:
            return False
        if op == "in" and have not in vals:
            return False
        if op == "notin" and have in vals:
            return False
    return True


def _field(obj: Mapping[str, Any], dotted: str) -> str:
    cur: Any = obj
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return "" if cur is None else str(cur)


def _match_fields(obj: Mapping[str, Any], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        m = re.fullmatch(r"([^!=]+?)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ValueError(f"invalid field selector term {term!r}")
        equal = _field(obj, m.group(1)) == m.group(3)
        if equal != (m.group(2) != "!="):
            return False
    return True


# ------------------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    """Becomes a Kubernetes ``Status`` response."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, dict(details or {})

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind})


# -------------------------------------------------------------------------------------------------- pods


class _Pod:
    """One pod: its API object, its process and its log. Guarded by the server's condition."""

    def __init__(self, obj: dict[str, Any], directory: Path):
        self.obj = obj
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[tuple[int, bytes]] = []  # (time in ns, one line with its newline)
        self.started = False  # the process was started (or failed to start)
        self.finished = False  # the container has terminated (status written)
        self.terminating = False  # SIGTERM sent or about to be
        self.kill_requested = threading.Event()
        self.killer: threading.Thread | None = None
        self.delete_when_done = False
        self.stuck = False  # left waiting (no entrypoint, a missing secret): it will never start

    @property
    def key(self) -> tuple[str, str]:
        return self.obj["metadata"]["namespace"], self.obj["metadata"]["name"]

    @property
    def container(self) -> dict[str, Any]:
        return self.obj["spec"]["containers"][0]


class KubeAPIServer:
    """The server, on ``127.0.0.1:<free port>`` in a thread; see the module docstring.

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
    ):
        self.images: dict[str, dict[str, Any]] = {
            k: dict(v) if isinstance(v, Mapping) else {"entrypoint": list(v)} for k, v in (images or {}).items()
        }
        self.extra_env = dict(extra_env or {})
        self.env_overrides = dict(env_overrides or {})
        self.paths = dict(paths or {})
        self.cwd = Path(cwd) if cwd is not None else None
        self.node_name = node_name
        self.start_delay = start_delay
        self.allocatable = dict(allocatable) if allocatable is not None else None
        self.node_labels = dict(node_labels) if node_labels is not None else None
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path with query) of every request
        self._cond = threading.Condition()
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._all_pods: list[_Pod] = []
        self._events: list[dict[str, Any]] = []
        self._rv = 1000
        self._stopping = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> KubeAPIServer:
        server = self

        class Handler(_Handler):
            kube = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="kubeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Kill every process group still running, stop serving, remove the temporary directory."""
        with self._cond:
            self._stopping = True
            pods = list(self._all_pods)
            self._cond.notify_all()
        for pod in pods:
            pod.kill_requested.set()
            proc = pod.proc
            if proc is not None and proc.poll() is None:
                _killpg(proc, signal.SIGKILL)
        for pod in pods:
            proc = pod.proc
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

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
        with self._cond:
            self.secrets[(namespace, name)] = dict(data)

    def add_config_map(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        with self._cond:
            self.config_maps[(namespace, name)] = dict(data)

    def pod(self, namespace: str, name: str, *, deleted: bool = False) -> dict[str, Any]:
        """A copy of the pod's API object (``KeyError`` when there is none); ``deleted``: also the last one
        of that name that was deleted, as it was when it went."""
        with self._cond:
            return copy.deepcopy(self._find(namespace, name, deleted).obj)

    def pid(self, namespace: str, name: str) -> int | None:
        """The process id (and process group id) of the pod's container, once started."""
        with self._cond:
            proc = self._find(namespace, name, True).proc
            return None if proc is None else proc.pid

    def _find(self, namespace: str, name: str, deleted: bool) -> _Pod:
        pod = self._pods.get((namespace, name))
        if pod is None and deleted:
            pod = next((p for p in reversed(self._all_pods) if p.key == (namespace, name)), None)
        if pod is None:
            raise KeyError(f"no pod {namespace}/{name}")
        return pod

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [copy.deepcopy(p.obj) for k, p in self._pods.items() if namespace in (None, k[0])]

    def pod_dir(self, namespace: str, name: str) -> Path:
        with self._cond:
            return self._find(namespace, name, True).dir

    def log_text(self, namespace: str, name: str) -> str:
        with self._cond:
            return b"".join(line for _, line in self._find(namespace, name, True).log).decode(errors="replace")

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [copy.deepcopy(e) for e in self._events if namespace in (None, e["metadata"]["namespace"])]

    def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 30.0,
        what: str = "condition",
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(min(left, 0.2))

    def wait_for_phase(self, namespace: str, name: str, *phases: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the pod exists and its phase is one of ``phases``; return a copy of it."""

        def ready() -> bool:
            pod = self._pods.get((namespace, name))
            return pod is not None and pod.obj["status"].get("phase") in phases

        self.wait_for(ready, timeout, f"pod {namespace}/{name} in phase {phases}")
        return self.pod(namespace, name)

    def wait_for_pod(self, namespace: str, label_selector: str = "", timeout: float = 30.0) -> dict[str, Any]:
        """Wait until exactly one pod matching ``label_selector`` runs (or has run); return a copy of it."""
        terms = parse_label_selector(label_selector)

        def found() -> list[_Pod]:
            return [
                p
                for k, p in self._pods.items()
                if k[0] == namespace and p.started and match_labels(p.obj["metadata"].get("labels") or {}, terms)
            ]

        self.wait_for(lambda: len(found()) >= 1, timeout, f"a pod matching {label_selector!r}")
        with self._cond:
            return copy.deepcopy(found()[-1].obj)

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
        with self._cond:
            pod = self._pods.get((namespace, name))
            if pod is None:
                raise KeyError(f"no pod {namespace}/{name}")
            if message is None:
                message = {
                    "PreemptionByScheduler": "default-scheduler: preempting to accommodate a higher priority pod",
                    "TerminationByKubelet": "The node was low on resource: memory.",
                    "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint",
                    "EvictionByEvictionAPI": "Eviction API: evicting",
                    "DeletionByPodGC": "PodGC: node no longer exists",
                }.get(reason, f"{reason}: terminating the pod")
            status = pod.obj["status"]
            conds = [c for c in status.setdefault("conditions", []) if c["type"] != "DisruptionTarget"]
            conds.insert(
                0,
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastProbeTime": None,
                    "lastTransitionTime": _rfc3339(),
                },
            )
            status["conditions"] = conds
            if reason == "TerminationByKubelet":
                status["reason"] = "Evicted"
                status["message"] = message
            if reason == "PreemptionByScheduler":
                self._event(
                    pod,
                    "Preempted",
                    f"Preempted by pod on node {self.node_name}",
                    "Normal",
                    component="default-scheduler",
                    field_path=None,
                )
            self._touch(pod)
            if remove:
                pod.delete_when_done = True
            grace = self._grace(pod, grace_seconds)
            finished = pod.finished
        if finished and remove:
            with self._cond:
                self._done(pod)
        self._terminate(pod, grace)
        if not wait:
            return self.pod(namespace, name, deleted=True)
        self.wait_for(lambda: pod.finished, timeout, f"pod {namespace}/{name} to terminate")
        with self._cond:
            return copy.deepcopy(pod.obj)

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

    # ------------------------------------------------------------------------------------ internals

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _touch(self, pod: _Pod) -> None:
        pod.obj["metadata"]["resourceVersion"] = self._next_rv()
        self._cond.notify_all()

    def _event(
        self,
        pod: _Pod,
        reason: str,
        message: str,
        type_: str = "Normal",
        *,
        component: str = "kubelet",
        field_path: str | None = "container",
    ) -> None:
        meta = pod.obj["metadata"]
        now = _rfc3339()
        if field_path == "container":
            field_path = f"spec.containers{{{pod.container['name']}}}"
        involved = {
            "kind": "Pod",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
            "apiVersion": "v1",
            "resourceVersion": meta.get("resourceVersion"),
        }
        if field_path:
            involved["fieldPath"] = field_path
        self._events.append(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{_secrets.token_hex(8)}",
                    "namespace": meta["namespace"],
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": self._next_rv(),
                    "creationTimestamp": now,
                },
                "involvedObject": involved,
                "reason": reason,
                "message": message,
                "source": {"component": component, **({"host": self.node_name} if component == "kubelet" else {})},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "type": type_,
                "eventTime": None,
                "reportingComponent": component,
                "reportingInstance": self.node_name if component == "kubelet" else "",
            }
        )
        self._cond.notify_all()

    @staticmethod
    def _grace(pod: _Pod, override: float | None) -> float:
        if override is not None:
            return float(override)
        value = pod.obj["spec"].get("terminationGracePeriodSeconds")
        return 30.0 if value is None else float(value)

    def _set_conditions(self, pod: _Pod, ready: bool, reason: str | None = None) -> None:
        now = _rfc3339()
        status = pod.obj["status"]
        old = {c["type"]: c for c in status.get("conditions", [])}
        wanted = {
            "PodReadyToStartContainers": True,
            "Initialized": True,
            "Ready": ready,
            "ContainersReady": ready,
            "PodScheduled": True,
        }
        conds = [old["DisruptionTarget"]] if "DisruptionTarget" in old else []
        for type_, value in wanted.items():
            text = "True" if value else "False"
            prev = old.get(type_)
            cond = {
                "type": type_,
                "status": text,
                "lastProbeTime": None,
                "lastTransitionTime": prev["lastTransitionTime"] if prev and prev["status"] == text else now,
            }
            if not value and type_ in ("Ready", "ContainersReady"):
                cond["reason"] = reason or "ContainersNotReady"
                if reason is None:
                    cond["message"] = f"containers with unready status: [{pod.container['name']}]"
            conds.append(cond)
        status["conditions"] = conds

    def _container_status(self, pod: _Pod, state: dict[str, Any], *, ready: bool, started: bool) -> None:
        c = pod.container
        cid = pod.obj["metadata"]["annotations"].get("kubeapi.podtrain.test/container-id", "")
        status: dict[str, Any] = {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": f"{c.get('image', '')}@sha256:{'0' * 64}" if "waiting" not in state else "",
            "ready": ready,
            "restartCount": 0,
            "started": started,
            "state": state,
            "lastState": {},
        }
        if "waiting" not in state:
            status["containerID"] = cid
        pod.obj["status"]["containerStatuses"] = [status]

    # ---------------------------------------------------------------------------- API operations

    def api_create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("kind", "Pod") != "Pod":
            raise ApiError(400, "BadRequest", "the body is not a Pod")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = "v1", "Pod"
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the request")
        meta["namespace"] = namespace
        spec = obj.get("spec") or {}
        containers = spec.get("containers") or []
        if not containers or not all(c.get("name") for c in containers):
            raise ApiError(
                422,
                "Invalid",
                f'Pod "{meta.get("name", "")}" is invalid: spec.containers: Required value',
                {"name": meta.get("name", ""), "kind": "Pod"},
            )
        with self._cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise ApiError(422, "Invalid", "Pod is invalid: metadata.name: Required value")
                meta["name"] = meta["generateName"] + _secrets.token_hex(3)[:5]
            name = meta["name"]
            if (namespace, name) in self._pods:
                raise ApiError(409, "AlreadyExists", f'pods "{name}" already exists', {"name": name, "kind": "pods"})
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _rfc3339()
            meta.setdefault("labels", {})
            meta["annotations"] = dict(meta.get("annotations") or {})
            meta["annotations"]["kubeapi.podtrain.test/container-id"] = "containerd://" + _secrets.token_hex(32)
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("serviceAccountName", "default")
            unschedulable = self._unschedulable(spec)
            if unschedulable is None:
                spec["nodeName"] = self.node_name
            for c in containers:
                c.setdefault("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
                c.setdefault("terminationMessagePolicy", "File")
                c.setdefault("imagePullPolicy", "IfNotPresent")
                c.setdefault("resources", {})
            obj["spec"] = spec
            obj["status"] = {"phase": "Pending", "qosClass": _qos_class(containers)}
            if unschedulable is None:
                obj["status"].update(
                    {
                        "hostIP": "127.0.0.1",
                        "hostIPs": [{"ip": "127.0.0.1"}],
                        "podIP": "127.0.0.1",
                        "podIPs": [{"ip": "127.0.0.1"}],
                        "startTime": _rfc3339(),
                    }
                )
            directory = self.directory / "pods" / namespace / name
            if directory.exists():  # a deleted pod of the same name ran here before
                directory = self.directory / "pods" / namespace / f"{name}-{meta['uid'][:8]}"
            directory.mkdir(parents=True)
            pod = _Pod(obj, directory)
            self._pods[(namespace, name)] = pod
            self._all_pods.append(pod)
            if unschedulable is not None:
                pod.stuck = True
                obj["status"]["conditions"] = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": unschedulable,
                        "lastProbeTime": None,
                        "lastTransitionTime": _rfc3339(),
                    }
                ]
                self._touch(pod)
                self._event(
                    pod, "FailedScheduling", unschedulable, "Warning", component="default-scheduler", field_path=None
                )
                return copy.deepcopy(obj)
            self._set_conditions(pod, ready=False)
            self._container_status(pod, {"waiting": {"reason": "ContainerCreating"}}, ready=False, started=False)
            self._touch(pod)
            self._event(
                pod,
                "Scheduled",
                f"Successfully assigned {namespace}/{name} to {self.node_name}",
                component="default-scheduler",
                field_path=None,
            )
            created = copy.deepcopy(obj)
        threading.Thread(target=self._run_pod, args=(pod,), name=f"pod-{name}", daemon=True).start()
        return created

    def _unschedulable(self, spec: Mapping[str, Any]) -> str | None:
        """Why the one node cannot take the pod (the scheduler's FailedScheduling message), or None."""
        reasons: list[str] = []
        selector = spec.get("nodeSelector") or {}
        if self.node_labels is not None and any(self.node_labels.get(k) != v for k, v in selector.items()):
            reasons.append("1 node(s) didn't match Pod's node affinity/selector")
        if self.allocatable is not None:
            wanted: dict[str, int] = {}
            for c in spec.get("containers") or []:
                resources = c.get("resources") or {}
                for kind in ("limits", "requests"):
                    for res, value in (resources.get(kind) or {}).items():
                        if "/" in res:  # extended resources (nvidia.com/gpu): whole numbers
                            wanted[res] = max(wanted.get(res, 0), int(str(value)))
            for res, count in sorted(wanted.items()):
                if count > int(self.allocatable.get(res, 0)):
                    reasons.append(f"1 Insufficient {res}")
        if not reasons:
            return None
        return f"0/1 nodes are available: {', '.join(reasons)}. preemption: 0/1 nodes are available: " + (
            "1 No preemption victims found for incoming pod."
        )

    def api_get(self, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            pod = self._pods.get((namespace, name))
            if pod is None:
                raise _not_found("pods", name)
            return copy.deepcopy(pod.obj)

    def api_list(self, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        try:
            terms = parse_label_selector(query.get("labelSelector", ""))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        fields = query.get("fieldSelector", "")
        with self._cond:
            items = []
            for (ns, _), pod in self._pods.items():
                if namespace is not None and ns != namespace:
                    continue
                if not match_labels(pod.obj["metadata"].get("labels") or {}, terms):
                    continue
                try:
                    if fields and not _match_fields(pod.obj, fields):
                        continue
                except ValueError as e:
                    raise ApiError(400, "BadRequest", str(e)) from None
                items.append(copy.deepcopy(pod.obj))
            return {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def api_events(self, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        fields = query.get("fieldSelector", "")
        try:
            terms = parse_label_selector(query.get("labelSelector", ""))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        with self._cond:
            items = []
            for event in self._events:
                if namespace is not None and event["metadata"]["namespace"] != namespace:
                    continue
                if not match_labels(event["metadata"].get("labels") or {}, terms):
                    continue
                try:
                    if fields and not _match_fields(event, fields):
                        continue
                except ValueError as e:
                    raise ApiError(400, "BadRequest", str(e)) from None
                items.append(copy.deepcopy(event))
            return {
                "kind": "EventList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def api_patch(self, namespace: str, name: str, content_type: str, patch: Any) -> dict[str, Any]:
        with self._cond:
            pod = self._pods.get((namespace, name))
            if pod is None:
                raise _not_found("pods", name)
            if "json-patch" in content_type:
                if not isinstance(patch, list):
                    raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
                patched = _json_patch(pod.obj, patch)
            elif isinstance(patch, dict):
                # merge-patch+json, and strategic-merge-patch+json taken as a merge (enough for metadata)
                patched = _merge_patch(pod.obj, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch {content_type!r}")
            if patched.get("spec") != pod.obj["spec"]:
                raise ApiError(
                    422,
                    "Invalid",
                    f'Pod "{name}" is invalid: spec: Forbidden: pod updates may '
                    "not change fields other than image and activeDeadlineSeconds",
                )
            patched["status"] = pod.obj["status"]
            patched["metadata"]["uid"] = pod.obj["metadata"]["uid"]
            patched["metadata"]["name"] = name
            patched["metadata"]["namespace"] = namespace
            pod.obj = patched
            self._touch(pod)
            return copy.deepcopy(pod.obj)

    def api_delete(self, namespace: str, name: str, grace: float | None) -> dict[str, Any]:
        with self._cond:
            pod = self._pods.get((namespace, name))
            if pod is None:
                raise _not_found("pods", name)
            if grace is None:
                grace = self._grace(pod, None)
            meta = pod.obj["metadata"]
            if pod.finished:
                del self._pods[(namespace, name)]
                pod.kill_requested.set()
                self._cond.notify_all()
                meta.setdefault("deletionTimestamp", _rfc3339())
                meta.setdefault("deletionGracePeriodSeconds", 0)
                return copy.deepcopy(pod.obj)
            pod.delete_when_done = True
            if "deletionTimestamp" not in meta:
                meta["deletionTimestamp"] = _rfc3339(_now() + _dt.timedelta(seconds=grace))
                meta["deletionGracePeriodSeconds"] = int(grace)
            self._touch(pod)
            out = copy.deepcopy(pod.obj)
        self._terminate(pod, grace)
        return out

    # ---------------------------------------------------------------------------------- kubelet

    def _terminate(self, pod: _Pod, grace: float) -> None:
        """SIGTERM the process group now, SIGKILL after ``grace`` seconds (in a thread)."""
        with self._cond:
            if pod.terminating or pod.finished:
                if grace == 0 and pod.proc is not None and pod.proc.poll() is None:
                    _killpg(pod.proc, signal.SIGKILL)
                return
            pod.terminating = True
            self._event(pod, "Killing", f"Stopping container {pod.container['name']}")
            if not pod.started:  # never started: it will not start
                pod.kill_requested.set()
                if pod.stuck:
                    self._finish_unstarted(pod)
                self._cond.notify_all()
                return

        def kill() -> None:
            proc = pod.proc
            if proc is None:
                return
            if grace > 0:
                _killpg(proc, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            if proc.poll() is None:
                _killpg(proc, signal.SIGKILL)

        pod.killer = threading.Thread(target=kill, name=f"kill-{pod.key[1]}", daemon=True)
        pod.killer.start()

    def _waiting(self, pod: _Pod, reason: str, message: str, type_: str = "Warning") -> None:
        with self._cond:
            self._container_status(pod, {"waiting": {"reason": reason, "message": message}}, ready=False, started=False)
            self._event(
                pod, "Failed", f"Error: {reason}: {message}" if reason != "ErrImageNeverPull" else message, type_
            )
            self._touch(pod)

    def _run_pod(self, pod: _Pod) -> None:
        if self.start_delay:
            pod.kill_requested.wait(self.start_delay)
        with self._cond:
            if pod.kill_requested.is_set() or self._stopping:
                self._finish_unstarted(pod)
                return
            try:
                argv, env, cwd, term_file = self._prepare(pod)
            except _ContainerWaiting as w:
                pod.stuck = True
                self._waiting(pod, w.reason, w.message)
                return
            image = pod.container.get("image", "")
            self._event(pod, "Pulled", f'Container image "{image}" already present on machine')
            self._event(pod, "Created", f"Created container: {pod.container['name']}")
            started_at = _rfc3339()
            pod.started = True
            try:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                self._event(pod, "Failed", f"Error: failed to create containerd task: {e}", "Warning")
                self._append_log(pod, f"exec {argv[0] if argv else ''!r}: {e.strerror or e}\n".encode())
                self._finish(
                    pod,
                    exit_code=128,
                    reason="StartError",
                    started_at=started_at,
                    term_file=term_file,
                    start_error=str(e),
                )
                return
            pod.proc = proc
            self._event(pod, "Started", f"Started container {pod.container['name']}")
            pod.obj["status"]["phase"] = "Running"
            self._set_conditions(pod, ready=True)
            self._container_status(pod, {"running": {"startedAt": started_at}}, ready=True, started=True)
            self._touch(pod)
        reader = threading.Thread(target=self._read_output, args=(pod, proc), daemon=True)
        reader.start()
        code = proc.wait()
        _killpg(proc, signal.SIGKILL)  # what is left of the container's processes goes with it
        reader.join(timeout=5)
        exit_code = code if code >= 0 else 128 - code
        with self._cond:
            reason = "Completed" if exit_code == 0 else "Error"
            self._finish(pod, exit_code=exit_code, reason=reason, started_at=started_at, term_file=term_file)

    def _read_output(self, pod: _Pod, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in iter(proc.stdout.readline, b""):
                with self._cond:
                    self._append_log(pod, line)

    def _append_log(self, pod: _Pod, line: bytes) -> None:
        pod.log.append((time.time_ns(), line))
        self._cond.notify_all()

    def _finish_unstarted(self, pod: _Pod) -> None:
        pod.started = True
        pod.finished = True
        pod.obj["status"]["phase"] = "Failed"
        self._set_conditions(pod, ready=False, reason="PodFailed")
        self._container_status(
            pod,
            {
                "terminated": {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the pod was terminated",
                    "startedAt": None,
                    "finishedAt": _rfc3339(),
                }
            },
            ready=False,
            started=False,
        )
        self._done(pod)

    def _finish(
        self,
        pod: _Pod,
        *,
        exit_code: int,
        reason: str,
        started_at: str,
        term_file: Path,
        start_error: str | None = None,
    ) -> None:
        message = start_error or _read_termination_message(term_file)
        policy = pod.container.get("terminationMessagePolicy", "File")
        if not message and exit_code != 0 and policy == "FallbackToLogsOnError":
            message = _tail(b"".join(line for _, line in pod.log))
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": _rfc3339(),
            "containerID": pod.obj["metadata"]["annotations"]["kubeapi.podtrain.test/container-id"],
        }
        if message:
            terminated["message"] = message
        evicted = pod.obj["status"].get("reason") == "Evicted"
        phase = "Succeeded" if exit_code == 0 and not evicted else "Failed"
        pod.obj["status"]["phase"] = phase
        self._set_conditions(pod, ready=False, reason="PodCompleted" if phase == "Succeeded" else "PodFailed")
        self._container_status(pod, {"terminated": terminated}, ready=False, started=False)
        pod.finished = True
        self._done(pod)

    def _done(self, pod: _Pod) -> None:
        self._touch(pod)
        if pod.delete_when_done and self._pods.get(pod.key) is pod:
            del self._pods[pod.key]
            self._cond.notify_all()

    def _prepare(self, pod: _Pod) -> tuple[list[str], dict[str, str], str, Path]:
        """argv, env, cwd and the local termination-message file of the pod's container."""
        meta, _spec, c = pod.obj["metadata"], pod.obj["spec"], pod.container
        ns = meta["namespace"]
        fill = {"pod_dir": str(pod.dir), "pod_name": meta["name"], "namespace": ns}

        def subst(text: str) -> str:
            return text.format(**fill) if "{" in text else text

        mounts = self._mounts(pod)  # container path -> local path
        mounts.update({k: subst(v) for k, v in self.paths.items()})
        term_path = c.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
        term_file = pod.dir / "termination-log"
        term_file.write_bytes(b"")

        env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOSTNAME": meta["name"],
            "HOME": str(pod.dir),
        }
        image = self.images.get(c.get("image", ""))
        env.update({k: _rewrite(subst(v), mounts) for k, v in self.extra_env.items()})
        if image is not None:
            env.update({k: _rewrite(subst(v), mounts) for k, v in (image.get("env") or {}).items()})
        env.update(self._env_from(c, ns))
        for var in c.get("env") or []:
            value = self._env_value(pod, var, env)
            if value is not None:
                env[var["name"]] = _rewrite(value, mounts)
        if env.get("PODTRAIN_TERMINATION_LOG") in (None, term_path):
            env["PODTRAIN_TERMINATION_LOG"] = str(term_file)
        env.update({k: subst(v) for k, v in self.env_overrides.items()})

        command = list(c.get("command") or [])
        args = list(c.get("args") or [])
        if not command:  # the image's ENTRYPOINT, and its CMD unless the pod gives args
            if image is None:
                raise _ContainerWaiting(
                    "ErrImageNeverPull",
                    f'Container image "{c.get("image", "")}" is not present with pull policy of Never '
                    "(no local entrypoint is mapped for it)",
                )
            command = list(image.get("entrypoint") or [])
            if not args:
                args = list(image.get("cmd") or [])
        if not command + args:
            raise _ContainerWaiting("CreateContainerError", "no command specified")
        argv = [_rewrite(_expand(a, env), mounts) for a in command + args]
        cwd = str(self.cwd) if self.cwd is not None else str(pod.dir)
        workdir = c.get("workingDir") or (image or {}).get("workdir")
        if workdir and _rewrite(workdir, mounts) != workdir:  # a container directory that is mapped here
            cwd = _rewrite(workdir, mounts)
        return argv, env, cwd, term_file

    def _env_from(self, c: Mapping[str, Any], ns: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, store in (("secretRef", self.secrets), ("configMapRef", self.config_maps)):
                ref = source.get(kind)
                if ref is None:
                    continue
                data = store.get((ns, ref.get("name", "")))
                if data is None:
                    if ref.get("optional"):
                        continue
                    what = "secret" if kind == "secretRef" else "configmap"
                    raise _ContainerWaiting("CreateContainerConfigError", f'{what} "{ref.get("name")}" not found')
                env.update({prefix + k: v for k, v in data.items()})
        return env

    def _env_value(self, pod: _Pod, var: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
        if "value" in var and var["value"] is not None:
            return _expand(str(var["value"]), env)
        source = var.get("valueFrom")
        if not source:
            return ""
        meta, ns = pod.obj["metadata"], pod.obj["metadata"]["namespace"]
        if "fieldRef" in source:
            path = source["fieldRef"].get("fieldPath", "")
            m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
            if m:
                return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
            value = {
                "metadata.name": meta["name"],
                "metadata.namespace": ns,
                "metadata.uid": meta["uid"],
                "spec.nodeName": self.node_name,
                "spec.serviceAccountName": pod.obj["spec"].get("serviceAccountName", "default"),
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
            }.get(path)
            if value is None:
                raise _ContainerWaiting("CreateContainerConfigError", f"unsupported fieldPath {path!r}")
            return value
        for kind, store, what in (
            ("secretKeyRef", self.secrets, "secret"),
            ("configMapKeyRef", self.config_maps, "configmap"),
        ):
            if kind in source:
                ref = source[kind]
                data = store.get((ns, ref.get("name", "")))
                if data is None or ref.get("key") not in data:
                    if ref.get("optional"):
                        return None
                    detail = (
                        f'{what} "{ref.get("name")}" not found'
                        if data is None
                        else f"couldn't find key {ref.get('key')} in {what.capitalize()} {ns}/{ref.get('name')}"
                    )
                    raise _ContainerWaiting("CreateContainerConfigError", detail)
                return data[ref["key"]]
        if "resourceFieldRef" in source:
            resource = source["resourceFieldRef"].get("resource", "")
            kind, _, res = resource.partition(".")
            resources = pod.container.get("resources") or {}
            value = (resources.get(kind) or {}).get(res) or (resources.get("requests") or {}).get(res)
            return "0" if value is None else str(value)
        return ""

    def _mounts(self, pod: _Pod) -> dict[str, str]:
        """Create the local directory of every volume mount; container path -> local path."""
        ns = pod.obj["metadata"]["namespace"]
        volumes = {v.get("name"): v for v in pod.obj["spec"].get("volumes") or []}
        mounts: dict[str, str] = {}
        for vm in pod.container.get("volumeMounts") or []:
            path = vm.get("mountPath", "")
            if not path or path == "/dev" or path.startswith("/dev/"):
                continue
            volume = volumes.get(vm.get("name")) or {}
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"].get("claimName", vm["name"])
                local = self.directory / "pvc" / ns / claim
            else:
                local = pod.dir / "volumes" / vm["name"]
            local.mkdir(parents=True, exist_ok=True)
            for kind, store, key in (("secret", self.secrets, "secretName"), ("configMap", self.config_maps, "name")):
                if kind in volume:
                    data = store.get((ns, volume[kind].get(key, ""))) or {}
                    items = volume[kind].get("items")
                    pairs = [(i["key"], i.get("path", i["key"])) for i in items] if items else [(k, k) for k in data]
                    for k, rel in pairs:
                        if k in data:
                            (local / rel).parent.mkdir(parents=True, exist_ok=True)
                            (local / rel).write_text(data[k])
            target = local / vm["subPath"] if vm.get("subPath") else local
            mounts[path.rstrip("/") or "/"] = str(target)
        return mounts

    # -------------------------------------------------------------------------------------- log

    def api_log(self, namespace: str, name: str, query: Mapping[str, str]) -> tuple[_Pod, dict[str, Any]]:
        with self._cond:
            pod = self._pods.get((namespace, name))
            if pod is None:
                raise _not_found("pods", name)
            names = [c["name"] for c in pod.obj["spec"]["containers"]]
            container = query.get("container") or (names[0] if len(names) == 1 else None)
            if container is None:
                raise ApiError(
                    400, "BadRequest", f"a container name must be specified for pod {name}, choose one of: {names}"
                )
            if container not in names:
                raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
            if container != pod.container["name"]:
                raise ApiError(
                    400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: PodInitializing'
                )
            if not pod.started:
                state = pod.obj["status"]["containerStatuses"][0]["state"].get("waiting") or {}
                raise ApiError(
                    400,
                    "BadRequest",
                    f'container "{container}" in pod "{name}" is waiting to start: '
                    f"{state.get('reason', 'ContainerCreating')}",
                )
            if _flag(query, "previous"):
                raise ApiError(
                    400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found'
                )
        opts: dict[str, Any] = {
            "follow": _flag(query, "follow"),
            "timestamps": _flag(query, "timestamps"),
            "since_ns": None,
            "tail": None,
            "limit": None,
        }
        try:
            if query.get("sinceSeconds"):
                opts["since_ns"] = time.time_ns() - int(query["sinceSeconds"]) * 1_000_000_000
            elif query.get("sinceTime"):
                opts["since_ns"] = int(_parse_time(query["sinceTime"]) * 1_000_000_000)
            if query.get("tailLines"):
                opts["tail"] = int(query["tailLines"])
            if query.get("limitBytes"):
                opts["limit"] = int(query["limitBytes"])
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        return pod, opts

    def log_chunks(self, pod: _Pod, opts: Mapping[str, Any]) -> Iterator[bytes]:
        """The pod log as the API sends it; a followed log ends when the container has terminated."""

        def render(entries: Sequence[tuple[int, bytes]]) -> bytes:
            if opts["timestamps"]:
                return b"".join(_rfc3339_nano(ts).encode() + b" " + line for ts, line in entries)
            return b"".join(line for _, line in entries)

        with self._cond:
            entries = [e for e in pod.log if opts["since_ns"] is None or e[0] >= opts["since_ns"]]
            if opts["tail"] is not None:
                entries = entries[-opts["tail"] :] if opts["tail"] > 0 else []
            index = len(pod.log)
        sent = 0
        limit = opts["limit"]
        first = render(entries)
        if first:
            if limit is not None:
                first = first[:limit]
            sent += len(first)
            yield first
        if not opts["follow"]:
            return
        while True:
            with self._cond:
                while len(pod.log) == index and not pod.finished and not self._stopping:
                    self._cond.wait(0.5)
                new = pod.log[index:]
                index = len(pod.log)
                over = (pod.finished or self._stopping) and not new
            if new:
                chunk = render(new)
                if limit is not None:
                    chunk = chunk[: max(0, limit - sent)]
                    if not chunk:
                        return
                sent += len(chunk)
                yield chunk
            if over:
                return


class Preempter(threading.Thread):
    """The thread of :meth:`KubeAPIServer.preempt_when`: ``preempted`` lists the pods it preempted (in order),
    ``error`` what stopped it early (a timeout, the server stopping); :meth:`join` it to wait for all."""

    def __init__(
        self,
        kube: KubeAPIServer,
        *,
        pattern: re.Pattern[str],
        namespace: str,
        label_selector: str,
        count: int,
        timeout: float,
        preempt_kwargs: Mapping[str, Any],
    ):
        super().__init__(name="preempter", daemon=True)
        self.kube, self.pattern, self.namespace = kube, pattern, namespace
        self.terms = parse_label_selector(label_selector)
        self.count, self.timeout, self.preempt_kwargs = count, timeout, dict(preempt_kwargs)
        self.preempted: list[str] = []
        self.error: BaseException | None = None

    def _candidate(self) -> _Pod | None:
        kube = self.kube
        for (ns, name), pod in kube._pods.items():
            if (
                ns == self.namespace
                and name not in self.preempted
                and pod.proc is not None
                and not pod.finished
                and not pod.terminating
                and match_labels(pod.obj["metadata"].get("labels") or {}, self.terms)
                and self.pattern.search(b"".join(line for _, line in pod.log).decode(errors="replace"))
            ):
                return pod
        return None

    def run(self) -> None:
        kube = self.kube
        try:
            while len(self.preempted) < self.count:
                found: list[_Pod] = []

                def ready(found: list[_Pod] = found) -> bool:
                    if kube._stopping:
                        raise RuntimeError("the server stopped")
                    pod = self._candidate()
                    if pod is not None:
                        found.append(pod)
                    return pod is not None

                kube.wait_for(ready, self.timeout, f"a pod whose log matches {self.pattern.pattern!r}")
                namespace, name = found[0].key
                self.preempted.append(name)
                kube.preempt(namespace, name, **self.preempt_kwargs)
        except BaseException as e:  # reported to the test through .error
            self.error = e


class _ContainerWaiting(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ------------------------------------------------------------------------------------------ helpers


def _flag(query: Mapping[str, str], key: str) -> bool:
    """A boolean query parameter (the Python client sends ``True``/``False``, kubectl ``true``)."""
    return query.get(key, "").lower() in ("true", "1")


def _killpg(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _qos_class(containers: Sequence[Mapping[str, Any]]) -> str:
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        for res in ("cpu", "memory"):
            if res not in limits or requests.get(res, limits[res]) != limits[res]:
                return "Burstable"
    return "Guaranteed"


def _read_termination_message(path: Path) -> str:
    try:
        data = path.read_bytes()[:MAX_TERMINATION_MESSAGE]
    except OSError:
        return ""
    return data.decode(errors="replace")


def _tail(log: bytes) -> str:
    lines = log.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
    data = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return data.decode(errors="replace")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a defined variable is replaced, ``$$`` is ``$``, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def _rewrite(text: str, mounts: Mapping[str, str]) -> str:
    """Replace container paths (``/data``, ``/data/x``, ``--d=/data``, ``file:///data``) with local ones."""
    for path in sorted(mounts, key=len, reverse=True):
        if path == "/":
            continue
        pattern = re.compile(r"(?:(?<=file://)|(?<![\w.\-/:~$]))" + re.escape(path) + r"(?=/|$|[^\w.\-])")
        text = pattern.sub(mounts[path].replace("\\", "\\\\"), text)
    return text


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (a ``None`` value removes the key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _json_patch(target: dict[str, Any], ops: Sequence[Mapping[str, Any]]) -> dict[str, Any]:  # noqa: PLR0912
    """RFC 6902 JSON patch: add, replace, remove, test."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op.get("path", "")).split("/")[1:]]
        if not parts:
            raise ApiError(422, "Invalid", "a JSON patch path must not be empty")
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        kind = op.get("op")
        try:
            if kind in ("add", "replace"):
                if isinstance(parent, list):
                    if last == "-":
                        parent.append(op["value"])
                    elif kind == "add":
                        parent.insert(int(last), op["value"])
                    else:
                        parent[int(last)] = op["value"]
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = op["value"]
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind == "test":
                value = parent[int(last)] if isinstance(parent, list) else parent[last]
                if value != op.get("value"):
                    raise ApiError(422, "Invalid", f"test failed at {op.get('path')}")
            else:
                raise ApiError(422, "Invalid", f"unsupported JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError):
            raise ApiError(422, "Invalid", f"JSON patch path {op.get('path')!r} not found") from None
    return doc


# ----------------------------------------------------------------------------------------- HTTP


_POD_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)(?:/(status|log))?/?")
_PODS_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/?")
_EVENTS_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/events/?")


class _Handler(BaseHTTPRequestHandler):
    kube: KubeAPIServer
    protocol_version = "HTTP/1.1"
    server_version = "kubeapi-test"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # one entry per verb
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        kube = self.kube
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        with kube._cond:
            kube.requests.append((method, self.path))
        try:
            body = self._body()
            if _flag(query, "watch"):
                raise ApiError(400, "BadRequest", "watch is not supported by this test server")
            self._route(method, path, query, body)
        except ApiError as e:
            self._json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug here must reach the client as a 500, not a hung request
            self._json(500, ApiError(500, "InternalError", f"{type(e).__name__}: {e}").status())

    def _route(self, method: str, path: str, query: Mapping[str, str], body: Any) -> None:
        kube = self.kube
        simple: dict[str, Callable[[], Any]] = {
            "/version": lambda: _VERSION,
            "/api/v1/pods": lambda: kube.api_list(None, query),
            "/api/v1/events": lambda: kube.api_events(None, query),
        }
        if path.rstrip("/") in simple:
            self._only(method, "GET")
            self._json(200, simple[path.rstrip("/")]())
        elif path in ("/healthz", "/livez", "/readyz"):
            self._only(method, "GET")
            self._text(200, b"ok")
        elif m := _POD_PATH.fullmatch(path):
            self._pod(method, *m.groups(), query=query, body=body)
        elif m := _PODS_PATH.fullmatch(path):
            self._only(method, "GET", "POST")
            if method == "GET":
                self._json(200, kube.api_list(m.group(1), query))
            else:
                self._json(201, kube.api_create(m.group(1), body))
        elif m := _EVENTS_PATH.fullmatch(path):
            self._only(method, "GET")
            self._json(200, kube.api_events(m.group(1), query))
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")

    def _pod(self, method: str, ns: str, name: str, sub: str | None, *, query: Mapping[str, str], body: Any) -> None:
        kube = self.kube
        if sub == "log":
            self._only(method, "GET")
            pod, opts = kube.api_log(ns, name, query)
            self._stream(kube.log_chunks(pod, opts), chunked=opts["follow"])
            return
        self._only(method, *(("GET",) if sub else ("GET", "PATCH", "DELETE")))
        if method == "GET":
            self._json(200, kube.api_get(ns, name))
        elif method == "PATCH":
            ctype = self.headers.get("Content-Type", "application/merge-patch+json")
            self._json(200, kube.api_patch(ns, name, ctype, body))
        else:
            grace = query.get("gracePeriodSeconds")
            if grace is None and isinstance(body, dict):
                grace = body.get("gracePeriodSeconds")
            self._json(200, kube.api_delete(ns, name, None if grace in (None, "") else float(grace)))

    def _only(self, method: str, *allowed: str) -> None:
        if method not in allowed:
            raise ApiError(
                405,
                "MethodNotAllowed",
                f"the server does not allow this method on the requested resource "
                f"({method} {urlsplit(self.path).path})",
            )

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not JSON") from None

    def _json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _text(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks: Iterator[bytes], *, chunked: bool) -> None:
        if not chunked:
            self._text(200, b"".join(chunks))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
