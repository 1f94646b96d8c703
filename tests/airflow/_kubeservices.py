"""core/v1 Services in the test Kubernetes: stored objects, for what a Service gives the pods it selects.

There is no proxy and no EndpointSlice here: a Service is only the object its client created, and what it is for
shows in the pods' DNS names (``Cluster.hosts`` in ``_kubeobjects.py``): a pod with ``hostname`` and
``subdomain`` resolves as ``<hostname>.<subdomain>`` (and ``...<ns>.svc[.cluster.local]``, to 127.0.0.1) while a
headless Service (``clusterIP: None``) of that name in its namespace selects it.

* create: ``name``/``generateName``; 409 for a name taken; 422 without ``spec`` or, unless headless, without
  ``spec.ports``. The API server's defaults: ``type: ClusterIP``, a made-up cluster IP (``10.96.x.y``) unless
  ``clusterIP: None``, ``clusterIPs``, ``sessionAffinity: None``, ``ipFamilies``/``ipFamilyPolicy``, each port's
  ``protocol: TCP`` and ``targetPort`` (the port); ``status.loadBalancer`` empty.
* get, list (``labelSelector``), delete (answers with the object, as the API server does for Services; no
  grace, no finalizers).

Not imitated: update/patch, watches, ``NodePort``/``LoadBalancer``/``ExternalName`` behaviour, ports' names and
their uniqueness, cluster IP allocation ranges and conflicts, and a name that resolves to the Service's own IP.
"""

from __future__ import annotations

import copy
import secrets as _secrets
import uuid
from collections.abc import Mapping
from typing import Any

from _kubeobjects import ApiError, not_found, rfc3339
from _kubepods import PodsAPI


class ServicesAPI(PodsAPI):
    """The Service endpoints' operations: each takes what the request carried and returns the JSON answer or raises
    :class:`~_kubeobjects.ApiError`."""

    def api_service_create(self, namespace: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("kind", "Service") != "Service":
            raise ApiError(400, "BadRequest", "the body is not a Service")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = "v1", "Service"
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the request")
        meta["namespace"] = namespace
        cluster = self.cluster
        with cluster.cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise ApiError(422, "Invalid", "Service is invalid: metadata.name: Required value")
                meta["name"] = meta["generateName"] + _secrets.token_hex(3)[:5]
            _default_and_validate(obj)
            key = (namespace, meta["name"])
            if key in cluster.services:
                details = {"name": meta["name"], "kind": "services"}
                raise ApiError(409, "AlreadyExists", f'services "{meta["name"]}" already exists', details)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(), resourceVersion=cluster.next_rv())
            obj["status"] = {"loadBalancer": {}}
            cluster.services[key] = obj
            cluster.cond.notify_all()
            return copy.deepcopy(obj)

    def api_service_get(self, namespace: str, name: str) -> dict[str, Any]:
        with self.cluster.cond:
            obj = self.cluster.services.get((namespace, name))
            if obj is None:
                raise not_found("services", name)
            return copy.deepcopy(obj)

    def api_service_list(self, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        services = self.cluster.services
        return self._list(
            "ServiceList", lambda: (o for (ns, _), o in services.items() if namespace in (None, ns)), query
        )

    def api_service_delete(self, namespace: str, name: str, propagation: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP code, the deleted object); ``propagation`` changes nothing: a Service owns nothing here."""
        cluster = self.cluster
        with cluster.cond:
            obj = cluster.services.pop((namespace, name), None)
            if obj is None:
                raise not_found("services", name)
            cluster.deleted_services[(namespace, name)] = obj
            cluster.next_rv()
            cluster.cond.notify_all()
            return 200, copy.deepcopy(obj)


def _default_and_validate(obj: dict[str, Any]) -> None:
    meta, spec = obj["metadata"], obj.get("spec")
    invalid = f'Service "{meta["name"]}" is invalid: '
    if not isinstance(spec, dict):
        raise ApiError(422, "Invalid", invalid + "spec: Required value")
    spec.setdefault("type", "ClusterIP")
    headless = spec.get("clusterIP") == "None"
    if not spec.get("ports") and not headless:
        raise ApiError(422, "Invalid", invalid + "spec.ports: Required value")
    for port in spec.get("ports") or []:
        if not isinstance(port.get("port"), int):
            raise ApiError(422, "Invalid", invalid + "spec.ports[].port: Required value")
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port["port"])
    if not spec.get("clusterIP"):
        spec["clusterIP"] = f"10.96.{_secrets.randbelow(256)}.{1 + _secrets.randbelow(254)}"
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
