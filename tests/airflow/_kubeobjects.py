"""The objects both halves of the test Kubernetes share: the one node, its pods, events, Secrets and ConfigMaps,
the JobSets, the Jobs (theirs and those a client created), the Services, and the host names pods answer to.

The API server half (``kubeapi.py``, ``_kubepods.py``, ``_kubehttp.py``, ``_kubedisruption.py``) writes these
objects as requests arrive; the kubelet half (``_kubelet.py``, ``_kubecontainer.py``) writes the same pods' status
as their processes start and end. As in Kubernetes, the objects are all the halves share: both read and write
them only under :attr:`Cluster.cond`, and every change notifies it, so a waiter (a followed log,
:meth:`Cluster.wait_for`) wakes on a change from either half. Also here, because both halves read them: RFC 3339
time stamps, label and field selectors, and :class:`ApiError` (a Kubernetes ``Status``). The JobSet and Job
controllers (``_kubejobsets.py``, ``_kubejobs.py``) keep their objects here too, under the same condition, since
they react to the pods' status.
"""

from __future__ import annotations

import datetime as _dt
import re
import secrets as _secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_NODE = "podtrain-test-node"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
CONTAINER_ID = "kubeapi.podtrain.test/container-id"  # the annotation holding the pod's containerID
POD_IP = "127.0.0.1"  # every pod's address: they all run on this machine


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def rfc3339(t: _dt.datetime | None = None) -> str:
    return (t or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac:09d}Z"


def parse_time(text: str) -> float:
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


def match_fields(obj: Mapping[str, Any], selector: str) -> bool:
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


def not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind})


# --------------------------------------------------------------------------------------------- objects


@dataclass
class Node:
    """The one node's settings (see :class:`~kubeapi.KubeAPIServer`'s parameters): the scheduler (``_kubepods.py``)
    reads its name, ``allocatable`` and labels; the kubelet its name and the rest."""

    name: str
    directory: Path
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    env_overrides: dict[str, str] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    start_delay: float = 0.0
    allocatable: dict[str, int | str] | None = None
    node_labels: dict[str, str] | None = None
    # A container runtime (``_kubepodman.Podman``: prepare, signal, remove) that runs pods in real images; None runs
    # each container as a local process (``_kubecontainer.py``).
    runtime: Any = None


class Pod:
    """One pod: its API object, its process and its log. Guarded by :attr:`Cluster.cond`."""

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
        self.started_ns: int | None = None  # when the process was started, and when it was seen to end
        self.finished_ns: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.obj["metadata"]["namespace"], self.obj["metadata"]["name"]

    @property
    def container(self) -> dict[str, Any]:
        return self.obj["spec"]["containers"][0]

    def grace(self, override: float | None) -> float:
        """``override``, else the pod's ``terminationGracePeriodSeconds`` (Kubernetes' default 30)."""
        if override is not None:
            return float(override)
        value = self.obj["spec"].get("terminationGracePeriodSeconds")
        return 30.0 if value is None else float(value)


class Job:
    """One batch/v1 Job (a JobSet's, or one a client created): its API object and, per completion index, the pod
    that runs it now. Guarded by :attr:`Cluster.cond`; the Job controller (``_kubejobs.py``) writes it, and the
    JobSet controller (``_kubejobsets.py``) deletes its own. ``deleting``: the ``propagationPolicy`` of a client's
    foreground delete, which the Job controller finishes once the Job's pods are gone."""

    def __init__(self, obj: dict[str, Any]):
        self.obj = obj
        self.deleting: str | None = None
        self.pods: dict[int, Pod] = {}  # completion index -> its current pod
        self.counted: set[str] = set()  # uids of the pods whose end the Job has counted
        self.succeeded: set[int] = set()  # completion indexes done
        self.failed = 0  # pods counted against backoffLimit

    @property
    def key(self) -> tuple[str, str]:
        return self.obj["metadata"]["namespace"], self.obj["metadata"]["name"]


