"""entrypoint._gpus: the GPUs the child sees, counted from the environment without torch."""

from __future__ import annotations

import pytest

from entrypoint._gpus import gpu_count


@pytest.mark.parametrize(
    ("env", "count"),
    [
        ({}, 0),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0),
        ({"CUDA_VISIBLE_DEVICES": "0,-1,2"}, 1),
        ({"CUDA_VISIBLE_DEVICES": "GPU-8c1f,GPU-77aa"}, 2),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, 0),
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, 0),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1"}, 2),
        ({"CUDA_VISIBLE_DEVICES": "3", "NVIDIA_VISIBLE_DEVICES": "0,1,2,3"}, 1),
    ],
)
def test_gpu_count_reads_visible_devices_without_torch(env: dict[str, str], count: int) -> None:
    """GPUs are counted from CUDA_VISIBLE_DEVICES then NVIDIA_VISIBLE_DEVICES; all/void/empty count 0."""
    assert gpu_count(env) == count
