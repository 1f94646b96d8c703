"""examples/train.py under `podtrain run`: it pulls its data, learns, exports, and resumes exactly after a SIGTERM.

Every run gets its own "bucket" folder (file:// URLs, as the demo uses) with a small generated dataset, and
runs with cwd in the test's folder, so nothing lands in the checkout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train.py")
DATASET = str(ROOT / "examples" / "dataset.py")
PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
TORCHRUN = Path(sys.executable).with_name("torchrun")
# 64 KiB of text: 1,023 windows, 63 batches of 16 an epoch, so 100 steps cross an epoch boundary. Dropout
# draws from the RNG every step, so an exact resume needs the RNG states back too.
STEPS, EVERY, ARGS = 100, 20, ["--batch-size", "16", "--log-every", "10", "--threads", "2", "--dropout", "0.1"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A generated dataset in a local "bucket", as a file:// URL."""
    data = tmp_path_factory.mktemp("bucket") / "data"
    cmd = [sys.executable, DATASET, "--out", data.as_uri(), "--shards", "2", "--mib", "0.0625"]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)
    return data.as_uri()


def _env(tmp: Path, data_uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTRAIN_")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {
        **env,
        "PODTRAIN_RUN_ID": "example",
        "PODTRAIN_DATA_URI": data_uri,
        "PODTRAIN_DATA_DIR": str(tmp / "data"),
        "PODTRAIN_CHECKPOINT_URI": (tmp / "bucket" / "ckpt").as_uri(),
        "PODTRAIN_ARTIFACT_URI": (tmp / "bucket" / "artifacts").as_uri(),
        "PODTRAIN_OUTPUT_DIR": str(tmp / "output"),
        "PODTRAIN_TERMINATION_LOG": str(tmp / "termination-log"),
        "PODTRAIN_GRACE_SECONDS": "30",
        "PODTRAIN_LOG_FORMAT": "json",
        "PODTRAIN_LOG_LEVEL": "warning",
        **extra,
    }


def _train(*extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, TRAIN, "--steps", str(steps), "--checkpoint-every", str(EVERY), *ARGS, *extra]


def _summary(stdout: str) -> dict[str, Any]:
    """The last line of rank 0's stdout: one JSON object (train.done / train.stopped)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def _run(tmp: Path, data_uri: str, cmd: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [PODTRAIN, "run", "--", *cmd],
        env=_env(tmp, data_uri, **extra),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_uri: str) -> tuple[Path, dict[str, Any]]:
    """One whole run, never interrupted: its folder and its summary."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return tmp, _summary(_run(tmp, data_uri, _train()).stdout)


def test_the_example_pulls_its_data_learns_and_pushes_the_export(
    uninterrupted: tuple[Path, dict[str, Any]],
) -> None:
    """Under `podtrain run` the data is pulled from the bucket, the loss falls well below the unigram entropy,
    and the exported weights and metrics are pushed to the artifact URI."""
    tmp, summary = uninterrupted
    assert summary["event"] == "train.done"
    assert (summary["start_step"], summary["end_step"], summary["world_size"]) == (0, STEPS, 1)
    assert summary["first_loss"] > 5.0  # ~ln(256): the untrained model guesses among all bytes
    # Below what letter frequencies alone give: the model learned spelling and grammar, not just the alphabet.
    assert summary["final_loss"] < summary["unigram_entropy"] - 0.5, summary
    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary
    assert sorted(p.name for p in (tmp / "data").glob("shard-*.txt")) == ["shard-000.txt", "shard-001.txt"]

    export = tmp / "output" / "export" / "model.safetensors"
    assert summary["export"] == str(export)
    pushed = tmp / "bucket" / "artifacts" / "example" / "export"
    assert (pushed / "model.safetensors").read_bytes() == export.read_bytes()
    sidecar = json.loads((pushed / "model.json").read_text())
    assert sidecar["step"] == STEPS and sidecar["final_loss"] == summary["final_loss"]
    weights = load_file(export)
    assert "head.weight" in weights and all(torch.isfinite(w).all() for w in weights.values())

    metrics = [json.loads(line) for line in (tmp / "output" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10, STEPS + 1, 10))
    assert (tmp / "bucket" / "artifacts" / "example" / "metrics.jsonl").exists()
    message = json.loads((tmp / "termination-log").read_text())
    assert message["outcome"] == "succeeded" and message["step"] == STEPS


