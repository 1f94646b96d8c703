"""The API server's operations on pods and events: what each core/v1 endpoint does to the cluster's objects.

Each ``api_*`` method takes what the request carried and returns the JSON object the endpoint answers, or raises
:class:`~_kubeobjects.ApiError` (a ``Status``); ``_kubehttp.py`` maps requests onto them and ``kubeapi.py``'s
:class:`~kubeapi.KubeAPIServer` inherits them (tests call them directly too). They are cut from the server's
lifecycle and test controls because they are the REST surface, one method per endpoint, and from the kubelet
because they only change objects: a create admits the pod to the kubelet, a delete asks it to terminate the
process, a log read asks it for the log; nothing here touches a process.

* create: ``generateName``, defaults (``restartPolicy``, ``terminationGracePeriodSeconds``, the containers'
  ``terminationMessagePath``/``Policy``), ``qosClass``, a container ID; 409 for a name taken, 422 without
  containers. Scheduling: every pod lands on the one node, unless the node's ``allocatable``/``node_labels`` are
  given and the pod's extended resources (``nvidia.com/gpu``) or ``nodeSelector`` do not fit: then it stays
  ``Pending`` with ``PodScheduled: False``, reason ``Unschedulable``, and a ``FailedScheduling`` event, as on a
  cluster without such a node.
* list (pods, events): ``labelSelector`` and ``fieldSelector``, in one namespace or all.
* patch: JSON merge, strategic merge (as a merge) and JSON patch; the spec may not change.
* delete: graceful, the grace from the request or else the pod's ``terminationGracePeriodSeconds``; the object goes
  once the container is gone.
* log: ``container``, ``follow``, ``timestamps``, ``sinceSeconds``, ``sinceTime``, ``tailLines``, ``limitBytes``;
  400 while the container has not started.
"""

from __future__ import annotations

import copy
import datetime as _dt
import secrets as _secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from _kubelet import Kubelet
from _kubeobjects import (
    CONTAINER_ID,
    DEFAULT_TERMINATION_MESSAGE_PATH,
    ApiError,
    Cluster,
    Pod,
    match_fields,
    match_labels,
    not_found,
    now,
    parse_label_selector,
    parse_time,
    rfc3339,
)


