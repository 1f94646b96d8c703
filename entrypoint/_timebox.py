"""A call given a time limit: what the supervisor does with every store it talks to in its last seconds.

A store that does not answer must not hold ``podtrain run`` past the pod's grace period (the kubelet's SIGKILL
would cut the termination message short), nor hold ``podtrain push`` forever. The call runs in a daemon thread
and is left behind when its time is up; the caller gets the reason instead of the result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["within"]


def within(timeout: float, fn: Callable[[], Any], name: str) -> tuple[Any, str]:
    """``(fn(), "")``, or ``(None, why)`` when it raised or did not return within ``timeout`` (it is left behind)."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["value"] = fn()
        except Exception as exc:
            result["error"] = exc

    worker = threading.Thread(target=call, name=name, daemon=True)
    worker.start()
    worker.join(max(timeout, 0.0))
    if worker.is_alive():
        return None, f"did not answer within {timeout:.1f} s"
    if "error" in result:
        return None, f"unreadable: {result['error']}"
    return result["value"], ""
