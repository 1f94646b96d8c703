"""FaultProxy against a trivial HTTP server on 127.0.0.1: clean pass-through, then each fault, byte for byte."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faultproxy import FaultProxy, error_body


def _payload(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD /bytes/N: N known bytes; GET /chunked: a chunked answer; PUT/POST: echo the body."""

    protocol_version = "HTTP/1.1"
    server: _Upstream

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, body: bytes, *, send_body: bool = True) -> None:
        self.server.hits.append((self.command, self.path))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.server.hits.append((self.command, self.path))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        self._answer(_payload(int(self.path.rsplit("/", 1)[1])))

    def do_HEAD(self) -> None:
        self._answer(_payload(int(self.path.rsplit("/", 1)[1])), send_body=False)

    def do_PUT(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size + 2)[:-2]
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(body)

    do_POST = do_PUT


class _Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: list[tuple[str, str]] = []


@pytest.fixture(scope="module")
def upstream() -> Iterator[_Upstream]:
    server = _Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["s3", "gcs"])
def proxy(request: pytest.FixtureRequest, upstream: _Upstream) -> Iterator[FaultProxy]:
    upstream.hits.clear()
    proxy = FaultProxy(upstream.server_address[1], flavor=request.param).start()
    yield proxy
    proxy.stop()


def _client(proxy: FaultProxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)


def _get(proxy: FaultProxy, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    conn = conn or _client(proxy)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def _raw(proxy: FaultProxy, request: bytes, timeout: float = 5.0) -> tuple[bytes, BaseException | None]:
    """Send raw bytes, read until the proxy closes; what arrived, and the error that ended it (None on EOF)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            return received, exc
        return received, None


def _split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return status, headers, body


# -- pass-through ------------------------------------------------------------------------------------------------
def test_requests_and_answers_pass_through_unchanged_on_one_connection(proxy: FaultProxy, upstream: _Upstream) -> None:
    """Without faults, GET, HEAD and PUT behave as on the server, with keep-alive, and are recorded in order."""
    conn = _client(proxy)
    assert _get(proxy, "/bytes/100000", conn) == (200, _payload(100_000))
    conn.request("HEAD", "/bytes/10")
    head = conn.getresponse()
    assert (head.status, head.getheader("Content-Length"), head.read()) == (200, "10", b"")
    conn.request("PUT", "/echo", body=b"uploaded bytes")
    assert conn.getresponse().read() == b"uploaded bytes"
    assert proxy.requests == [("GET", "/bytes/100000"), ("HEAD", "/bytes/10"), ("PUT", "/echo")]
    assert upstream.hits == proxy.requests


def test_bytes_are_counted_both_ways(proxy: FaultProxy) -> None:
    """bytes_in counts what clients sent (heads and bodies), bytes_out what they received."""
    conn = _client(proxy)
    conn.request("PUT", "/echo", body=b"x" * 5000)
    assert len(conn.getresponse().read()) == 5000
    assert 5000 < proxy.bytes_in < 5600
    assert 5000 < proxy.bytes_out < 5600


def test_a_chunked_answer_is_reframed_with_its_length(proxy: FaultProxy) -> None:
    """A chunked response reaches the client de-chunked, with Content-Length, the same bytes."""
    status, headers, body = _split(_raw(proxy, b"GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0])
    assert "200" in status
    assert body == b"hello chunked world"
    assert headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in headers


def test_a_chunked_request_body_is_forwarded(proxy: FaultProxy) -> None:
    """An upload sent with Transfer-Encoding: chunked arrives whole."""
    conn = _client(proxy)
    conn.request("PUT", "/echo", body=iter([b"part one, ", b"part two"]), encode_chunked=True)
    assert conn.getresponse().read() == b"part one, part two"


def test_expect_100_continue_is_relayed(proxy: FaultProxy) -> None:
    """A client that waits for 100 Continue gets it from the server, then its upload goes through."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100")
        sock.sendall(b"body")
        reply = b""
        while not reply.endswith(b"body"):
            reply += sock.recv(4096)
    assert _split(reply)[0].endswith("200 OK")


