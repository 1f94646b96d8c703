"""`podtrain pull`, and the pull `podtrain run` does before it starts the child: real CLI, file:// and S3."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

from sdk.stores.store import open_store
from tests.faultproxy import FaultProxy
from tests.servers import Server

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))

pytestmark = pytest.mark.s3_servers  # the S3 tests run on moto and on SeaweedFS


def _podtrain(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PODTRAIN, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=cwd
    )


def _bucket(url: str) -> None:
    store = open_store(url)
    store.put("ds/train/a.bin", b"a" * 5000)
    store.put("ds/val/b.bin", b"b" * 10)


def test_pull_fetches_then_skips_and_prints_json(s3_url: str, tmp_path: Path) -> None:
    """`podtrain pull URI --dest DIR --json`: 2 fetched; again: 0 fetched, 2 already there."""
    _bucket(s3_url)
    first = _podtrain("pull", f"{s3_url}/ds", "--dest", str(tmp_path / "d"), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["fetched"] == 2
    assert (tmp_path / "d" / "train" / "a.bin").read_bytes() == b"a" * 5000
    again = _podtrain("pull", f"{s3_url}/ds", "--dest", str(tmp_path / "d"), "--json")
    assert json.loads(again.stdout) | {"seconds": 0} == json.loads(first.stdout) | {
        "seconds": 0,
        "fetched": 0,
        "skipped": 2,
        "bytes_fetched": 0,
    }


def test_pull_reads_podtrain_data_variables_and_globs(tmp_path: Path) -> None:
    """With no arguments, PODTRAIN_DATA_URI / _DIR / _INCLUDE say what to fetch and where."""
    store = tmp_path / "store"
    _bucket(store.as_uri())
    env = {
        "PODTRAIN_DATA_URI": f"{store.as_uri()}/ds/train,{store.as_uri()}/ds/val",
        "PODTRAIN_DATA_DIR": str(tmp_path / "d"),
        "PODTRAIN_DATA_INCLUDE": "*.bin",
    }
    done = _podtrain("pull", env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if not p.name.startswith(".")) == ["a.bin", "b.bin"]
    assert "2 fetched" in done.stdout


def test_pull_errors_exit_with_the_contract_codes(tmp_path: Path) -> None:
    """A prefix with nothing under it: exit 2 naming PODTRAIN_DATA_URI; no URI at all: exit 2 saying so."""
    missing = _podtrain("pull", (tmp_path / "nothing").as_uri(), "--dest", str(tmp_path / "d"))
    assert missing.returncode == 2 and "PODTRAIN_DATA_URI" in missing.stderr
    none = _podtrain("pull", env={"PODTRAIN_DATA_URI": ""}, cwd=tmp_path)
    assert none.returncode == 2 and "nothing to pull" in none.stderr
    helped = _podtrain("pull", "--help")
    assert helped.returncode == 0 and "examples:" in helped.stdout and "--include" in helped.stdout


def test_run_pulls_the_data_before_the_child_starts(tmp_path: Path) -> None:
    """`podtrain run` with PODTRAIN_DATA_URI: the child finds the dataset in PODTRAIN_DATA_DIR when it starts."""
    store = tmp_path / "store"
    _bucket(store.as_uri())
    seen = tmp_path / "seen.txt"
    env = {
        "PODTRAIN_DATA_URI": f"{store.as_uri()}/ds",
        "PODTRAIN_DATA_DIR": str(tmp_path / "d"),
        "PODTRAIN_ATTEMPT": "1",
        "PODTRAIN_CHECKPOINT_URI": str(tmp_path / "ckpt"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "term"),
    }
    child = f'ls "$PODTRAIN_DATA_DIR/train" > {seen}'
    done = _podtrain("run", "--", "sh", "-c", child, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert seen.read_text().split() == ["a.bin"]


def test_run_whose_data_pull_fails_does_not_start_the_child(tmp_path: Path) -> None:
    """A data URI with nothing under it: exit 2, the child never runs, the termination message says why."""
    seen = tmp_path / "ran"
    env = {
        "PODTRAIN_DATA_URI": (tmp_path / "empty").as_uri(),
        "PODTRAIN_DATA_DIR": str(tmp_path / "d"),
        "PODTRAIN_ATTEMPT": "1",
        "PODTRAIN_CHECKPOINT_URI": str(tmp_path / "ckpt"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "term"),
        "PODTRAIN_ARTIFACT_URI": str(tmp_path / "art"),
    }
    done = _podtrain("run", "--", "touch", str(seen), env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert not seen.exists()
    message = json.loads((tmp_path / "term").read_text())
    assert message["outcome"] == "config_error" and "data pull failed" in message["message"]
    (entry,) = json.loads((tmp_path / "art" / "local" / "run.json").read_text())["attempts"]
    assert (entry["outcome"], entry["exit_code"]) == ("config_error", 2), "the run record says so too"


@pytest.mark.parametrize(
    ("command", "options"),
    [("pull", ["--include", "--piece-mib", "--stall-seconds"]), ("push", ["--workers"]), ("record", ["--json"])],
)
def test_each_data_command_has_help_with_examples(command: str, options: list[str]) -> None:
    """`podtrain pull|push|record --help`: exit 0, its options, and an examples section with runnable lines."""
    helped = _podtrain(command, "--help")
    assert helped.returncode == 0, helped.stderr
    assert all(option in helped.stdout for option in options)
    examples = helped.stdout.split("examples:", 1)[1]
    assert f"podtrain {command} " in examples


@pytest.fixture
def https_s3(s3_url: str, s3_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The S3 server behind a TLS proxy whose certificate a test CA signed; AWS_ENDPOINT_URL is the https:// proxy and
    AWS_CA_BUNDLE that CA. Yields the proxy (its ``requests`` are what came over TLS)."""
    _bucket(s3_url)
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    proxy = FaultProxy(s3_server.port, tls=context).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    yield proxy
    proxy.stop()


