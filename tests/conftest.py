"""Shared fixtures: real object-store servers, fresh store URLs, a fault proxy, a recording fake sleep, logs.

Nothing here is autouse: a test that asks for none of these fixtures starts no server. The servers start on
first use and live for the session; every URL fixture resets its server first, so each test sees an empty
bucket, and points the client environment at it through ``monkeypatch`` so ``open_store(url)`` just works.

* ``s3_server`` / ``gcs_server`` — the S3 server of this test (moto unless parametrized, below) /
  :class:`tests.servers.FakeGCSServer`. ``moto_server`` and ``seaweedfs_server`` are the two S3 servers
  (:class:`tests.servers.MotoS3Server`, :class:`tests.servers.SeaweedFSServer`, which checks signatures).
* ``@pytest.mark.s3_servers`` on a test, class or module: every test in it that uses ``s3_server`` (``s3_url``,
  ``s3_botocore``...) runs once per S3 server, ids ``[moto]`` and ``[seaweedfs]``. SeaweedFS not starting fails
  those tests with the cause (never a skip). ``@pytest.mark.s3_servers("moto", reason=...)`` on a test narrows a
  module's mark, for a case that cannot be set up on the other server (say why).
* ``file_url``, ``memory_url``, ``s3_url``, ``gcs_url``, ``seaweedfs_url`` — a fresh, empty location (``str``);
  ``seaweedfs_url`` is an ``s3://`` one on SeaweedFS whatever the test's S3 server.
* ``s3_botocore`` — ``s3_url`` with an AWS config file that makes every request go through botocore's client
  (the S3 contract suites run on both of the S3 store's request paths).
* ``store_url`` — the same, parametrized over ``file``, ``s3`` (moto), ``gcs``, ``seaweedfs``.
* ``fault_proxy`` — ``fault_proxy("s3" | "gcs" | "seaweedfs") -> FaultProxy``: a proxy in front of that server with the
  environment pointed at it (and a fresh bucket, as the URL fixture gives). Open stores after calling it.
* ``no_sleep`` — a :class:`RecordedSleep` for ``RetryPolicy``/``open_store(sleep=...)``: records, never sleeps.
* ``captured_log`` — podtrain's log configured as JSON lines into a buffer; ``.records()`` parses them.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The contract suites are shared modules, not test modules: rewrite their asserts too, so a failure shows values.
pytest.register_assert_rewrite("tests.checkpoint_contract", "tests.sharded_contract")

from tests.faultproxy import FaultProxy  # noqa: E402
from tests.servers import S3_SERVERS, FakeGCSServer, MotoS3Server, SeaweedFSServer, Server  # noqa: E402

BUCKET = "podtrain-test"
BACKENDS = ["file", "s3", "gcs", "seaweedfs"]  # "s3" is moto; "seaweedfs" is S3 too, on SeaweedFS
# Variables that would send a client somewhere else than the test server, or change how it signs in.
_FOREIGN_VARS = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


class RecordedSleep:
    """A stand-in for ``time.sleep``: records every pause asked for and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)

    def __repr__(self) -> str:
        return f"RecordedSleep({self.calls})"


class ManualClock:
    """A clock for ``clock=`` parameters: reads ``now``, which the test moves by hand."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class WriteGate:
    """Holds a ``Checkpointer``'s writes (background or not) before they start, until the test opens the gate."""

    def __init__(self, checkpointer: Any, *, timeout: float = 60) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        write = checkpointer.write

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.open.wait(timeout), "gate never opened"
            return write(*args, **kwargs)

        checkpointer.write = gated


class CapturedLog:
    """podtrain's log lines, as written (JSON, one object a line)."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """Every line parsed, or only those whose ``event`` is ``event``."""
        parsed = [json.loads(line) for line in self.text.splitlines() if line.strip()]
        return [r for r in parsed if event is None or r.get("event") == event]


# -- servers -------------------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "s3_servers(*names, reason=...): run each test that uses an S3 server against each of these (moto, seaweedfs;"
        " all when none is named); the closest mark wins, and naming fewer than all needs a reason",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    mark = metafunc.definition.get_closest_marker("s3_servers")
    if "s3_flavor" not in metafunc.fixturenames or mark is None:
        return
    names = list(mark.args) or list(S3_SERVERS)
    unknown = sorted(set(names) - set(S3_SERVERS))
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: s3_servers names {unknown}; known: {list(S3_SERVERS)}")
    if len(names) < len(S3_SERVERS) and not mark.kwargs.get("reason"):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: s3_servers{tuple(names)} needs reason= for the others")
    metafunc.parametrize("s3_flavor", names, indirect=True)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3Server]:
    """moto's S3 on a free port of 127.0.0.1, for the whole session."""
    server = MotoS3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[SeaweedFSServer]:
    """SeaweedFS (its S3 gateway, signatures checked) on 127.0.0.1, for the whole session, started on first use.

    If it cannot start, every test that needs it fails with the cause (pytest reuses this fixture's error): a
    missing binary or a server that died is a failure to fix, not a reason to test less."""
    server = SeaweedFSServer()
    try:
        server.start()
        error = None
    except RuntimeError as e:
        error = str(e)
    if error is not None:
        server.stop()
        pytest.fail(f"SeaweedFS did not start: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_flavor(request: pytest.FixtureRequest) -> str:
    """Which S3 server this test uses: ``moto``, or each in turn under ``@pytest.mark.s3_servers``."""
    return str(getattr(request, "param", "moto"))


@pytest.fixture
def s3_server(s3_flavor: str, request: pytest.FixtureRequest) -> Server:
    """This test's S3 server (moto unless ``@pytest.mark.s3_servers`` asks for each), started on first use."""
    return request.getfixturevalue(f"{s3_flavor}_server")


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCSServer]:
    """fake-gcs-server on a free port of 127.0.0.1, for the whole session."""
    server = FakeGCSServer().start()
    try:
        yield server
    finally:
        server.stop()


