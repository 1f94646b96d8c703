"""How many GPUs the child sees, without torch: what the termination message's ``gpu_seconds`` and the run record
charge for, and what ``podtrain smoke`` expects to find."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["gpu_count"]

_NONE = ("", "all", "void", "none", "nodevfiles")


def gpu_count(env: Mapping[str, str] | None = None) -> int:
    """GPUs visible to the child, from ``CUDA_VISIBLE_DEVICES`` then ``NVIDIA_VISIBLE_DEVICES``; no torch.

    A variable that is unset, empty, ``all``, ``void`` or ``none`` does not count (0): ``all`` names no number
    without asking the driver. Counting stops at the first negative id, as CUDA does.
    """
    env = os.environ if env is None else env
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        raw = env.get(name)
        if raw is None:
            continue
        value = raw.strip()
        if value.lower() in _NONE:
            return 0
        count = 0
        for item in (part.strip() for part in value.split(",")):
            if not item or item.startswith("-"):
                break
            count += 1
        return count
    return 0
