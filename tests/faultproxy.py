"""An HTTP-aware TCP proxy on 127.0.0.1 that injects object-store faults on chosen requests.

It sits in front of a real server (moto, fake-gcs-server), runs an asyncio loop in a background thread, and
forwards each request on a fresh upstream connection. Response bodies are buffered and re-framed with
Content-Length, so body faults hit exact offsets. Faults are rules, checked in order; the first that matches
the request and has shots left fires (``skip=N-1, times=1`` hits the Nth matching request)::

    proxy = FaultProxy(server.port, flavor="s3").start()
    proxy.fail(503, times=2)                    # the first two requests get a SlowDown 503
    proxy.fail(403, method="PUT", times=None)   # every PUT gets AccessDenied
    proxy.reset(after=1000, method="GET")       # the next GET: 1000 body bytes, then a TCP RST
    proxy.stall(5.0, path=r"/bkt/")             # a matching request is read, then nothing for 5 s, then close
"""

from __future__ import annotations

import asyncio
import http
import json
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from xml.sax.saxutils import escape

HOST = "127.0.0.1"
_Response = tuple[str, dict[str, str], bytes]  # status line, headers, body
_S3_CODES = {403: ("AccessDenied", "Access Denied"), 503: ("SlowDown", "Please reduce your request rate.")}
_GCS_REASONS = {403: "forbidden", 429: "rateLimitExceeded", 503: "backendError"}


def error_body(flavor: str, status: int, message: str | None = None) -> tuple[bytes, str]:
    """The error body and content type a real ``flavor`` ("s3" or "gcs") server sends with ``status``;
    ``message`` replaces the server's sentence (e.g. one quoting the request's token, as some servers do)."""
    phrase = http.HTTPStatus(status).phrase
    if flavor == "s3":
        code, text = _S3_CODES.get(status, (phrase.replace(" ", ""), phrase))
        message = escape(text if message is None else message)
        xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
        return xml.encode(), "application/xml"
    if flavor == "gcs":
        reason, message = _GCS_REASONS.get(status, "backendError"), phrase if message is None else message
        error = {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}
        return json.dumps({"error": error}).encode(), "application/json; charset=UTF-8"
    raise ValueError(f"unknown error-body flavor {flavor!r}: use 's3' or 'gcs'")


@dataclass
class Fault:
    """One rule: what to do to which requests, and how often. ``seen``/``hits`` count matches and firings."""

    kind: str  # status | reset | drop | truncate | flip | stall | slow
    status: int = 503
    after: int = 0  # reset/truncate: body bytes passed first; flip: offset of the inverted byte; slow: chunk
    seconds: float = 0.0  # stall: how long; slow: the pause before each chunk
    body: bytes | None = None  # status: overrides the flavour's error body
    method: str | None = None
    path: str | None = None  # regex searched in the request target (path and query)
    match: Callable[[str, str], bool] | None = None  # (method, target) -> bool
    skip: int = 0
    times: int | None = 1  # None: every matching request after ``skip``
    seen: int = 0
    hits: int = 0

    def take(self, method: str, target: str) -> bool:
        """Whether this rule fires on this request (counting it if it matches)."""
        if (
            (self.method is not None and self.method.upper() != method)
            or (self.path is not None and re.search(self.path, target) is None)
            or (self.match is not None and not self.match(method, target))
        ):
            return False
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