# -- error answers -----------------------------------------------------------------------------------------------
def test_fail_answers_the_first_requests_with_the_flavours_503(proxy: FaultProxy, upstream: _Upstream) -> None:
    """fail(503, times=2): two 503s with S3's SlowDown XML or GCS's JSON error, unseen by the server; then through."""
    fault = proxy.fail(503, times=2)
    first, second = _get(proxy, "/bytes/5"), _get(proxy, "/bytes/5")
    assert first == second == (503, error_body(proxy.flavor, 503)[0])
    if proxy.flavor == "s3":
        assert b"<Code>SlowDown</Code>" in first[1]
    else:
        assert json.loads(first[1])["error"]["code"] == 503
    assert upstream.hits == []
    assert _get(proxy, "/bytes/5") == (200, _payload(5))
    assert (fault.seen, fault.hits) == (3, 2)


def test_fail_403_is_access_denied(proxy: FaultProxy) -> None:
    """fail(403) sends the flavour's access-denied error with the right content type."""
    proxy.fail(403)
    conn = _client(proxy)
    conn.request("GET", "/bytes/5")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 403
    if proxy.flavor == "s3":
        assert b"<Code>AccessDenied</Code>" in body
        assert response.getheader("Content-Type") == "application/xml"
    else:
        assert json.loads(body)["error"]["errors"][0]["reason"] == "forbidden"
        assert (response.getheader("Content-Type") or "").startswith("application/json")


def test_an_error_answer_to_head_has_no_body(proxy: FaultProxy) -> None:
    """A HEAD gets the error status and headers only, so the connection stays in sync."""
    proxy.fail(403)
    status, headers, body = _split(_raw(proxy, b"HEAD /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\n")[0])
    assert "403" in status
    assert body == b""
    assert int(headers["content-length"]) > 0


def test_an_error_body_can_be_replaced(proxy: FaultProxy) -> None:
    """body= overrides the flavour's error body."""
    proxy.fail(500, body=b"custom failure")
    assert _get(proxy, "/bytes/5") == (500, b"custom failure")


def test_an_error_before_the_upload_body_drains_it(proxy: FaultProxy) -> None:
    """An error answer to a PUT reads the request body first, so the client can read the answer."""
    proxy.fail(503)
    conn = _client(proxy)
    conn.request("PUT", "/echo", body=b"z" * 200_000)
    assert conn.getresponse().status == 503
    assert proxy.bytes_in > 200_000


def test_unknown_flavour_is_refused() -> None:
    """Error bodies exist for s3 and gcs only."""
    with pytest.raises(ValueError, match="flavor"):
        FaultProxy(1, flavor="azure")


# -- choosing requests -------------------------------------------------------------------------------------------
def test_skip_lets_the_first_matches_through(proxy: FaultProxy) -> None:
    """skip=2, times=1 hits exactly the third matching request."""
    proxy.fail(503, skip=2, times=1)
    assert [_get(proxy, "/bytes/1")[0] for _ in range(5)] == [200, 200, 503, 200, 200]


def test_times_none_hits_every_match(proxy: FaultProxy) -> None:
    """times=None keeps firing."""
    proxy.fail(503, times=None)
    assert [_get(proxy, "/bytes/1")[0] for _ in range(4)] == [503] * 4


def test_method_path_and_predicate_pick_the_requests(proxy: FaultProxy) -> None:
    """A fault fires only on requests matching its method, its path regex and its predicate."""
    proxy.fail(501, method="put", times=None)
    proxy.fail(502, path=r"^/bytes/7$", times=None)
    proxy.fail(504, match=lambda method, target: method == "GET" and target.endswith("/9"), times=None)
    conn = _client(proxy)
    conn.request("PUT", "/echo", body=b"x")
    assert conn.getresponse().status == 501
    assert _get(proxy, "/bytes/7")[0] == 502
    assert _get(proxy, "/bytes/77")[0] == 200
    assert _get(proxy, "/bytes/9")[0] == 504
    assert _get(proxy, "/bytes/8")[0] == 200


