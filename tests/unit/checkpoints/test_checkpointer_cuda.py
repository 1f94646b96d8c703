"""Checkpoints of CUDA state: tensors on the GPU, a GradScaler, and every CUDA device's RNG. Needs CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randn(16, 32, device="cuda")).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return {"model": model, "optimizer": opt, "scaler": scaler}


@pytest.mark.parametrize("shard_bytes", [128 * 2**20, 4096], ids=["one-file", "sharded"])
def test_cuda_model_optimizer_and_scaler_round_trip_onto_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard_bytes: int
) -> None:
    """Weights, AdamW moments and the GradScaler's scale come back equal, and the weights stay on CUDA."""
    monkeypatch.setattr("sdk.checkpoints.serialization.SHARD_BYTES", shard_bytes)
    saved = _cuda_state(1)
    Checkpointer(str(tmp_path), attempt=1).save(3, saved)
    restored = _cuda_state(2)
    assert Checkpointer(str(tmp_path), attempt=2).load(restored) == 3
    for (name, a), b in zip(saved["model"].state_dict().items(), restored["model"].state_dict().values(), strict=True):
        assert b.is_cuda, name
        assert torch.equal(a, b), name
    a_opt, b_opt = saved["optimizer"].state_dict()["state"], restored["optimizer"].state_dict()["state"]
    assert all(torch.equal(a_opt[i]["exp_avg"].cpu(), b_opt[i]["exp_avg"].cpu()) for i in a_opt)
    assert saved["scaler"].get_scale() == restored["scaler"].get_scale()


def test_cuda_rng_of_every_device_is_restored(tmp_path: Path) -> None:
    """Random draws on each CUDA device after a load repeat the draws made right after the save."""
    torch.cuda.manual_seed_all(123)
    ckpt = Checkpointer(str(tmp_path), attempt=1)
    ckpt.save(1, {"extra": {}})
    expected = [torch.rand(4, device=f"cuda:{d}") for d in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(999)
    Checkpointer(str(tmp_path), attempt=2).load({"extra": {}})
    actual = [torch.rand(4, device=f"cuda:{d}") for d in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True))


def test_async_snapshot_of_cuda_state_uses_pinned_buffers_and_holds_the_values_at_the_call(tmp_path: Path) -> None:
    """checkpoint() queues non-blocking copies into pinned buffers; the next optimizer step is not written."""
    import sdk
    from sdk.config import Config

    state = _cuda_state(3)
    before = {k: v.detach().cpu().clone() for k, v in state["model"].state_dict().items()}
    with sdk.init(Config(checkpoint_uri=str(tmp_path), attempt=1)) as run:
        future = run.checkpoint(1, state)
        assert future is not None
        assert run.saver is not None
        buffers = list(run.saver.snapshot._buffers.values())
        assert buffers and all(b.is_pinned() for b in buffers if b.numel())
        with torch.no_grad():  # changed on the GPU right away, in stream order after the copies
            for p in state["model"].parameters():
                p.mul_(-3.0)
        future.result(timeout=60)
    restored = _cuda_state(4)
    assert Checkpointer(str(tmp_path), attempt=2).load(restored) == 1
    for name, value in restored["model"].state_dict().items():
        assert torch.equal(value.cpu(), before[name]), name


def test_overlap_mode_on_cuda_commits_the_state_before_the_next_step(tmp_path: Path) -> None:
    """Overlap mode on CUDA: forward/backward run while the copy is pending; the step waits for it."""
    import sdk
    from sdk.config import Config

    state = _cuda_state(5)
    before = {k: v.detach().cpu().clone() for k, v in state["model"].state_dict().items()}
    with sdk.init(Config(checkpoint_uri=str(tmp_path), attempt=1, checkpoint_mode="overlap")) as run:
        future = run.checkpoint(1, state)
        assert future is not None
        loss = state["model"](torch.randn(16, 32, device="cuda")).pow(2).mean()
        loss.backward()
        state["optimizer"].step()
        future.result(timeout=60)
    restored = _cuda_state(6)
    assert Checkpointer(str(tmp_path), attempt=2).load(restored) == 1
    for name, value in restored["model"].state_dict().items():
        assert torch.equal(value.cpu(), before[name]), name