class FaultProxy:
    """A proxy to ``upstream_port`` on 127.0.0.1; ``flavor`` ("s3"/"gcs") picks the error bodies it sends."""

    def __init__(
        self, upstream_port: int, *, flavor: str = "s3", upstream_host: str = HOST, tls: ssl.SSLContext | None = None
    ) -> None:
        """``tls``: serve HTTPS with this server context (the upstream is still plain HTTP)."""
        error_body(flavor, 503)  # fail now on a bad flavour
        self.upstream, self.flavor, self.tls = (upstream_host, upstream_port), flavor, tls
        self.port, self.url = 0, ""  # set by start()
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, target) of every request, in arrival order
        self.bytes_in = self.bytes_out = 0  # bytes received from clients, bytes sent to them
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> FaultProxy:
        self._thread.start()
        serving = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, HOST, 0, ssl=self.tls), self._loop)
        self._server = serving.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (a stalled one too); safe to call twice."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def add(self, kind: str, **options: object) -> Fault:
        fault = Fault(kind, **options)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail(self, status: int = 503, *, message: str | None = None, **options: object) -> Fault:
        """Answer with ``status`` and the flavour's error body (S3: SlowDown for 503, AccessDenied for 403);
        ``message``: that body with this sentence instead of the server's."""
        if message is not None:
            options["body"] = error_body(self.flavor, status, message)[0]
        return self.add("status", status=status, **options)

    def reset(self, after: int = 0, **options: object) -> Fault:
        """Send the response head and ``after`` body bytes, then reset the connection."""
        return self.add("reset", after=after, **options)

    def drop(self, **options: object) -> Fault:
        """Let the request reach the server, then reset the connection before any byte of the answer."""
        return self.add("drop", **options)

    def truncate(self, after: int = 0, **options: object) -> Fault:
        """Send the response head (full Content-Length) and ``after`` body bytes, then close cleanly."""
        return self.add("truncate", after=after, **options)

    def flip(self, offset: int = 0, **options: object) -> Fault:
        """Invert the response body byte at ``offset``."""
        return self.add("flip", after=offset, **options)

    def stall(self, seconds: float, **options: object) -> Fault:
        """Read the request, send nothing for ``seconds``, then close."""
        return self.add("stall", seconds=seconds, **options)

    def slow(self, chunk: int, seconds: float, **options: object) -> Fault:
        """Send the response head, then the body ``chunk`` bytes at a time, each after ``seconds``."""
        return self.add("slow", after=chunk, seconds=seconds, **options)

    def clear(self) -> None:
        """Drop every fault and zero the counters."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.bytes_in = self.bytes_out = 0

    def _pick(self, method: str, target: str) -> Fault | None:  # the rest runs on the proxy's own loop
        with self._lock:
            self.requests.append((method, target))
            return next((f for f in self.faults if f.take(method, target)), None)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        handlers = asyncio.all_tasks() - {asyncio.current_task()}
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._exchange(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            pass  # a client or server hung up mid-message, or the proxy stops: drop the connection
        finally:
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Proxy one request; whether the client connection stays open for another."""
        head = await _read_head(reader)
        if not head:
            return False
        self.bytes_in += len(head)
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        headers = _headers(head)
        fault = self._pick(method, target)
        if fault is not None and fault.kind in ("stall", "status"):
            if "100-continue" not in headers.get("expect", "").lower():
                self.bytes_in += len(await _body(reader, headers))  # the whole request arrives, then nothing
            if fault.kind == "stall":
                await asyncio.sleep(fault.seconds)
                return False
            body, ctype = error_body(self.flavor, fault.status)
            body, phrase = fault.body or body, http.HTTPStatus(fault.status).phrase
            head = _head(f"HTTP/1.1 {fault.status} {phrase}", {"content-type": ctype}, body)
            await self._send(writer, head if method == "HEAD" else head + body)
            return False
        status_line, response_headers, body = await self._fetch(head, reader, writer)
        out_head = _head(status_line, response_headers)
        keep = "close" not in (response_headers.get("connection", "") + headers.get("connection", "")).lower()
        kind, after = (fault.kind, fault.after) if fault is not None else ("", 0)
        if kind == "flip" and after < len(body):
            body = body[:after] + bytes([body[after] ^ 0xFF]) + body[after + 1 :]
        if kind in ("reset", "truncate", "drop"):
            writer.transport.set_write_buffer_limits(0)  # drain() then waits until the kernel has it all
            await self._send(writer, b"" if kind == "drop" else out_head + body[:after])
            if kind != "truncate":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            return False
        if kind == "slow" and fault is not None:
            await self._send(writer, out_head)
            for start in range(0, len(body), max(after, 1)):
                await asyncio.sleep(fault.seconds)
                await self._send(writer, body[start : start + max(after, 1)])
            return keep
        await self._send(writer, out_head + body)
        return keep

    async def _fetch(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Response:
        """Send the request upstream on a fresh connection; the final response, its body re-framed."""
        headers, method = _headers(head), head.split(b" ", 1)[0].decode("latin-1")

        async def forward_body() -> None:
            body = await _body(reader, headers, raw=True)
            self.bytes_in += len(body)
            up_writer.write(body)  # no drain: done means the whole request arrived (closing flushes the rest)

        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(head)
            request_body = asyncio.create_task(forward_body())
            while True:  # interim 1xx answers (100 Continue) go straight through
                response = await _read_head(up_reader)
                if not response:
                    raise ConnectionResetError("upstream closed without a response")
                status_line = response.split(b"\r\n", 1)[0].decode("latin-1")
                status = int(status_line.split(" ")[1])
                if status >= 200:
                    break
                await self._send(writer, response)
            response_headers = _headers(response)
            no_body = method == "HEAD" or status in (204, 304)
            body = b"" if no_body else await _body(up_reader, response_headers, until_eof=True)
        finally:
            up_writer.close()
        if not request_body.done():  # answered before the request body came: this connection is done
            request_body.cancel()
            response_headers["connection"] = "close"
        if not no_body:
            response_headers.pop("transfer-encoding", None)
            response_headers["content-length"] = str(len(body))
        return status_line, response_headers, body

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.bytes_out += len(data)
        writer.write(data)
        await writer.drain()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """A message head through its blank line, or b"" at a clean end of stream."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return b""


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def _head(start: str, headers: dict[str, str], body: bytes | None = None) -> bytes:
    if body is not None:
        headers = {**headers, "content-length": str(len(body)), "connection": "close"}
    return (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")


async def _body(
    reader: asyncio.StreamReader, headers: dict[str, str], *, raw: bool = False, until_eof: bool = False
) -> bytes:
    """A message body by its framing: Content-Length, chunked (decoded unless ``raw``), or to end of stream."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                trailer = size_line
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    trailer += line
                parts.append(trailer + b"\r\n" if raw else b"")
                return b"".join(parts)
            chunk = await reader.readexactly(size + 2)
            parts.append(size_line + chunk if raw else chunk[:-2])
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if until_eof else b""