def test_pull_over_https_trusts_the_ca_bundle_and_lists_once(https_s3: Any, s3_url: str, tmp_path: Path) -> None:
    """An HTTPS endpoint with a private CA in AWS_CA_BUNDLE: the listing and the GETs go over TLS, listed once."""
    done = _podtrain("pull", f"{s3_url}/ds", "--dest", str(tmp_path / "d"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fetched"] == 2
    assert (tmp_path / "d" / "train" / "a.bin").read_bytes() == b"a" * 5000
    listings = [target for method, target in https_s3.requests if "list-type=2" in target]
    assert len(listings) == 1, f"one listing: {listings}"


def test_an_untrusted_certificate_fails_fast_naming_aws_ca_bundle(
    https_s3: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the CA, the pull stops at once (no retries) with exit 2 and a message saying what to set."""
    monkeypatch.delenv("AWS_CA_BUNDLE")
    done = _podtrain("pull", f"{s3_url}/ds", "--dest", str(tmp_path / "d"))
    assert done.returncode == 2, done.stderr
    assert "AWS_CA_BUNDLE" in done.stderr and "not trusted" in done.stderr
    assert len(https_s3.requests) == 0, "nothing got past the handshake"


def test_run_pulls_over_https_listing_the_dataset_once(https_s3: Any, s3_url: str, tmp_path: Path) -> None:
    """`podtrain run` pulls the dataset over TLS before the child starts: one listing of the dataset, after the
    checks of the checkpoint store, and the child finds the files."""
    seen = tmp_path / "seen.txt"
    env = {
        "PODTRAIN_DATA_URI": f"{s3_url}/ds",
        "PODTRAIN_DATA_DIR": str(tmp_path / "d"),
        "PODTRAIN_CHECKPOINT_URI": f"{s3_url}/ckpt",
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "out"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "term"),
    }
    done = _podtrain("run", "--", "sh", "-c", f'ls "$PODTRAIN_DATA_DIR/train" > {seen}', env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert seen.read_text().split() == ["a.bin"]
    targets = [t for _, t in https_s3.requests]
    data_listings = [i for i, t in enumerate(targets) if "list-type=2" in t and "prefix=root%2Fds%2F" in t]
    checkpoint_look_ups = [i for i, t in enumerate(targets) if "root%2Fckpt" in t or "/root/ckpt" in t]
    assert len(data_listings) == 1, targets
    assert checkpoint_look_ups and checkpoint_look_ups[0] < data_listings[0], f"checked first: {targets}"