@pytest.mark.slow  # ~30 s; the default suite checks the same through the demo's bitwise comparison
def test_preempted_and_resumed_ends_with_the_same_weights_as_uninterrupted(
    tmp_path: Path, data_uri: str, uninterrupted: tuple[Path, dict[str, Any]]
) -> None:
    """A real SIGTERM mid-run ends in exit 75 with the step committed; attempt 2 resumes from it, finishes, and its
    exported weights are bitwise equal to an uninterrupted run's."""
    ckpt = tmp_path / "bucket" / "ckpt"
    proc = subprocess.Popen(
        [PODTRAIN, "run", "--", *_train()],
        env=_env(tmp_path, data_uri, PODTRAIN_ATTEMPT="1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    give_up = time.monotonic() + TIMEOUT
    while not list(ckpt.glob("step-*/MANIFEST.json")):  # the first policy checkpoint (step 20) is committed
        assert proc.poll() is None, "training ended before it was preempted"
        assert time.monotonic() < give_up, "no checkpoint in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stdout + stderr[-4000:]
    stopped = _summary(stdout)
    assert stopped["event"] == "train.stopped" and EVERY <= stopped["end_step"] < STEPS, stopped
    assert not (tmp_path / "output" / "export").exists()
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["outcome"] == "preempted" and message["step"] == stopped["end_step"]

    resumed = _summary(_run(tmp_path, data_uri, _train(), PODTRAIN_ATTEMPT="2").stdout)
    assert (resumed["start_step"], resumed["end_step"]) == (stopped["end_step"], STEPS)
    assert resumed["final_loss"] == uninterrupted[1]["final_loss"]
    mine = load_file(tmp_path / "output" / "export" / "model.safetensors")
    reference = load_file(uninterrupted[0] / "output" / "export" / "model.safetensors")
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun is not installed beside {sys.executable}")
def test_torchrun_trains_data_parallel_on_two_cpu_processes_and_exports_once(tmp_path: Path, data_uri: str) -> None:
    """`torchrun --nproc_per_node=2` (gloo) under `podtrain run`: both ranks train and checkpoint together, rank 0
    alone prints the summary and exports."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", TRAIN, "--steps", "30", "--checkpoint-every", "10"]
    out = _run(tmp_path, data_uri, [*cmd, "--batch-size", "16", "--log-every", "10"])
    summary = _summary(out.stdout)  # exactly one JSON line: rank 1 prints nothing
    assert summary["event"] == "train.done" and summary["world_size"] == 2 and summary["end_step"] == 30
    assert summary["final_loss"] < summary["first_loss"]
    manifest = json.loads((tmp_path / "bucket" / "ckpt" / "step-0000000030" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2
    assert (tmp_path / "bucket" / "artifacts" / "example" / "export" / "model.safetensors").exists()
    assert not (tmp_path / "output" / "metrics-rank1.jsonl").exists()
    assert manifest["sharded"] == ["model", "optimizer"], "the DDP model and AdamW are saved once, not per rank"

    # A retry that gets one GPU instead of two resumes from the 2-rank checkpoint (resharded) and goes on learning.
    more = _run(tmp_path, data_uri, _train("--batch-size", "16", steps=40))
    resumed = _summary(more.stdout)
    assert resumed["world_size"] == 1 and resumed["start_step"] == 30 and resumed["end_step"] == 40
    assert resumed["final_loss"] < summary["first_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_it_trains_with_fp16_autocast_and_checkpoints_the_grad_scaler(tmp_path: Path, data_uri: str) -> None:
    """On a GPU the example trains under fp16 autocast with a GradScaler: the loss is finite and falls, and the
    scaler's state is in the checkpoint."""
    out = _run(tmp_path, data_uri, _train("--device", "cuda", steps=40))
    summary = _summary(out.stdout)
    assert summary["device"] == "cuda" and summary["end_step"] == 40
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"]
    assert list((tmp_path / "bucket" / "ckpt").glob("step-0000000040/attempt-*/scaler.pt"))


def test_without_a_data_uri_it_exits_2_saying_what_to_set(tmp_path: Path) -> None:
    """With neither PODTRAIN_DATA_URI nor --data, the example stops before training with exit 2 and a message
    naming the variable and the flag."""
    env = _env(tmp_path, "")
    del env["PODTRAIN_DATA_URI"]
    out = subprocess.run(_train(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2, out.stdout + out.stderr[-4000:]
    assert "PODTRAIN_DATA_URI is unset" in out.stderr and "--data" in out.stderr