def _fresh(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server.reset()
    server.create_bucket(BUCKET)
    for name in _FOREIGN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


# -- locations -----------------------------------------------------------------------------------------------
@pytest.fixture
def s3_url(s3_server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty location in a fresh bucket of this test's S3 server; the AWS_* environment points at the server."""
    _fresh(s3_server, monkeypatch)
    return f"s3://{BUCKET}/root"


@pytest.fixture
def seaweedfs_url(seaweedfs_server: SeaweedFSServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty location in a fresh SeaweedFS bucket; the AWS_* environment points at it."""
    _fresh(seaweedfs_server, monkeypatch)
    return f"s3://{BUCKET}/root"


@pytest.fixture
def s3_botocore(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3_url``, reached through botocore's client instead of podtrain's lean one: an AWS config file with an
    ``s3`` section (path-style addressing, as MinIO set-ups write it) is a setting only botocore honours, so the lean
    client steps aside, as it does for users with such a file."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\ns3 =\n    addressing_style = path\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    return s3_url


@pytest.fixture
def gcs_url(gcs_server: FakeGCSServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty location in a fresh fake-gcs bucket; STORAGE_EMULATOR_HOST points at the server."""
    _fresh(gcs_server, monkeypatch)
    return f"gs://{BUCKET}/root"


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    """An empty local directory, as a file:// URL."""
    return (tmp_path / "store").as_uri()


@pytest.fixture
def memory_url() -> Iterator[str]:
    """An empty location in fsspec's in-process memory filesystem, removed afterwards."""
    import fsspec

    root = f"/podtrain-{uuid.uuid4().hex[:12]}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty location on each backend in turn (file, s3, gcs, seaweedfs); servers start only when needed."""
    return str(request.getfixturevalue(f"{request.param}_url"))


# -- faults, time, logs --------------------------------------------------------------------------------------
@pytest.fixture
def fault_proxy(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], FaultProxy]]:
    """``fault_proxy("s3" | "gcs" | "seaweedfs")``: a started FaultProxy in front of that server (``s3``: this
    test's S3 server), the environment pointed at it.

    The backend's URL fixture (``s3_url`` / ``gcs_url`` / ``seaweedfs_url``) is set up first, so the bucket exists;
    stores opened after the call go through the proxy. Every proxy is stopped after the test.
    """
    proxies: list[FaultProxy] = []

    def make(backend: str) -> FaultProxy:
        if backend not in ("s3", "gcs", "seaweedfs"):
            raise ValueError(f"fault_proxy({backend!r}): use 's3', 'gcs' or 'seaweedfs'")
        request.getfixturevalue(f"{backend}_url")
        server: Server = request.getfixturevalue(f"{backend}_server")
        flavor = "gcs" if backend == "gcs" else "s3"
        proxy = FaultProxy(server.port, flavor=flavor).start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL" if flavor == "s3" else "STORAGE_EMULATOR_HOST", proxy.url)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def fast_gcsfs_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs's own retry loop (6 tries) sleeps 1 s, 2 s, 4 s... between tries; make those sleeps instant."""
    import gcsfs.retry

    real_sleep = asyncio.sleep

    async def no_wait(seconds: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))


@pytest.fixture
def no_sleep() -> RecordedSleep:
    """A fake sleep that records the waits a retry loop asked for."""
    return RecordedSleep()


@pytest.fixture
def captured_log() -> Iterator[CapturedLog]:
    """podtrain's log as JSON lines into a buffer (debug and up); the default set-up is restored afterwards."""
    import sdk.log

    stream = io.StringIO()
    sdk.log.configure(stream=stream, fmt="json", level="debug")
    yield CapturedLog(stream)
    sdk.log.configure()
