"""A dataset's S3 listing, sent the moment ``podtrain pull`` knows its URL, while the rest of it loads.

A warm pull is one listing and a ``stat`` per file. Its wall time is the process's start-up (~0.25 s of
imports: structlog, tenacity, the pull's modules) followed by the listing (a round trip per 1,000 keys on S3;
0.25-0.4 s of server time for 1,008 keys on the test server). Neither needs the other, so :func:`start` puts
the first listing request on the wire as soon as the command line is parsed, and
:class:`~sdk.stores._s3.S3Backend` takes the answer (:func:`take`) instead of listing again.

What comes before that request is on every warm pull's critical path, so it is kept to the light modules:
:mod:`sdk.stores._s3address` signs it and a plain socket carries it. ``http.client``, ``ssl`` and the XML parser
(~60 ms of imports, measured) are imported by the listing's thread only once the request is sent, while the
server works; the answer is then read by :func:`sdk.stores._s3http.read_answer` and the later pages fetched by
:class:`~sdk.stores._s3http.S3HTTP`. The calling thread waits for the request to be sent (at most
:data:`SEND_WAIT` seconds) before it goes on importing: two threads running Python at once take turns, and the
request would leave later.

It is only a head start, never a second source of truth: the answer is used once, by the first listing of the
same bucket, prefix and endpoint within :data:`FRESH_SECONDS`; any error (no keys in the environment, a denied
bucket, a timeout, an answer other than 200) is dropped, and the normal listing — with its retries and its error
messages — runs instead.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from sdk.stores import _s3address as s3address

__all__ = ["FRESH_SECONDS", "SEND_WAIT", "start", "take"]

FRESH_SECONDS = 30.0  # an answer older than this is not used: list again
SEND_WAIT = 0.05  # how long start() lets the listing's thread run alone to send its request
TIMEOUT = 60.0  # socket timeout of the head start's connection
_lock = threading.Lock()
_pending: dict[tuple[str, str, str], _Listing] = {}


class _Listing(threading.Thread):
    def __init__(self, address: s3address.Address, bucket: str, prefix: str) -> None:
        super().__init__(name="podtrain-listing", daemon=True)
        self.address, self.bucket, self.prefix = address, bucket, prefix
        self.items: list[dict[str, Any]] | None = None
        self.started_at = time.monotonic()
        self.sent = threading.Event()

    def run(self) -> None:
        try:
            try:
                connection = self._send()
            finally:
                self.sent.set()
            from sdk.stores import _s3http as s3http  # http.client and the XML parser: imported while the server works

            with connection:
                status, _, body = s3http.read_answer(connection, "GET")
            if status == 200:
                client = s3http.S3HTTP(self.address, timeout=TIMEOUT)
                self.items = list(client.list(self.bucket, self.prefix, first=body))
        except Exception:  # noqa: S110 - a head start only: the normal listing reports any error
            pass

    def _send(self) -> socket.socket:
        """Connect and write the signed request for the listing's first page; the connection, to read from."""
        region = self.address.region
        url = self.address.url(self.bucket, "", s3address.list_query(self.prefix), region)
        headers = self.address.sign("GET", url, {"Accept-Encoding": "identity"}, region)
        parts = urlsplit(url)
        host = parts.hostname or ""
        connection = socket.create_connection((host, parts.port or (443 if parts.scheme == "https" else 80)), TIMEOUT)
        try:
            if parts.scheme == "https":
                connection = self.address.tls_context().wrap_socket(connection, server_hostname=host)
            lines = [f"GET {parts.path}?{parts.query} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
            connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        except BaseException:
            connection.close()
            raise
        return connection


def _no_session() -> Any:
    raise _NeedsBotocore  # credentials other than keys in the environment: not worth a head start


class _NeedsBotocore(Exception):
    pass


def _key(bucket: str, prefix: str) -> tuple[str, str, str]:
    return bucket, prefix, os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def start(url: str) -> None:
    """Send the first listing request of ``url`` (``s3://bucket/prefix``, as :class:`~sdk.stores._s3.S3Backend` will
    list it) from a background thread; anything but an S3 URL with keys in the environment is ignored."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("s3", "s3a") or not rest:
        return
    bucket, _, key = rest.partition("/")
    key = key.rstrip("/")
    prefix = key + "/" if key else ""
    try:
        address = s3address.resolve(session=_no_session)
    except Exception:
        return  # the normal listing reports it
    if address is None:
        return
    listing = _Listing(address, bucket, prefix)
    with _lock:
        if _key(bucket, prefix) in _pending:  # already on its way
            return
        _pending[_key(bucket, prefix)] = listing
    listing.start()
    listing.sent.wait(SEND_WAIT)


def take(bucket: str, prefix: str) -> list[dict[str, Any]] | None:
    """The head start's answer for ``bucket``/``prefix`` (waiting for it if it is still on its way), once; None
    when there is none, it failed, or it is stale."""
    with _lock:
        listing = _pending.pop(_key(bucket, prefix), None)
    if listing is None:
        return None
    listing.join(timeout=max(0.0, FRESH_SECONDS - (time.monotonic() - listing.started_at)))
    if listing.is_alive() or time.monotonic() - listing.started_at > FRESH_SECONDS:
        return None
    return listing.items
