"""`podtrain smoke`: the GPU preflight names the likely cause of every way a GPU pod can be unfit to train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from entrypoint.cli import main
from entrypoint.commands import smoke


class FakeCuda:
    """torch.cuda for ``gpus`` healthy devices that compute on the CPU; ``wrong`` GPU indexes corrupt products."""

    def __init__(self, gpus: int, *, wrong: tuple[int, ...] = (), broken: bool = False) -> None:
        self.gpus, self.wrong, self.broken = gpus, wrong, broken
        self.nccl = SimpleNamespace(version=lambda: (2, 27, 7))

    def is_available(self) -> bool:
        if self.broken:
            raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
        return self.gpus > 0

    def device_count(self) -> int:
        return self.gpus

    def get_device_properties(self, index: int) -> Any:
        return SimpleNamespace(total_memory=141 * 2**30)

    def get_device_name(self, index: int) -> str:
        return "NVIDIA H200"

    def get_device_capability(self, index: int) -> tuple[int, int]:
        return (9, 0)

    def synchronize(self, device: Any = None) -> None:
        pass


class FakeTensor:
    """A CPU tensor whose ``.to(cuda)`` stays on the CPU, and whose product can be made wrong."""

    def __init__(self, tensor: torch.Tensor, wrong: bool) -> None:
        self.tensor, self.wrong = tensor, wrong

    def __matmul__(self, other: FakeTensor) -> FakeTensor:
        product = self.tensor @ other.tensor
        return FakeTensor(product + 1.0 if self.wrong else product, self.wrong)

    def cpu(self) -> torch.Tensor:
        return self.tensor


def fake_torch(cuda: FakeCuda, *, version: str | None = "13.0") -> Any:
    class Randn:
        def __call__(self, *shape: int, generator: Any) -> Any:
            real = torch.randn(*shape, generator=generator)
            wrapped = SimpleNamespace(double=real.double)
            wrapped.to = lambda device: FakeTensor(real, device.index in cuda.wrong)  # type: ignore[attr-defined]
            return wrapped

    return SimpleNamespace(
        __version__="2.13.0+cu130",
        version=SimpleNamespace(cuda=version),
        cuda=cuda,
        device=lambda kind, index: SimpleNamespace(type=kind, index=index),
        Generator=torch.Generator,
        randn=Randn(),
        _C=SimpleNamespace(_cuda_getDriverVersion=lambda: 13000),
    )


def test_a_cpu_build_of_torch_is_named_as_the_cause() -> None:
    """An image with a CPU torch fails with cause torch_cpu, pointing at the CUDA base image."""
    result = smoke.check(gpus=None, size=8, allow_cpu=False, torch=fake_torch(FakeCuda(0), version=None))
    assert not result["ok"] and result["cause"] == "torch_cpu" and "docker/Dockerfile" in result["likely"]


def test_no_visible_gpu_points_at_the_device_plugin_and_the_node_pool() -> None:
    """CUDA build, no device: the message names the GPU limit, the node pool and the NVIDIA device plugin."""
    result = smoke.check(gpus=None, size=8, allow_cpu=False, torch=fake_torch(FakeCuda(0)))
    assert result["cause"] == "no_gpu"
    assert (
        "nvidia.com/gpu" in result["likely"] and "node pool" in result["likely"] and "device plugin" in result["likely"]
    )


def test_fewer_gpus_than_visible_devices_name_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_VISIBLE_DEVICES names 4, torch sees 2: cause too_few, with both counts."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    result = smoke.check(gpus=None, size=8, allow_cpu=False, torch=fake_torch(FakeCuda(2)))
    assert result["cause"] == "too_few" and "2 GPU(s) visible, 4 expected" in result["problem"]


def test_a_driver_too_old_for_the_image_is_named() -> None:
    """CUDA failing to initialise (an old driver) names the driver version the image's CUDA needs."""
    result = smoke.check(gpus=None, size=8, allow_cpu=False, torch=fake_torch(FakeCuda(1, broken=True)))
    assert result["cause"] == "cuda_init" and "580" in result["likely"] and "insufficient" in result["problem"]


def test_healthy_gpus_pass_with_their_facts_and_the_nccl_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two working GPUs: ok, each product checked against float64, TFLOPS measured, NCCL version reported."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    result = smoke.check(gpus=2, size=64, allow_cpu=False, torch=fake_torch(FakeCuda(2)))
    assert result["ok"] and result["gpus"] == 2 and result["nccl"] == "2.27.7"
    assert [d["matmul_ok"] for d in result["devices"]] == [True, True]
    assert result["devices"][0]["name"] == "NVIDIA H200" and result["driver"] == "CUDA driver API 13.0"


def test_a_gpu_computing_a_wrong_product_is_caught() -> None:
    """A product far from the float64 reference on GPU 1: cause wrong_result, cordon the node."""
    result = smoke.check(gpus=2, size=64, allow_cpu=False, torch=fake_torch(FakeCuda(2, wrong=(1,))))
    assert result["cause"] == "wrong_result" and "GPU 1" in result["problem"] and "cordon" in result["likely"]


def test_the_command_exits_1_and_writes_the_cause_in_the_termination_message(tmp_path: Path) -> None:
    """On this CPU-only box `podtrain smoke` exits 1 and its termination message carries the cause."""
    log = tmp_path / "termination-log"
    assert main(["smoke", "--termination-log", str(log)]) == 1
    message = json.loads(log.read_text())
    assert message["outcome"] == "smoke_failed" and message["exit_code"] == 1 and message["cause"] == "torch_cpu"
    assert message["message"].startswith("smoke failed: ")


def test_allow_cpu_passes_the_checks_that_need_no_gpu() -> None:
    """`podtrain smoke --allow-cpu --json` (CI, a laptop) exits 0 and says what it could not check."""
    out = subprocess.run(
        [sys.executable, "-m", "entrypoint", "smoke", "--allow-cpu", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ok"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_real_gpu_every_check_passes() -> None:
    """On a CUDA machine the real checks pass: devices, products, NCCL."""
    result = smoke.check(gpus=None, size=1024, allow_cpu=False)
    assert result["ok"], result
    assert all(d["matmul_ok"] for d in result["devices"]) and result["nccl"]
