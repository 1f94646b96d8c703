"""Pushing outputs (sdk.data.push, `podtrain push`, the supervisor's push when the child ends) on file://, S3, GCS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sdk.data.push import PUSH_INDEX, push
from sdk.stores._fsspec import FsspecBackend as Backend
from sdk.stores.store import Store, open_store

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))

pytestmark = pytest.mark.s3_servers  # the S3 tests run on moto and on SeaweedFS


def _outputs(folder: Path) -> dict[str, bytes]:
    files = {"metrics.jsonl": b'{"step": 1}\n', "logs/train.log": b"hello\n", "model.safetensors": os.urandom(50_000)}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    original = Store.upload_file

    def spy(self: Store, rel: str, local: Path, **kwargs: Any) -> Any:
        seen.append(rel)
        return original(self, rel, local, **kwargs)

    monkeypatch.setattr(Store, "upload_file", spy)
    return seen


def test_push_uploads_verified_and_a_second_push_sends_only_changes(
    store_url: str, tmp_path: Path, puts: list[str]
) -> None:
    """Every file lands with its bytes; pushing again sends nothing; a changed file alone is sent again."""
    out = tmp_path / "out"
    files = _outputs(out)
    first = push(out, f"{store_url}/artifacts/r1")
    assert (first.files, first.sent) == (3, 3)
    store = open_store(f"{store_url}/artifacts/r1")
    assert {rel: store.get(rel) for rel in files} == files
    assert not store.exists(PUSH_INDEX), "the record of what was sent stays local"
    puts.clear()
    assert push(out, f"{store_url}/artifacts/r1").sent == 0 and puts == []
    (out / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2}\n')
    assert push(out, f"{store_url}/artifacts/r1").sent == 1 and puts == ["metrics.jsonl"]


def test_podtrain_push_defaults_to_the_output_dir_and_the_run_folder(s3_url: str, tmp_path: Path) -> None:
    """`podtrain push` with no arguments: PODTRAIN_OUTPUT_DIR to PODTRAIN_ARTIFACT_URI/<run_id>."""
    files = _outputs(tmp_path / "out")
    env = {
        **os.environ,
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "out"),
        "PODTRAIN_ARTIFACT_URI": f"{s3_url}/artifacts",
        "PODTRAIN_RUN_ID": "r9",
    }
    done = subprocess.run([PODTRAIN, "push", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["url"] == f"{s3_url}/artifacts/r9"
    assert open_store(f"{s3_url}/artifacts/r9").get("logs/train.log") == files["logs/train.log"]


@pytest.mark.parametrize("exit_code", [0, 1, 75])
def test_run_pushes_the_outputs_when_the_child_ends_whatever_the_outcome(tmp_path: Path, exit_code: int) -> None:
    """The supervisor pushes PODTRAIN_OUTPUT_DIR after the child: on success, failure and preemption alike."""
    env = {
        **os.environ,
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "out"),
        "PODTRAIN_ARTIFACT_URI": (tmp_path / "bucket").as_uri(),
        "PODTRAIN_RUN_ID": "r2",
        "PODTRAIN_ATTEMPT": "1",
        "PODTRAIN_CHECKPOINT_URI": str(tmp_path / "ckpt"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "term"),
    }
    child = f'mkdir -p "$PODTRAIN_OUTPUT_DIR" && echo step-7 > "$PODTRAIN_OUTPUT_DIR/metrics.jsonl"; exit {exit_code}'
    done = subprocess.run(
        [PODTRAIN, "run", "--", "sh", "-c", child], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == exit_code, done.stderr
    assert (tmp_path / "bucket" / "r2" / "metrics.jsonl").read_text() == "step-7\n"


def test_metrics_and_the_exported_model_reach_the_store_verified(s3_url: str, tmp_path: Path) -> None:
    """log_metrics appends JSON lines; export writes safetensors + sidecar, pushes both; the bytes load back."""
    import torch
    from safetensors.torch import load

    import sdk
    from sdk.config import Config

    config = Config(
        run_id="r5",
        attempt=1,
        checkpoint_uri=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "out"),
        artifact_uri=f"{s3_url}/artifacts",
    )
    model = torch.nn.Linear(4, 3)
    with sdk.init(config) as run:
        run.log_metrics(1, loss=torch.tensor(2.5), lr=0.1)
        run.log_metrics(2, loss=1.25)
        result = run.export(model, step=2, dataset="toy")
    assert result.sent == 2
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 2.5), (2, 1.25)]
    store = open_store(f"{s3_url}/artifacts/r5/export")
    weights = load(store.get("model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    sidecar = json.loads(store.get("model.json"))
    assert sidecar["step"] == 2 and sidecar["run_id"] == "r5" and sidecar["dataset"] == "toy"
    assert sidecar["metrics"]["loss"] == 1.25


def test_the_files_held_in_memory_at_once_stay_within_the_budget(memory_url: str, tmp_path: Path) -> None:
    """With max_bytes=250 KB, 16 workers and ten 100 KB files, never more than two are read and in flight at once;
    a file over the whole budget still goes (alone)."""
    import threading
    import time

    out = tmp_path / "out"
    out.mkdir()
    for n in range(10):
        (out / f"shard-{n}.bin").write_bytes(os.urandom(100_000))
    (out / "big.bin").write_bytes(os.urandom(400_000))
    lock, live, seen = threading.Lock(), [], []
    original = Backend.upload

    def counting(self: Backend, path: str, data: bytes, **kwargs: Any) -> Any:
        with lock:
            live.append(len(data))
            seen.append(sorted(live))
        time.sleep(0.02)
        try:
            return original(self, path, data, **kwargs)
        finally:
            with lock:
                live.remove(len(data))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Backend, "upload", counting)
        result = push(out, f"{memory_url}/run", workers=16, max_bytes=250_000)
    assert result.sent == 11
    assert [400_000] in seen, "the file over the budget went, alone"
    assert all(sum(at_once) <= 250_000 for at_once in seen if at_once != [400_000])
    assert any(len(at_once) == 2 for at_once in seen), "files still go in parallel within the budget"
