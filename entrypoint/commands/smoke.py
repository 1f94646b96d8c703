"""``podtrain smoke``: the GPU preflight — does this pod really have the GPUs it asked for, and do they work?

A training pod that lands on a node without the NVIDIA device plugin, on the wrong pool, or with a driver too old
for the image's CUDA fails minutes in, after the data pull, with an error far from its cause; and a retry lands
it there again. The DAG therefore runs this first, in a small pod with the same GPU request, node selector and
tolerations. It checks, in order, and stops at the first failure with the likely cause:

1. torch imports and is a CUDA build (the image's torch, not a CPU wheel);
2. CUDA initialises and sees at least the GPUs expected (``--gpus``, else those ``CUDA_VISIBLE_DEVICES`` /
   ``NVIDIA_VISIBLE_DEVICES`` name, else one);
3. on every GPU, a matrix product gives the right answer (checked against the same product done in float64 on
   the CPU) and its speed is measured;
4. NCCL is there (its version), for multi-GPU training.

It prints one JSON document (``--json``) or a few lines, and writes the termination message
(``PODTRAIN_TERMINATION_LOG``) itself — ``{"outcome": "smoke_passed" | "smoke_failed", "exit_code", "message",
…}`` — so the DAG's classifier can say why without reading logs. Exit 0 when everything passed, 1 otherwise:
a GPU node that is not fit for training is not a preemption, and retrying on it would fail the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from entrypoint import termination
from entrypoint._gpus import gpu_count
from sdk.outcomes import EXIT_FAILED, EXIT_OK, SMOKE_FAILED, SMOKE_PASSED

__all__ = ["LIKELY_CAUSES", "add_parser", "check", "run"]

LIKELY_CAUSES = {
    "torch_cpu": "the image's torch is a CPU build: build the image FROM podtrain's CUDA base (docker/Dockerfile)",
    "no_gpu": (
        "the pod sees no GPU: check that it requests nvidia.com/gpu in its resource limits, that it landed on the "
        "GPU node pool (node selector and tolerations), and that the NVIDIA device plugin runs on that node"
    ),
    "too_few": (
        "the pod sees fewer GPUs than it asked for: check the nvidia.com/gpu limit and CUDA_VISIBLE_DEVICES, and "
        "that the node's device plugin advertises them all"
    ),
    "cuda_init": (
        "CUDA failed to initialise: the node's NVIDIA driver is likely older than the image's CUDA needs "
        "(CUDA 13.0: driver 580 or newer), or the driver is not mounted into the container (the NVIDIA container "
        "runtime / device plugin)"
    ),
    "wrong_result": "a GPU computed a wrong matrix product: a faulty GPU or driver; cordon the node",
    "no_nccl": "torch has no NCCL: multi-GPU training cannot run with this image",
}


def add_parser(commands: Any) -> None:
    smoke = commands.add_parser(
        "smoke",
        help="GPU preflight: torch sees the GPUs, CUDA works, a matmul is right, NCCL is there",
        description="\n\n".join(__doc__.split("\n\n")[1:3]).replace("``", "") if __doc__ else None,  # with the list
        epilog="examples:\n  podtrain smoke\n  podtrain smoke --gpus 8 --json\n"
        "  podtrain smoke --allow-cpu   # the checks that need no GPU (CI, a laptop)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    smoke.add_argument("--gpus", type=int, default=None, help="GPUs expected (default: as many as are visible, ≥ 1)")
    smoke.add_argument("--size", type=int, default=2048, help="matrix side of the test product (default 2048)")
    smoke.add_argument("--allow-cpu", action="store_true", help="pass without a GPU (only torch is checked)")
    smoke.add_argument("--json", action="store_true", help="print the result as one JSON document")
    smoke.add_argument("--termination-log", default=None, help="overrides PODTRAIN_TERMINATION_LOG")


def expected_gpus(env: Mapping[str, str] | None = None) -> int | None:
    """The GPU count the environment names (CUDA_VISIBLE_DEVICES, else NVIDIA_VISIBLE_DEVICES), if it names one."""
    count = gpu_count(env)
    return count or None


def check(*, gpus: int | None, size: int, allow_cpu: bool, torch: Any = None) -> dict[str, Any]:
    """Run the checks; a dict with ``ok``, the facts found, and on failure ``problem`` and ``cause``."""
    result: dict[str, Any] = {"ok": False}
    if torch is None:
        import torch as torch_module

        torch = torch_module
    result["torch"] = torch.__version__
    result["cuda_build"] = torch.version.cuda
    if not torch.version.cuda:
        if allow_cpu:
            return {**result, "ok": True, "note": "no CUDA build; --allow-cpu"}
        return _failed(result, "torch_cpu", f"torch {torch.__version__} has no CUDA")
    try:
        available = bool(torch.cuda.is_available())
        count = int(torch.cuda.device_count()) if available else 0
    except Exception as exc:  # a driver/runtime mismatch raises here on some versions
        return _failed(result, "cuda_init", f"{type(exc).__name__}: {exc}")
    result["gpus"] = count
    if count == 0:
        if allow_cpu:
            return {**result, "ok": True, "note": "no GPU visible; --allow-cpu"}
        return _failed(result, "no_gpu", "torch.cuda sees no device")
    want = gpus or expected_gpus() or 1
    result["gpus_expected"] = want
    if count < want:
        return _failed(result, "too_few", f"{count} GPU(s) visible, {want} expected")
    devices = []
    for index in range(count):
        try:
            devices.append(_device(torch, index, size))
        except Exception as exc:
            return _failed({**result, "devices": devices}, "cuda_init", f"GPU {index}: {type(exc).__name__}: {exc}")
        if not devices[-1]["matmul_ok"]:
            return _failed({**result, "devices": devices}, "wrong_result", f"GPU {index}: the product was wrong")
    result["devices"] = devices
    result["driver"] = _driver_version(torch)
    try:
        nccl = torch.cuda.nccl.version()
        result["nccl"] = ".".join(str(part) for part in nccl) if isinstance(nccl, tuple) else str(nccl)
    except Exception as exc:
        return _failed(result, "no_nccl", f"{type(exc).__name__}: {exc}")
    return {**result, "ok": True}


def _device(torch: Any, index: int, size: int) -> dict[str, Any]:
    device = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    generator = torch.Generator().manual_seed(index)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    expected = (a.double() @ b.double()).float()
    a_gpu, b_gpu = a.to(device), b.to(device)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    product = a_gpu @ b_gpu  # float32 (TF32 off by default for matmul): a tight tolerance holds
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    error = float((product.cpu() - expected).abs().max() / expected.abs().max())
    return {
        "index": index,
        "name": torch.cuda.get_device_name(index),
        "capability": ".".join(str(x) for x in torch.cuda.get_device_capability(index)),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "matmul_ok": error < 1e-2,
        "matmul_relative_error": error,
        "matmul_tflops": round(2 * size**3 / max(seconds, 1e-9) / 1e12, 2),
    }


def _driver_version(torch: Any) -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` where the image has it (the NVIDIA runtime mounts it), else
    the CUDA driver API version torch reports; None when neither answers."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            return out.stdout.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    try:
        version = int(torch._C._cuda_getDriverVersion())
        return f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
    except Exception:
        return None


def _failed(result: dict[str, Any], cause: str, problem: str) -> dict[str, Any]:
    return {**result, "ok": False, "problem": problem, "cause": cause, "likely": LIKELY_CAUSES[cause]}


def run(args: argparse.Namespace) -> int:
    """``podtrain smoke``: 0 when the pod is fit to train, 1 with the likely cause otherwise."""
    started = time.monotonic()
    try:
        result = check(gpus=args.gpus, size=args.size, allow_cpu=args.allow_cpu)
    except ImportError as exc:
        result = _failed({"ok": False}, "torch_cpu", f"torch cannot be imported: {exc}")
    code = EXIT_OK if result["ok"] else EXIT_FAILED
    message = (
        f"smoke passed: {result.get('gpus', 0)} GPU(s)"
        + (f", {result['devices'][0]['name']}" if result.get("devices") else "")
        + (f", NCCL {result['nccl']}" if result.get("nccl") else "")
        if result["ok"]
        else f"smoke failed: {result['problem']} — {result['likely']}"
    )
    line = json.dumps(
        {
            "outcome": SMOKE_PASSED if result["ok"] else SMOKE_FAILED,
            "exit_code": code,
            "seconds": round(time.monotonic() - started, 3),
            "gpus": result.get("gpus", 0),
            "cause": result.get("cause"),
            "message": message,
        }
    )
    path = args.termination_log or os.environ.get("PODTRAIN_TERMINATION_LOG") or termination.DEFAULT_TERMINATION_LOG
    termination.write_termination_log(path, line, warn=lambda text: print(f"podtrain: {text}", file=sys.stderr))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(message)
        for device in result.get("devices", []):
            print(
                f"  GPU {device['index']}: {device['name']} (sm {device['capability']}, {device['memory_gib']} GiB), "
                f"matmul {device['matmul_tflops']} TFLOPS, relative error {device['matmul_relative_error']:.1e}"
            )
        if result.get("torch"):
            print(f"  torch {result['torch']}, CUDA {result.get('cuda_build')}, driver {result.get('driver')}")
    return code
