"""The HTTP side of the test API server: requests onto the operations of :class:`~_kubepods.PodsAPI`,
:class:`~_kubejobsets.JobSetsAPI`, :class:`~_kubejobs.JobsAPI` and :class:`~_kubeservices.ServicesAPI`, answers as
JSON.

Cut from the operations so that they read as what each endpoint does to the objects, and this as only the wire:
routes, the ``Status`` answer for any :class:`~_kubeobjects.ApiError` (404 ``NotFound`` for a path the server
lacks, 405 ``MethodNotAllowed`` for a verb, 400 for ``watch=true``, 500 for a bug here, so a hung request never
hides one), JSON bodies, and a followed log as a chunked stream. Every request is recorded in the server's
``requests`` as ``(method, path with query)``.

* ``POST   /api/v1/namespaces/{ns}/pods``, ``GET`` the same (list), ``GET /api/v1/pods`` (all namespaces)
* ``GET    /api/v1/namespaces/{ns}/pods/{name}`` (also ``.../status``), ``PATCH``, ``DELETE`` (``gracePeriodSeconds``
  in the query or the body)
* ``GET    /api/v1/namespaces/{ns}/pods/{name}/log``
* ``GET    /api/v1/namespaces/{ns}/events``, ``GET /api/v1/events``
* ``POST   /apis/jobset.x-k8s.io/v1alpha2/namespaces/{ns}/jobsets``, ``GET`` the same (list), ``GET
  /apis/jobset.x-k8s.io/v1alpha2/jobsets``; ``GET .../jobsets/{name}`` (also ``.../status``), ``DELETE`` (the
  ``propagationPolicy`` in the body or the query)
* ``POST   /apis/batch/v1/namespaces/{ns}/jobs``, ``GET`` the same (list), ``GET /apis/batch/v1/jobs``; ``GET
  .../jobs/{name}`` (also ``.../status``), ``DELETE`` (the ``propagationPolicy`` in the body or the query): a
  client's Jobs and the JobSets' alike
* ``POST   /api/v1/namespaces/{ns}/services``, ``GET`` the same (list), ``GET /api/v1/services``; ``GET
  .../services/{name}`` (also ``.../status``), ``DELETE``
* ``GET    /version``, ``GET /healthz`` (``/livez``, ``/readyz``)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from _kubeobjects import ApiError
from _kubepods import flag

if TYPE_CHECKING:
    from kubeapi import KubeAPIServer

VERSION = {
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


_POD_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)(?:/(status|log))?/?")
_PODS_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/?")
_EVENTS_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/events/?")
_JOBSETS_PATH = re.compile(r"/apis/jobset\.x-k8s\.io/v1alpha2/namespaces/([^/]+)/jobsets(?:/([^/]+)(/status)?)?/?")
_JOBS_PATH = re.compile(r"/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+)(/status)?)?/?")
_SERVICES_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/services(?:/([^/]+)(/status)?)?/?")


class Handler(BaseHTTPRequestHandler):
    """One request; :meth:`~kubeapi.KubeAPIServer.start` binds ``kube`` in a subclass."""

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
        with kube.cluster.cond:
            kube.requests.append((method, self.path))
        try:
            body = self._body()
            if flag(query, "watch"):
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
            "/version": lambda: VERSION,
            "/api/v1/pods": lambda: kube.api_list(None, query),
            "/api/v1/events": lambda: kube.api_events(None, query),
            "/apis/jobset.x-k8s.io/v1alpha2/jobsets": lambda: kube.api_jobset_list(None, query),
            "/apis/batch/v1/jobs": lambda: kube.api_job_list(None, query),
            "/api/v1/services": lambda: kube.api_service_list(None, query),
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
        elif m := _JOBSETS_PATH.fullmatch(path):
            ops = (kube.api_jobset_list, kube.api_jobset_create, kube.api_jobset_get, kube.api_jobset_delete)
            self._resource(method, *m.groups(), ops, query=query, body=body)
        elif m := _JOBS_PATH.fullmatch(path):
            ops = (kube.api_job_list, kube.api_job_create, kube.api_job_get, kube.api_job_delete)
            self._resource(method, *m.groups(), ops, query=query, body=body)
        elif m := _SERVICES_PATH.fullmatch(path):
            ops = (kube.api_service_list, kube.api_service_create, kube.api_service_get, kube.api_service_delete)
            self._resource(method, *m.groups(), ops, query=query, body=body)
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")

    def _pod(self, method: str, ns: str, name: str, sub: str | None, *, query: Mapping[str, str], body: Any) -> None:
        kube = self.kube
        if sub == "log":
            self._only(method, "GET")
            pod, opts = kube.api_log(ns, name, query)
            self._stream(kube.kubelet.log_chunks(pod, opts), chunked=opts["follow"])
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

    def _resource(
        self,
        method: str,
        ns: str,
        name: str | None,
        sub: str | None,
        ops: tuple[Callable[..., Any], ...],
        *,
        query: Mapping[str, str],
        body: Any,
    ) -> None:
        """A collection (list, create) and its objects (get, delete; a subresource such as ``status``: get only):
        ``ops`` are those four operations; a delete answers ``(code, object)``."""
        list_, create, get, delete = ops
        if name is None:
            self._only(method, "GET", "POST")
            if method == "GET":
                self._json(200, list_(ns, query))
            else:
                self._json(201, create(ns, body))
            return
        self._only(method, *(("GET",) if sub else ("GET", "DELETE")))
        if method == "GET":
            self._json(200, get(ns, name))
        else:
            policy = query.get("propagationPolicy")
            if policy is None and isinstance(body, dict):
                policy = body.get("propagationPolicy")
            self._json(*delete(ns, name, policy))

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