class PodsAPI:
    """The pod and event endpoints' operations on ``cluster``, with ``kubelet`` running the pods."""

    cluster: Cluster
    kubelet: Kubelet

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
        cluster, node = self.cluster, self.cluster.node
        with cluster.cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise ApiError(422, "Invalid", "Pod is invalid: metadata.name: Required value")
                meta["name"] = meta["generateName"] + _secrets.token_hex(3)[:5]
            name = meta["name"]
            if (namespace, name) in cluster.pods:
                raise ApiError(409, "AlreadyExists", f'pods "{name}" already exists', {"name": name, "kind": "pods"})
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = rfc3339()
            meta.setdefault("labels", {})
            meta["annotations"] = dict(meta.get("annotations") or {})
            meta["annotations"][CONTAINER_ID] = "containerd://" + _secrets.token_hex(32)
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("serviceAccountName", "default")
            unschedulable = self._unschedulable(spec)
            if unschedulable is None:
                spec["nodeName"] = node.name
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
                        "startTime": rfc3339(),
                    }
                )
            directory = node.directory / "pods" / namespace / name
            if directory.exists():  # a deleted pod of the same name ran here before
                directory = node.directory / "pods" / namespace / f"{name}-{meta['uid'][:8]}"
            directory.mkdir(parents=True)
            pod = Pod(obj, directory)
            cluster.pods[(namespace, name)] = pod
            cluster.all_pods.append(pod)
            if unschedulable is not None:
                pod.stuck = True
                obj["status"]["conditions"] = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": unschedulable,
                        "lastProbeTime": None,
                        "lastTransitionTime": rfc3339(),
                    }
                ]
                cluster.touch(pod)
                cluster.event(
                    pod, "FailedScheduling", unschedulable, "Warning", component="default-scheduler", field_path=None
                )
                return copy.deepcopy(obj)
            self.kubelet.admit(pod)
            cluster.touch(pod)
            cluster.event(
                pod,
                "Scheduled",
                f"Successfully assigned {namespace}/{name} to {node.name}",
                component="default-scheduler",
                field_path=None,
            )
            created = copy.deepcopy(obj)
        self.kubelet.start(pod)
        return created

    def _unschedulable(self, spec: Mapping[str, Any]) -> str | None:
        """Why the one node cannot take the pod (the scheduler's FailedScheduling message), or None."""
        node = self.cluster.node
        reasons: list[str] = []
        selector = spec.get("nodeSelector") or {}
        if node.node_labels is not None and any(node.node_labels.get(k) != v for k, v in selector.items()):
            reasons.append("1 node(s) didn't match Pod's node affinity/selector")
        if node.allocatable is not None:
            wanted: dict[str, int] = {}
            for c in spec.get("containers") or []:
                resources = c.get("resources") or {}
                for kind in ("limits", "requests"):
                    for res, value in (resources.get(kind) or {}).items():
                        if "/" in res:  # extended resources (nvidia.com/gpu): whole numbers
                            wanted[res] = max(wanted.get(res, 0), int(str(value)))
            for res, count in sorted(wanted.items()):
                if count > int(node.allocatable.get(res, 0)):
                    reasons.append(f"1 Insufficient {res}")
        if not reasons:
            return None
        return f"0/1 nodes are available: {', '.join(reasons)}. preemption: 0/1 nodes are available: " + (
            "1 No preemption victims found for incoming pod."
        )

    def api_get(self, namespace: str, name: str) -> dict[str, Any]:
        with self.cluster.cond:
            pod = self.cluster.pods.get((namespace, name))
            if pod is None:
                raise not_found("pods", name)
            return copy.deepcopy(pod.obj)

    def api_list(self, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        pods = self.cluster.pods
        return self._list("PodList", lambda: (p.obj for (ns, _), p in pods.items() if namespace in (None, ns)), query)

    def api_events(self, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        events = self.cluster.events
        return self._list(
            "EventList", lambda: (e for e in events if namespace in (None, e["metadata"]["namespace"])), query
        )

    def _list(
        self, kind: str, objects: Callable[[], Iterable[dict[str, Any]]], query: Mapping[str, str]
    ) -> dict[str, Any]:
        """The ``kind`` list of ``objects()`` (read under the lock) that match the query's selectors."""
        try:
            terms = parse_label_selector(query.get("labelSelector", ""))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        fields = query.get("fieldSelector", "")
        with self.cluster.cond:
            items = []
            for obj in objects():
                if not match_labels(obj["metadata"].get("labels") or {}, terms):
                    continue
                try:
                    if fields and not match_fields(obj, fields):
                        continue
                except ValueError as e:
                    raise ApiError(400, "BadRequest", str(e)) from None
                items.append(copy.deepcopy(obj))
            return {
                "kind": kind,
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.cluster.rv)},
                "items": items,
            }

    def api_patch(self, namespace: str, name: str, content_type: str, patch: Any) -> dict[str, Any]:
        with self.cluster.cond:
            pod = self.cluster.pods.get((namespace, name))
            if pod is None:
                raise not_found("pods", name)
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
            self.cluster.touch(pod)
            return copy.deepcopy(pod.obj)

    def api_delete(self, namespace: str, name: str, grace: float | None) -> dict[str, Any]:
        cluster = self.cluster
        with cluster.cond:
            pod = cluster.pods.get((namespace, name))
            if pod is None:
                raise not_found("pods", name)
            if grace is None:
                grace = pod.grace(None)
            meta = pod.obj["metadata"]
            if pod.finished:
                del cluster.pods[(namespace, name)]
                pod.kill_requested.set()
                cluster.cond.notify_all()
                meta.setdefault("deletionTimestamp", rfc3339())
                meta.setdefault("deletionGracePeriodSeconds", 0)
                return copy.deepcopy(pod.obj)
            pod.delete_when_done = True
            if "deletionTimestamp" not in meta:
                meta["deletionTimestamp"] = rfc3339(now() + _dt.timedelta(seconds=grace))
                meta["deletionGracePeriodSeconds"] = int(grace)
            cluster.touch(pod)
            out = copy.deepcopy(pod.obj)
        self.kubelet.terminate(pod, grace)
        return out

    def api_log(self, namespace: str, name: str, query: Mapping[str, str]) -> tuple[Pod, dict[str, Any]]:
        """The pod and the options of its log read (for :meth:`~_kubelet.Kubelet.log_chunks`), once checked."""
        with self.cluster.cond:
            pod = self.cluster.pods.get((namespace, name))
            if pod is None:
                raise not_found("pods", name)
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
            if flag(query, "previous"):
                raise ApiError(
                    400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found'
                )
        opts: dict[str, Any] = {
            "follow": flag(query, "follow"),
            "timestamps": flag(query, "timestamps"),
            "since_ns": None,
            "tail": None,
            "limit": None,
        }
        try:
            if query.get("sinceSeconds"):
                opts["since_ns"] = time.time_ns() - int(query["sinceSeconds"]) * 1_000_000_000
            elif query.get("sinceTime"):
                opts["since_ns"] = int(parse_time(query["sinceTime"]) * 1_000_000_000)
            if query.get("tailLines"):
                opts["tail"] = int(query["tailLines"])
            if query.get("limitBytes"):
                opts["limit"] = int(query["limitBytes"])
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        return pod, opts


def flag(query: Mapping[str, str], key: str) -> bool:
    """A boolean query parameter (the Python client sends ``True``/``False``, kubectl ``true``)."""
    return query.get(key, "").lower() in ("true", "1")


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
