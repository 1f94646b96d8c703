"""A consistent copy of the training state in reused CPU buffers, taken in the time of a memory copy.

An asynchronous checkpoint must write the state as it was when :meth:`Run.checkpoint` was called, while
training goes on and the next optimizer step changes the tensors. :class:`Snapshot` copies every tensor of the
state's ``state_dict()`` results into CPU buffers that it keeps and reuses from one save to the next (same path,
shape and dtype: no allocation after the first save), and deep-copies everything else (step counters, learning
rates, param-group settings — small). What it returns has the same structure as its input and shares nothing
with the live state, so serialization can read it in a background thread.

CUDA tensors go to *pinned* buffers with ``non_blocking=True`` copies: the copies are queued on the tensor's
current stream, so work queued after them (the next optimizer step) cannot overtake them, and the call returns
without waiting for the transfer. :meth:`Snapshot.wait` (called by the background writer before it reads the
buffers) waits for the copies on a CUDA event.

Only one snapshot's buffers exist: the caller (:mod:`sdk.checkpoints.saver`) takes a new snapshot only after the
previous
one has been written.

**Deferred copies** (``defer=``): parameters and optimizer state change only in the optimizer's step, so their
copy need not stall the training loop — it can run while the next forward and backward do. :meth:`take` then
builds the structure, copies everything else (module buffers such as BatchNorm statistics change in forward,
the scheduler changes learning rates in place), and leaves the chosen tensors for :meth:`finish`, which the
background writer calls at once and an optimizer step pre-hook calls if the step comes first; whichever comes
second finds the copies done.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sdk.checkpoints._tree import Path, map_leaves

__all__ = ["Snapshot"]


class Snapshot:
    """Reused CPU buffers, and the copy of a state's payloads into them."""

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        # Pinning is only worth it (and only possible) when there is CUDA to copy from.
        self._pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[Path, torch.Tensor] = {}
        self._seen: set[Path] = set()
        self._events: list[Any] = []
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._lock = threading.Lock()
        self._defer: Callable[[torch.Tensor], bool] = lambda tensor: False
        self.bytes = 0

    def take(
        self, payloads: Iterable[tuple[str, Any]], *, defer: Callable[[torch.Tensor], bool] | None = None
    ) -> list[tuple[str, Any]]:
        """Copy ``(name, payload)`` pairs into the buffers; returns the copies, structure preserved.

        Tensors on CUDA are copied without waiting, and tensors ``defer`` picks are copied by :meth:`finish`:
        call :meth:`finish` and :meth:`wait` before reading the result.
        """
        self._seen = set()
        self._events = []
        self._deferred = []
        self._defer = defer or (lambda tensor: False)
        self.bytes = 0
        cuda_devices: set[torch.device] = set()
        copied = [(name, self._copy((name,), value, cuda_devices)) for name, value in payloads]
        self._record(cuda_devices)
        for stale in set(self._buffers) - self._seen:  # a tensor that is gone frees its buffer
            del self._buffers[stale]
        return copied

    @property
    def pending(self) -> bool:
        """Whether deferred copies are still to be made."""
        return bool(self._deferred)

    def finish(self) -> None:
        """Make the deferred copies (thread-safe; a second caller waits for the first, then finds nothing)."""
        with self._lock:
            if not self._deferred:
                return
            cuda_devices: set[torch.device] = set()
            for buffer, tensor in self._deferred:
                if tensor.is_cuda:
                    buffer.copy_(tensor, non_blocking=True)
                    cuda_devices.add(tensor.device)
                else:
                    buffer.copy_(tensor)
            self._record(cuda_devices)
            self._deferred = []

    def wait(self) -> None:
        """Block until every copy of the last :meth:`take` has landed (deferred ones included)."""
        self.finish()
        for event in self._events:
            event.synchronize()
        self._events = []

    def _record(self, cuda_devices: set[torch.device]) -> None:
        for device in cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)

    @property
    def buffer_bytes(self) -> int:
        """Bytes held in reusable buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def _copy(self, path: Path, value: Any, cuda_devices: set[torch.device]) -> Any:
        def leaf(at: Path, item: Any) -> Any:
            if isinstance(item, torch.Tensor):
                return self._copy_tensor(at, item, cuda_devices)
            return copy.deepcopy(item)

        return map_leaves(value, leaf, path=path)

    def _copy_tensor(self, path: Path, tensor: torch.Tensor, cuda_devices: set[torch.device]) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type not in ("cpu", "cuda"):
            return tensor.to("cpu", copy=True)  # rare layouts: a fresh copy, no buffer reuse
        self.bytes += tensor.numel() * tensor.element_size()
        self._seen.add(path)
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = self._pin and tensor.is_cuda
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            self._buffers[path] = buffer
        if tensor.numel() and self._defer(tensor):
            self._deferred.append((buffer, tensor))
        elif tensor.is_cuda:
            buffer.copy_(tensor, non_blocking=True)
            cuda_devices.add(tensor.device)
        else:
            buffer.copy_(tensor)
        return buffer
