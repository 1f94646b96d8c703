"""Asynchronous checkpoints: a snapshot now, serialization, hashing, upload and commit in the background.

:meth:`AsyncSaver.submit` takes a :class:`~sdk.checkpoints._snapshot.Snapshot` of the state (a copy into reused CPU
buffers;
the training loop is blocked only for that copy) and hands it to one background thread, which writes it with
:meth:`Checkpointer.write <sdk.checkpoints.checkpointer.Checkpointer.write>` — serialize, checksum, upload, commit,
prune.

**At most one save in flight.** The snapshot buffers are reused, so a second snapshot cannot be taken while
the first is being written. ``submit`` while a save is in flight waits for it; :class:`~sdk.run.Run` avoids
that wait for policy saves by deferring them (see :meth:`Run.checkpoint <sdk.run.Run.checkpoint>`).

**A failure is never silent.** The storage layer has already retried transient errors when a write fails. The
failure is logged at once (``checkpoint.failed``, from the background thread); a permanent one (denied, a
commit conflict, a stale attempt, a bug) is raised by the next call into the saver — ``submit``, ``check`` or
``wait`` — in the training thread. A transient one (the store stayed down through every retry) is raised too
once :data:`MAX_TRANSIENT_FAILURES` saves in a row have failed; until then training goes on and the next save
tries again, while the newest committed checkpoint stands.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any

import torch

from sdk.checkpoints._prepare import ShardedPart
from sdk.checkpoints._snapshot import Snapshot
from sdk.checkpoints.checkpointer import Checkpointer, CheckpointInfo
from sdk.log import get_logger

__all__ = ["MAX_TRANSIENT_FAILURES", "AsyncSaver"]

log = get_logger("podtrain.saver")
MAX_TRANSIENT_FAILURES = 3


class AsyncSaver:
    """Writes snapshots of a state in one background thread, one at a time."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        *,
        overlap: bool = False,
        snapshot: Snapshot | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checkpointer = checkpointer
        self.overlap = overlap
        self.snapshot = snapshot or Snapshot()
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="podtrain-save")
        self._inflight: Future[CheckpointInfo] | None = None
        self._inflight_step: int | None = None
        self._failure: BaseException | None = None
        self._transient_failures = 0
        self._hooked: set[int] = set()
        self._lock = threading.Lock()
        self.last_committed: CheckpointInfo | None = None
        self.last_stall: float | None = None  # seconds the last submit blocked its caller
        self.last_hook_wait = 0.0  # overlap mode: seconds optimizer steps waited for the last snapshot's copies
        self.write_seconds: deque[float] = deque(maxlen=5)  # the latest background writes (snapshot wait included)

    @property
    def busy(self) -> bool:
        """Whether a save is in flight."""
        return self._inflight is not None and not self._inflight.done()

    @property
    def inflight_step(self) -> int | None:
        """The step being written, or None."""
        return self._inflight_step if self.busy else None

    def submit(
        self, step: int, state: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None
    ) -> Future[CheckpointInfo]:
        """Snapshot ``state`` and write it as the checkpoint of ``step`` in the background.

        Waits first for a save in flight, and raises a failure it left (see the module's doc).
        """
        self.wait()
        started = self._clock()
        prepared = self.checkpointer.prepare(state)  # sharded state: planned with every rank, here
        defer = self._deferrable(state) if self.overlap else None
        self.last_hook_wait = 0.0
        copied = self.snapshot.take(prepared.payloads, defer=defer)
        if self.snapshot.pending:
            self._hook_optimizers(state)
        self.last_stall = self._clock() - started
        with self._lock:
            self._inflight_step = step
            self._inflight = self._pool.submit(self._write, step, copied, meta, prepared.sharded)
        return self._inflight

    def check(self) -> None:
        """Raise the failure a background save left, if it must be raised (see the module's doc)."""
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the save in flight (at most ``timeout`` seconds); raise what it left. True when none is left."""
        inflight = self._inflight
        if inflight is not None:
            wait_for([inflight], timeout=timeout)
        self.check()
        return not self.busy

    def close(self, timeout: float | None = None) -> bool:
        """Wait for the save in flight, then stop the thread. True when nothing was left running."""
        finished = self.wait(timeout)
        self._pool.shutdown(wait=finished)
        return finished

    # -- background ----------------------------------------------------------------------------------------
    def _write(
        self, step: int, copied: list[tuple[str, Any]], meta: Mapping[str, Any] | None, sharded: ShardedPart | None
    ) -> CheckpointInfo:
        # The bookkeeping happens here, before the future completes: a waiter woken by the future must find it
        # done (done-callbacks run only after waiters are woken).
        started = self._clock()
        try:
            self.snapshot.wait()
            info = self.checkpointer.write(step, copied, meta=meta, sharded=sharded)
        except BaseException as error:
            self._failed(step, error)
            raise
        self.write_seconds.append(self._clock() - started)
        self.last_committed = info
        self._transient_failures = 0
        return info

    def _failed(self, step: int, error: BaseException) -> None:
        transient = bool(getattr(error, "transient", False))
        self._transient_failures = self._transient_failures + 1 if transient else 0
        raise_it = not transient or self._transient_failures >= MAX_TRANSIENT_FAILURES
        log.error(
            "checkpoint.failed",
            step=step,
            error=f"{type(error).__name__}: {error}",
            transient=transient,
            consecutive=self._transient_failures if transient else None,
            action="raised at the next call" if raise_it else "training goes on; the next save tries again",
            standing=self.last_committed.url if self.last_committed else None,
        )
        if raise_it:
            with self._lock:
                self._failure = error

    # -- overlap ---------------------------------------------------------------------------------------------
    @staticmethod
    def _deferrable(state: Mapping[str, Any]) -> Callable[[torch.Tensor], bool]:
        """Tensors only an optimizer of the state changes: the parameters it steps, and its own state."""
        pointers: set[int] = set()
        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer):
                for group in obj.param_groups:
                    pointers.update(_pointer(p) for p in group["params"])
                for per_param in obj.state.values():
                    pointers.update(_pointer(v) for v in per_param.values() if isinstance(v, torch.Tensor))
        return lambda tensor: _pointer(tensor) in pointers

    def _hook_optimizers(self, state: Mapping[str, Any]) -> None:
        """Make each optimizer's step first finish the deferred copies (a no-op once they are done).

        Hooks stay for the saver's life: removing one from the background thread could race the training
        thread iterating the optimizer's hooks.
        """
        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer) and id(obj) not in self._hooked:
                self._hooked.add(id(obj))
                obj.register_step_pre_hook(self._before_step)

    def _before_step(self, *_: Any) -> None:
        if self.snapshot.pending:
            started = self._clock()
            self.snapshot.finish()
            self.last_hook_wait += self._clock() - started


def _pointer(tensor: torch.Tensor) -> int:
    """Where a tensor's data are: a DTensor's are its local shard's (a sharded save copies that shard). Called for
    every tensor of a save in overlap mode: no import here, a DTensor is what has ``to_local``."""
    local = getattr(tensor, "to_local", None)
    return int((local() if local is not None else tensor).data_ptr())