def test_the_first_matching_fault_wins_and_clear_drops_all(proxy: FaultProxy) -> None:
    """Faults are checked in order; clear() removes them and zeroes the counters."""
    proxy.fail(503, times=1)
    proxy.fail(403, times=1)
    assert [_get(proxy, "/bytes/1")[0] for _ in range(3)] == [503, 403, 200]
    proxy.fail(503, times=None)
    proxy.clear()
    assert (proxy.faults, proxy.requests, proxy.bytes_in, proxy.bytes_out) == ([], [], 0, 0)
    assert _get(proxy, "/bytes/1")[0] == 200


# -- broken answers ----------------------------------------------------------------------------------------------
GET_100K = b"GET /bytes/100000 HTTP/1.1\r\nHost: x\r\n\r\n"


def test_reset_sends_the_head_and_some_body_then_resets(proxy: FaultProxy) -> None:
    """reset(after=1000): the full head, exactly 1000 body bytes, then a TCP reset (not a clean close)."""
    proxy.reset(after=1000)
    received, error = _raw(proxy, GET_100K)
    status, headers, body = _split(received)
    assert "200" in status
    assert headers["content-length"] == "100000"
    assert body == _payload(1000)
    assert isinstance(error, ConnectionResetError)


def test_drop_lets_the_server_act_but_resets_before_the_answer(proxy: FaultProxy, upstream: _Upstream) -> None:
    """drop(): the server receives and answers the upload; the client gets nothing but a reset."""
    proxy.drop(method="PUT")
    received, error = _raw(proxy, b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert received == b""
    assert isinstance(error, ConnectionResetError)
    assert upstream.hits == [("PUT", "/echo")]


def test_truncate_closes_cleanly_after_part_of_the_body(proxy: FaultProxy) -> None:
    """truncate(after=500): the declared length stays 100000 but only 500 bytes come before a clean close."""
    proxy.truncate(after=500)
    received, error = _raw(proxy, GET_100K)
    _, headers, body = _split(received)
    assert headers["content-length"] == "100000"
    assert body == _payload(500)
    assert error is None


def test_flip_inverts_one_body_byte(proxy: FaultProxy) -> None:
    """flip(offset=12345): same length, every byte the same except that one, inverted."""
    proxy.flip(offset=12345)
    status, body = _get(proxy, "/bytes/100000")
    expected = bytearray(_payload(100_000))
    expected[12345] ^= 0xFF
    assert (status, body) == (200, bytes(expected))


def test_slow_delivers_the_whole_body_in_paced_pieces(proxy: FaultProxy) -> None:
    """slow(chunk=25, seconds=0.02): 100 bytes in four pieces, intact, taking at least four pauses."""
    proxy.slow(25, 0.02)
    started = time.monotonic()
    assert _get(proxy, "/bytes/100") == (200, _payload(100))
    assert time.monotonic() - started >= 0.08


def test_stall_reads_the_request_then_sends_nothing_then_closes(proxy: FaultProxy, upstream: _Upstream) -> None:
    """stall(0.3): nothing arrives within the client's short timeout; the connection closes afterwards."""
    proxy.stall(0.3)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.1) as sock:
        sock.sendall(b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(1024)
        sock.settimeout(5)
        assert sock.recv(1024) == b""
    assert upstream.hits == []


def test_stop_ends_a_stalled_connection_at_once(upstream: _Upstream) -> None:
    """stop() does not wait out a long stall: the stalled client sees its connection end."""
    proxy = FaultProxy(upstream.server_address[1]).start()
    stalling = threading.Event()

    def mark(method: str, target: str) -> bool:
        stalling.set()
        return True

    proxy.stall(60, match=mark)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stalling.wait(5)
        started = time.monotonic()
        proxy.stop()
        assert sock.recv(1024) == b""
    assert time.monotonic() - started < 2
