"""A push never uploads what a symlink in the output folder points to outside it.

Real files and links, a real moto S3 bucket, the real ``podtrain push`` and ``podtrain run`` commands. A secret
string is planted in files next to the output folder; the whole bucket is then read back and must not hold it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import sdk.data.push
from sdk.data.push import push
from sdk.stores.store import open_store
from tests.conftest import BUCKET, CapturedLog

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
SECRET = f"PLANTED-SECRET-{uuid.uuid4().hex}".encode()

# name in the output folder -> why the push must skip it
OUTSIDE = {
    "secret-link": "outside",  # absolute link to a file next to the folder
    "hostname": "outside",  # /etc/hostname
    "up": "outside",  # ../secret.txt
    "logs/escape": "outside",  # ../../secret.txt from a subfolder
    "outside-dir": "outside",  # a directory link out of the folder
    "dangling": "dangling",  # a link to nothing, inside
    "dangling-out": "outside",  # a link to nothing, outside: outside first, the target is not looked at
    "logs/again": "directory",  # a directory link inside the folder: not followed
}


def _plant(tmp_path: Path) -> Path:
    """An output folder with real files, links out of it, links inside it; secrets beside it."""
    (tmp_path / "secret.txt").write_bytes(SECRET + b"\n")
    (tmp_path / "secretdir").mkdir()
    (tmp_path / "secretdir" / "key.pem").write_bytes(SECRET)
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "metrics.jsonl").write_bytes(b'{"step": 1}\n')
    (out / "logs" / "train.log").write_bytes(b"step 1 loss 2.5\n")
    os.symlink(tmp_path / "secret.txt", out / "secret-link")
    os.symlink("/etc/hostname", out / "hostname")
    os.symlink("../secret.txt", out / "up")
    os.symlink("../../secret.txt", out / "logs" / "escape")
    os.symlink(tmp_path / "secretdir", out / "outside-dir")
    os.symlink("nothing-here", out / "dangling")
    os.symlink(tmp_path / "nothing-here", out / "dangling-out")
    os.symlink("../logs", out / "logs" / "again")
    os.symlink("logs/train.log", out / "last.log")  # inside: uploaded under its own name, as a copy
    os.symlink("../metrics.jsonl", out / "logs" / "metrics-link")  # inside, from a subfolder
    return out


def _bucket() -> dict[str, bytes]:
    """Every object in the whole test bucket, by key."""
    store = open_store(f"s3://{BUCKET}")
    return {rel: store.get(rel) for rel in store.walk("")}


def _assert_nothing_leaked(objects: dict[str, bytes]) -> None:
    hostname = Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() else None
    for key, data in objects.items():
        assert SECRET not in data, f"{key} holds the planted secret"
        assert not (hostname and data == hostname), f"{key} is a copy of /etc/hostname"


def test_push_never_uploads_a_link_target_outside_the_folder_and_names_what_it_skipped(
    s3_url: str, tmp_path: Path, captured_log: CapturedLog
) -> None:
    """Links out of the folder, dangling ones and directory links are skipped and listed; inside links are copies."""
    out = _plant(tmp_path)
    result = push(out, f"{s3_url}/artifacts/r1")
    objects = _bucket()
    _assert_nothing_leaked(objects)
    prefix = "root/artifacts/r1/"
    assert {k.removeprefix(prefix) for k in objects} == {
        "metrics.jsonl",
        "logs/train.log",
        "last.log",
        "logs/metrics-link",
    }
    assert objects[prefix + "last.log"] == b"step 1 loss 2.5\n"
    assert objects[prefix + "logs/metrics-link"] == b'{"step": 1}\n'
    assert set(result.links_skipped) == set(OUTSIDE)
    for name, why in OUTSIDE.items():
        assert why in result.links_skipped[name], (name, result.links_skipped[name])
    assert (result.files, result.sent) == (4, 4)
    done = captured_log.records("push.done")
    assert done and set(done[0]["links_skipped"]) == set(OUTSIDE)
    assert {r["name"] for r in captured_log.records("push.link_skipped")} == set(OUTSIDE)
    assert SECRET.decode() not in captured_log.text
    again = push(out, f"{s3_url}/artifacts/r1")  # incremental: nothing new, the same links skipped again
    assert again.sent == 0 and set(again.links_skipped) == set(OUTSIDE)


def test_a_file_swapped_for_a_link_after_the_scan_is_not_followed(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the scan and the upload a file becomes a link to the secret, and a folder a link to a secret folder:
    neither is followed (the files are opened without following any link); both are reported skipped."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "secretdir").mkdir()
    (tmp_path / "secretdir" / "data.txt").write_bytes(SECRET)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "model.txt").write_bytes(b"weights")
    (out / "sub" / "data.txt").write_bytes(b"data")
    (out / "keep.txt").write_bytes(b"kept")
    real_open_store = sdk.data.push.open_store

    def swap_then_open(*args: Any, **kwargs: Any) -> Any:  # called after the folder was scanned
        (out / "model.txt").unlink()
        os.symlink(tmp_path / "secret.txt", out / "model.txt")
        (out / "sub" / "data.txt").unlink()
        (out / "sub").rmdir()
        os.symlink(tmp_path / "secretdir", out / "sub")
        return real_open_store(*args, **kwargs)

    monkeypatch.setattr(sdk.data.push, "open_store", swap_then_open)
    result = push(out, f"{s3_url}/artifacts/r2", workers=1)
    objects = _bucket()
    _assert_nothing_leaked(objects)
    assert {k.removeprefix("root/artifacts/r2/") for k in objects} == {"keep.txt"}
    assert set(result.links_skipped) == {"model.txt", "sub/data.txt"}
    assert all("after the scan" in why for why in result.links_skipped.values())


def test_podtrain_push_skips_links_out_of_the_folder_exits_0_and_says_so(s3_url: str, tmp_path: Path) -> None:
    """The real CLI: exit 0 (skipping is not an error), the summary line and --json name the skipped links."""
    out = _plant(tmp_path)
    env = {**os.environ, "PODTRAIN_LOG_LEVEL": "warning"}
    done = subprocess.run(
        [PODTRAIN, "push", str(out), f"{s3_url}/artifacts/cli", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert "8 links skipped" in summary and "secret-link" in summary and "logs/escape" in summary
    assert SECRET.decode() not in done.stdout + done.stderr
    again = subprocess.run(
        [PODTRAIN, "push", str(out), f"{s3_url}/artifacts/cli", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    assert set(answer["links_skipped"]) == set(OUTSIDE) and answer["files"] == 4
    _assert_nothing_leaked(_bucket())


def test_the_supervisor_push_after_the_child_skips_links_out_of_the_folder(s3_url: str, tmp_path: Path) -> None:
    """`podtrain run`: the child leaves a link to a secret in its output folder; the end-of-run push skips it and
    the supervisor's log line names it; the exit code is the child's."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    env = {
        **os.environ,
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "out"),
        "PODTRAIN_ARTIFACT_URI": f"{s3_url}/artifacts",
        "PODTRAIN_RUN_ID": "r3",
        "PODTRAIN_ATTEMPT": "1",
        "PODTRAIN_CHECKPOINT_URI": str(tmp_path / "ckpt"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "term"),
        "PODTRAIN_LOG_FORMAT": "json",
    }
    child = (
        'mkdir -p "$PODTRAIN_OUTPUT_DIR" && echo step-7 > "$PODTRAIN_OUTPUT_DIR/metrics.jsonl" && '
        f'ln -s {tmp_path / "secret.txt"} "$PODTRAIN_OUTPUT_DIR/token"'
    )
    done = subprocess.run(
        [PODTRAIN, "run", "--", "sh", "-c", child], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    objects = _bucket()
    _assert_nothing_leaked(objects)
    assert {k.removeprefix("root/artifacts/r3/") for k in objects if "/r3/" in k} >= {"metrics.jsonl"}
    assert not any(k.endswith("/token") for k in objects)
    pushed = [json.loads(line) for line in done.stderr.splitlines() if '"supervisor.pushed"' in line]
    assert pushed and list(pushed[0]["links_skipped"]) == ["token"]


def test_a_file_over_the_multipart_threshold_is_streamed_from_its_descriptor(s3_url: str, tmp_path: Path) -> None:
    """S3 parts are read from the descriptor opened without following links: a big file, and an inside link to it,
    both land whole; a link to a big file outside does not."""
    from sdk.stores._s3 import S3_MULTIPART_THRESHOLD

    big = os.urandom(S3_MULTIPART_THRESHOLD + 123)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.bin").write_bytes(big)
    os.symlink("model.bin", out / "latest.bin")
    (tmp_path / "big-secret.bin").write_bytes(SECRET * (S3_MULTIPART_THRESHOLD // len(SECRET) + 1))
    os.symlink(tmp_path / "big-secret.bin", out / "other.bin")
    result = push(out, f"{s3_url}/artifacts/big")
    store = open_store(f"{s3_url}/artifacts/big")
    assert sorted(store.walk("")) == ["latest.bin", "model.bin"]
    assert store.get("model.bin") == big and store.get("latest.bin") == big
    assert list(result.links_skipped) == ["other.bin"]