class Cluster:
    """The node and every object, under :attr:`cond`: pods by key (and every pod ever made, deleted ones too, for
    the tests' assertions), events, Secrets and ConfigMaps (decoded), the resource version; JobSets (and the last
    object of each deleted one), Jobs (likewise), Services (likewise), and :attr:`hosts`: the pods' DNS names
    (``<hostname>.<subdomain>``, ``...<ns>.svc``, ``...svc.cluster.local``) -> the address they resolve to, which
    ``_kubecontainer.py`` writes in place of such a name in a container's env and argv."""

    def __init__(self, node: Node):
        self.node = node
        self.cond = threading.Condition()
        self.pods: dict[tuple[str, str], Pod] = {}
        self.all_pods: list[Pod] = []
        self.events: list[dict[str, Any]] = []
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        self.jobsets: dict[tuple[str, str], dict[str, Any]] = {}
        self.deleted_jobsets: dict[tuple[str, str], dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], Job] = {}
        self.deleted_jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.deleted_services: dict[tuple[str, str], dict[str, Any]] = {}
        self.jobset_hosts: dict[str, str] = {}
        self.rv = 1000
        self.stopping = False

    @property
    def hosts(self) -> dict[str, str]:
        """The names the JobSet controller publishes for its pods (whether or not a Service exists, as
        ``_kubejobsets.py`` says), and those of every other pod with a ``hostname`` and a ``subdomain`` that names a
        headless Service (``clusterIP: None``) of its namespace whose selector matches the pod's labels, as CoreDNS
        answers from the EndpointSlices: not once the pod has ended, and before it runs (here: is ready) only under
        ``publishNotReadyAddresses``. Every pod is ``POD_IP``."""
        with self.cond:
            names = dict(self.jobset_hosts)
            for pod in self.pods.values():
                spec, meta = pod.obj["spec"], pod.obj["metadata"]
                service = self.services.get((meta["namespace"], spec.get("subdomain") or ""))
                if not spec.get("hostname") or service is None or service["spec"].get("clusterIP") != "None":
                    continue
                selector = service["spec"].get("selector") or {}
                labels = meta.get("labels") or {}
                if not selector or any(labels.get(k) != v for k, v in selector.items()):
                    continue
                phase = pod.obj["status"].get("phase")
                if phase in ("Succeeded", "Failed") or (
                    phase != "Running" and not service["spec"].get("publishNotReadyAddresses")
                ):
                    continue
                host = f"{spec['hostname']}.{spec['subdomain']}"
                svc = f"{host}.{meta['namespace']}.svc"
                names.update({host: POD_IP, svc: POD_IP, f"{svc}.cluster.local": POD_IP})
            return names

    @hosts.setter
    def hosts(self, value: Mapping[str, str]) -> None:  # the JobSet controller's names, published whole
        self.jobset_hosts = dict(value)

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def touch(self, pod: Pod) -> None:
        pod.obj["metadata"]["resourceVersion"] = self.next_rv()
        self.cond.notify_all()

    def find(self, namespace: str, name: str, deleted: bool) -> Pod:
        pod = self.pods.get((namespace, name))
        if pod is None and deleted:
            pod = next((p for p in reversed(self.all_pods) if p.key == (namespace, name)), None)
        if pod is None:
            raise KeyError(f"no pod {namespace}/{name}")
        return pod

    def done(self, pod: Pod) -> None:
        """The pod's final status is written: publish it, and delete the object if a delete waited for that."""
        self.touch(pod)
        if pod.delete_when_done and self.pods.get(pod.key) is pod:
            del self.pods[pod.key]
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
                self.cond.wait(min(left, 0.2))

    def event(
        self,
        pod: Pod,
        reason: str,
        message: str,
        type_: str = "Normal",
        *,
        component: str = "kubelet",
        field_path: str | None = "container",
    ) -> None:
        if field_path == "container":
            field_path = f"spec.containers{{{pod.container['name']}}}"
        self.object_event(pod.obj, reason, message, type_, component=component, field_path=field_path)

    def object_event(
        self,
        obj: Mapping[str, Any],
        reason: str,
        message: str,
        type_: str = "Normal",
        *,
        component: str,
        field_path: str | None = None,
    ) -> None:
        """An event about any object (a pod, a JobSet), from ``component`` (``kubelet``: on this node)."""
        meta = obj["metadata"]
        stamp = rfc3339()
        involved = {
            "kind": obj.get("kind", "Pod"),
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
            "apiVersion": obj.get("apiVersion", "v1"),
            "resourceVersion": meta.get("resourceVersion"),
        }
        if field_path:
            involved["fieldPath"] = field_path
        kubelet = component == "kubelet"
        self.events.append(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{_secrets.token_hex(8)}",
                    "namespace": meta["namespace"],
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": self.next_rv(),
                    "creationTimestamp": stamp,
                },
                "involvedObject": involved,
                "reason": reason,
                "message": message,
                "source": {"component": component, **({"host": self.node.name} if kubelet else {})},
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
                "type": type_,
                "eventTime": None,
                "reportingComponent": component,
                "reportingInstance": self.node.name if kubelet else "",
            }
        )
        self.cond.notify_all()
