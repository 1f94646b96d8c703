"""podtrain's SDK: verified checkpoints on any object store, exact resume.

``import sdk`` is light: names that need torch (checkpoints, RNG, the data position, the run) are imported
only when first touched, so the supervisor can use config, storage and logs without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CheckpointInfo",
    "Checkpointer",
    "Config",
    "ResumableLoader",
    "Run",
    "Store",
    "errors",
    "init",
    "open_store",
    "testing",
]

_LAZY = {
    "CheckpointInfo": "sdk.checkpoints.checkpointer",
    "Checkpointer": "sdk.checkpoints.checkpointer",
    "Config": "sdk.config",
    "ResumableLoader": "sdk.data.loader",
    "Run": "sdk.run",
    "Store": "sdk.stores.store",
    "errors": "sdk.errors",
    "init": "sdk.run",
    "open_store": "sdk.stores.store",
    "testing": "sdk.testing",
}

if TYPE_CHECKING:
    from sdk import errors, testing
    from sdk.checkpoints.checkpointer import Checkpointer, CheckpointInfo
    from sdk.config import Config
    from sdk.data.loader import ResumableLoader
    from sdk.run import Run, init
    from sdk.stores.store import Store, open_store


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    value = importlib.import_module(module)
    return value if name in ("errors", "testing") else getattr(value, name)


def __dir__() -> list[str]:
    return sorted(__all__)
