"""Asynchronous checkpoints: how long the training loop waits, as ratios against baselines from the same run.

One moto S3 server is started on 127.0.0.1 (as in :mod:`bench.checkpoint`); the state is the same float32 model
shaped like a real one, ``--size-mib`` in all. Every case is measured ``--repeat`` times, the sides alternating
(forward order on even repetitions, reversed on odd ones); the table shows medians and their ratio.

* **stall** (``PODTRAIN_CHECKPOINT_MODE=async``): how long ``Run.checkpoint(step, {"model": model})`` blocks
  its caller (snapshot into reused CPU buffers; the write and commit go on in a background thread), against a
  plain copy of the same tensors into preallocated buffers, and against a synchronous checkpoint (``torch.save``
  to a local file, then boto3 ``upload_file``). ``torch.distributed.checkpoint.async_save``'s blocking time on
  the same state (to a local folder) is shown beside it. The first checkpoint allocates the snapshot buffers;
  it is a warm-up and not counted.
* **steps**: a training-like step (matmuls on a separate tensor, sized to outlast the copy, then
  ``optimizer.step()`` of SGD over the model's parameters), in ``overlap`` mode (the parameter copy runs in the
  background until the optimizer's step needs it) and in ``async`` mode. Two figures per mode: *blocked* — the
  time the training thread waits on podtrain: the ``checkpoint()`` call plus the time the optimizer's step
  pre-hook waited for the copy (``AsyncSaver.last_hook_wait``) — which is the goal's figure; and *step* — the
  extra wall time of the whole step over the median plain step, which on this box also counts the background
  serialization competing with the matmuls for the two cores (on a GPU node the compute is on the GPU). The
  matmuls run on one intra-op thread, leaving the other core to the background thread, as a GPU node's host CPU
  would.
* **emergency**: ``Preemption.request()`` (what SIGTERM's handler does) through ``Run.finish_preempted()``,
  which saves the newest step synchronously, to the commit on S3 — against boto3 ``upload_file`` of a
  ``torch.save`` file of the same state.
* **cuda**: with CUDA only, the stall of a GPU state four times ``--size-mib`` against a device-to-host copy of
  the same tensors into preallocated pinned buffers. The copy is queued on the training stream, so the stall
  is measured until that stream is idle again, not only until the call returns.

Where the asynchronous saves of *stall* and *steps* go: a local folder, not moto. Only the time the caller is
blocked counts there, and a save reaches the store only after the snapshot; but moto, single-threaded Python
on the same two cores, would take a core from the training step for the whole upload (a pod uploading to S3
has no server beside it), and at some 13 s per GiB it would double the run's time. *emergency* and the
synchronous baseline write to moto. Every side waits for the previous save's commit before its clock starts.
On a two-core machine the background copy and the serialization still compete with the training step for the
cores (and for the GIL): the step figures are what comes out here, not what a GPU node would show.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.checkpoint import BUCKET, MIB, Row, build_model, delete_prefix, s3_server, state_bytes, suite_args

if TYPE_CHECKING:
    from sdk.config import CheckpointMode

STALL_COPY_GOAL = 1.5
STALL_SAVE_GOAL = 0.1
OVERLAP_GOAL = 0.25
EMERGENCY_GOAL = 1.3
CUDA_GOAL = 1.5
GRACE_SECONDS = 3600.0  # the emergency save must never be skipped for lack of time
PLAIN_STEPS = 3  # plain steps per repetition; their median is the step without a checkpoint
MATMUL_N = 1024  # the compute of a step: MATMUL_N x MATMUL_N matmuls, as many as outlast the copy twice
CUDA_FACTOR = 4  # the GPU state is this many times --size-mib
DEFAULT_REPEAT = 2  # at 1 GiB each repetition costs about two minutes on two cores, most of it moto


# -- measurements ----------------------------------------------------------------------------------------------
def settle() -> None:
    """No garbage and no dirty pages left by the side that ran before."""
    gc.collect()
    os.sync()


def clocked(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn`` takes (after :func:`settle`), and what it returned."""
    settle()
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def in_turn(rep: int, sides: Sequence[Callable[[], None]]) -> None:
    """Run every side: in order on even repetitions, in reverse on odd ones."""
    for side in sides if rep % 2 == 0 else reversed(sides):
        side()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@dataclass
class StepTimes:
    """One training step's parts, in seconds."""

    checkpoint: float
    compute: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.checkpoint + self.compute + self.optimizer


# -- the benchmark ---------------------------------------------------------------------------------------------
class StallBench:
    """The state, the baselines' buffers and file, and the S3 client; one method per section."""

    def __init__(self, size_mib: int, workdir: Path, say: Callable[[str], None]) -> None:
        import torch

        self.size_mib = size_mib
        self.workdir = workdir
        self.say = say
        say(f"building a {size_mib} MiB float32 model ...")
        self.model = build_model(size_mib * MIB)
        self.nbytes = state_bytes(self.model)
        self.tensors = list(self.model.state_dict().values())
        say(f"  {len(self.tensors)} tensors, {self.nbytes / MIB:.1f} MiB; torch uses {torch.get_num_threads()} threads")
        # The plain-copy baseline's buffers, allocated and touched once, as podtrain's are after the first save.
        self.buffers = [torch.empty_like(t) for t in self.tensors]
        self.copy()
        # The synchronous baselines' file: the same state, written by torch.save.
        self.file = workdir / "state.pt"
        torch.save(self.model.state_dict(), self.file)
        self.s3: Any = None

    def connect(self) -> None:
        import boto3

        self.s3 = boto3.client("s3")
        self.s3.create_bucket(Bucket=BUCKET)
        self.s3.head_bucket(Bucket=BUCKET)

    def copy(self) -> None:
        """The plain-copy baseline: every tensor into its preallocated buffer."""
        for buffer, tensor in zip(self.buffers, self.tensors, strict=True):
            buffer.copy_(tensor)

    def make_run(self, name: str, mode: CheckpointMode, *, s3: bool = False, **config: Any) -> Any:
        """A ``Run`` writing to ``name`` in a local folder or on S3, connected before any clock starts.

        Its ``Preemption`` is never installed: no signal handlers, :meth:`Preemption.request` only.
        """
        from sdk.checkpoints.checkpointer import Checkpointer
        from sdk.config import Config
        from sdk.lifecycle.preemption import Preemption
        from sdk.run import Run

        cfg = Config(
            run_id="bench",
            attempt=1,
            checkpoint_uri=f"s3://{BUCKET}/{name}" if s3 else str(self.workdir / "checkpoints" / name),
            checkpoint_mode=mode,
            keep_last=1,  # only the newest is ever needed; fewer bytes held on disk and in moto
            grace_seconds=GRACE_SECONDS,
            **config,
        )
        checkpointer = Checkpointer.from_config(cfg)
        checkpointer.store.ensure_root()  # creates the client and opens its connection, as a job does at start
        return Run(cfg, checkpointer, Preemption(GRACE_SECONDS, signals=cfg.stop_signals))

    def committed(self, run: Any, step: int) -> float:
        """Wait for the save in flight; check it committed ``step``; seconds waited."""
        started = time.perf_counter()
        info = run.wait()
        # Future waiters wake before its done-callbacks run, and AsyncSaver records the commit in one: give it
        # a moment rather than report a stale step.
        while (info is None or info.step != step) and time.perf_counter() - started < 5.0:
            time.sleep(0.001)
            info = run.last_checkpoint
        if info is None or info.step != step:
            raise RuntimeError(f"expected step {step} committed, found {info and info.step}")
        return time.perf_counter() - started

    # -- 1. the stall of one checkpoint ------------------------------------------------------------------------
    def stall(self, repeat: int) -> list[Row]:
        import torch

        vs_copy = Row(
            "stall-vs-copy",
            "Run.checkpoint() blocking time, async mode, buffers warm",
            "plain copy of the same tensors into preallocated buffers",
            STALL_COPY_GOAL,
        )
        vs_save = Row(
            "stall-vs-save",
            "Run.checkpoint() blocking time, async mode, buffers warm",
            "torch.save to a local file + boto3 upload_file",
            STALL_SAVE_GOAL,
        )
        dcp_row = Row(
            "dcp-stall-vs-copy",
            "torch.distributed.checkpoint.async_save() blocking time (local folder)",
            "plain copy into preallocated buffers",
            None,
        )
        dcp = self.dcp_saver()
        run = self.make_run("stall", "async")
        state = {"model": self.model}
        try:
            cold, _ = clocked(lambda: run.checkpoint(0, state))
            write = self.committed(run, 0)
            self.say(
                f"  warm-up checkpoint (allocates {run.saver.snapshot.buffer_bytes / MIB:.0f} MiB of snapshot "
                f"buffers): stall {ms(cold)}, not counted; background write + commit {write:.2f} s"
            )
            if dcp is not None:
                dcp(-1)  # its first call pays its imports and planning
            for rep in range(repeat):
                step = rep + 1
                parts: dict[str, str] = {}

                def podtrain(step: int = step, parts: dict[str, str] = parts) -> None:
                    seconds, _ = clocked(lambda: run.checkpoint(step, state))
                    last = run.saver.last_stall
                    write = self.committed(run, step)
                    vs_copy.measured.append(seconds)
                    vs_save.measured.append(seconds)
                    parts["podtrain"] = f"checkpoint() {ms(seconds)} (last_stall {ms(last)}; write {write:.2f} s)"

                def copy(parts: dict[str, str] = parts) -> None:
                    seconds, _ = clocked(self.copy)
                    vs_copy.baseline.append(seconds)
                    dcp_row.baseline.append(seconds)
                    parts["copy"] = f"copy {ms(seconds)}"

                def save(rep: int = rep, parts: dict[str, str] = parts) -> None:
                    path = self.workdir / f"sync-{rep}.pt"
                    key = f"baseline/sync-{rep}.pt"

                    def sync_save() -> None:
                        torch.save(self.model.state_dict(), path)
                        self.s3.upload_file(str(path), BUCKET, key)

                    seconds, _ = clocked(sync_save)
                    path.unlink()
                    delete_prefix(self.s3, key)
                    vs_save.baseline.append(seconds)
                    parts["save"] = f"save+upload {seconds:.2f} s"

                def dcp_side(rep: int = rep, parts: dict[str, str] = parts) -> None:
                    assert dcp is not None
                    seconds, write = dcp(rep)
                    dcp_row.measured.append(seconds)
                    parts["dcp"] = f"dcp async_save {ms(seconds)} (write {write:.2f} s)"

                in_turn(rep, [podtrain, copy, save, *([dcp_side] if dcp else [])])
                self.say(
                    f"  stall  #{rep + 1}: "
                    + " | ".join(parts[k] for k in ("podtrain", "copy", "save", "dcp") if k in parts)
                )
        finally:
            run.close()
        return [vs_copy, vs_save, *([dcp_row] if dcp else [])]

    def dcp_saver(self) -> Callable[[int], tuple[float, float]] | None:
        """``f(rep) -> (blocking seconds, seconds until written)`` with DCP's ``async_save``, or None without DCP."""
        import torch

        try:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import FileSystemWriter
        except (ImportError, RuntimeError) as exc:  # builds without torch.distributed
            self.say(f"  dcp: skipped: torch.distributed.checkpoint unavailable ({exc})")
            return None
        # One process needs no process group: DCP saves as a single process (and warns, every call).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        # The cached stager reuses its CPU copy between calls, but it pins that memory, which needs CUDA.
        cached = torch.cuda.is_available()
        writer = FileSystemWriter(self.workdir / "dcp-cached", cache_staged_state_dict=cached)
        self.say(
            "  dcp: FileSystemWriter, "
            + (
                "cache_staged_state_dict=True (pinned copy reused across calls)"
                if cached
                else "default stager (a fresh CPU copy each call: its reusing stager pins memory, which needs CUDA)"
            )
        )

        def save(rep: int) -> tuple[float, float]:
            folder = self.workdir / f"dcp-{rep}"
            seconds, future = clocked(
                lambda: dcp.async_save({"model": self.model.state_dict()}, storage_writer=writer, checkpoint_id=folder)
            )
            started = time.perf_counter()
            future.result()
            write = time.perf_counter() - started
            shutil.rmtree(folder, ignore_errors=True)
            return seconds, write

        return save

    # -- 2. the stall of a training step -----------------------------------------------------------------------
    def steps(self, repeat: int) -> list[Row]:
        import torch

        copy_seconds = statistics.median(clocked(self.copy)[0] for _ in range(3))
        a = torch.randn(MATMUL_N, MATMUL_N)
        b = torch.randn(MATMUL_N, MATMUL_N)
        out = torch.empty(MATMUL_N, MATMUL_N)
        torch.mm(a, b, out=out)
        one = statistics.median(clocked(lambda: torch.mm(a, b, out=out))[0] for _ in range(3))
        matmuls = max(2, math.ceil(2 * copy_seconds / one))
        self.say(
            f"  step: {matmuls} matmuls of {MATMUL_N}x{MATMUL_N} (~{ms(matmuls * one)}; the copy takes "
            f"{ms(copy_seconds)}), then SGD.step() over {self.nbytes / MIB:.0f} MiB of parameters"
        )

        def compute() -> None:
            for _ in range(matmuls):
                torch.mm(a, b, out=out)

        for p in self.model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        rows: list[Row] = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            modes: tuple[tuple[CheckpointMode, float | None], ...] = (("overlap", OVERLAP_GOAL), ("async", None))
            for mode, goal in modes:
                rows += self.steps_in(mode, goal, repeat, compute)
        finally:
            torch.set_num_threads(threads)
            for p in self.model.parameters():
                p.grad = None
        return rows

    def steps_in(self, mode: CheckpointMode, goal: float | None, repeat: int, compute: Callable[[], None]) -> list[Row]:
        import torch

        blocked = Row(
            f"{mode}-blocked",
            f"training thread blocked by the checkpoint ({mode} mode): the call + the step pre-hook's wait",
            "plain copy of the model's tensors into preallocated buffers",
            goal,
        )
        row = Row(
            f"{mode}-step-stall",
            f"extra time of the step that calls checkpoint() ({mode} mode) over a plain step (CPU contention too)",
            "plain copy of the model's tensors into preallocated buffers",
            None,
        )
        optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-6)
        state = {"model": self.model, "optimizer": optimizer}
        run = self.make_run(f"steps-{mode}", mode)

        def step(checkpoint_step: int | None = None) -> StepTimes:
            started = time.perf_counter()
            if checkpoint_step is not None:
                run.checkpoint(checkpoint_step, state)
            called = time.perf_counter()
            compute()
            computed = time.perf_counter()
            optimizer.step()
            return StepTimes(called - started, computed - called, time.perf_counter() - computed)

        try:
            step(0)  # warm-up: allocates the snapshot buffers (and, in overlap mode, hooks the optimizer)
            self.committed(run, 0)
            for _ in range(2):
                step()
            for rep in range(repeat):
                checkpoint_step = rep + 1
                got: dict[str, Any] = {}

                def plain(got: dict[str, Any] = got) -> None:
                    settle()
                    got["plain"] = [step() for _ in range(PLAIN_STEPS)]

                def with_checkpoint(checkpoint_step: int = checkpoint_step, got: dict[str, Any] = got) -> None:
                    settle()
                    got["checkpoint"] = step(checkpoint_step)
                    got["hook_wait"] = run.saver.last_hook_wait
                    got["write"] = self.committed(run, checkpoint_step)

                def copy(got: dict[str, Any] = got) -> None:
                    got["copy"] = clocked(self.copy)[0]

                in_turn(rep, [plain, with_checkpoint, copy])
                plain_total = statistics.median(s.total for s in got["plain"])
                plain_compute = statistics.median(s.compute for s in got["plain"])
                plain_optimizer = statistics.median(s.optimizer for s in got["plain"])
                ckpt: StepTimes = got["checkpoint"]
                row.measured.append(ckpt.total - plain_total)
                row.baseline.append(got["copy"])
                blocked.measured.append(ckpt.checkpoint + got["hook_wait"])
                blocked.baseline.append(got["copy"])
                self.say(
                    f"  {mode:<7} #{rep + 1}: step {ms(ckpt.total)} vs {ms(plain_total)} -> stall "
                    f"{ms(ckpt.total - plain_total)} [checkpoint() {ms(ckpt.checkpoint)}, compute {ms(ckpt.compute)} "
                    f"vs {ms(plain_compute)}, optimizer.step {ms(ckpt.optimizer)} vs {ms(plain_optimizer)}, "
                    f"pre-hook wait {ms(got['hook_wait'])}] | "
                    f"copy {ms(got['copy'])} | write {got['write']:.2f} s"
                )
        finally:
            run.close()
        return [blocked, row]

    # -- 3. SIGTERM to a committed emergency checkpoint --------------------------------------------------------
    def emergency(self, repeat: int) -> Row:
        row = Row(
            "emergency-save",
            "Preemption.request() through Run.finish_preempted() to the commit",
            "boto3 upload_file of a torch.save file of the state",
            EMERGENCY_GOAL,
        )
        state = {"model": self.model}
        step = 7
        for rep in range(repeat):
            prefix = f"emergency-{rep}"
            # Every 10**9 steps: checkpoint(7) records the step without saving it, as between policy saves.
            run = self.make_run(prefix, "async", s3=True, checkpoint_every_steps=10**9)
            if run.checkpoint(step, state) is not None:
                raise RuntimeError("the policy saved a step it should only have recorded")
            key = f"baseline/emergency-{rep}.pt"
            got: dict[str, float] = {}

            def podtrain(run: Any = run, got: dict[str, float] = got) -> None:
                def preempted() -> None:
                    run.preemption.request()
                    run.finish_preempted()

                got["podtrain"], _ = clocked(preempted)
                info = run.last_checkpoint
                if info is None or info.step != step or not info.manifest.meta.get("emergency"):
                    raise RuntimeError(f"no emergency checkpoint of step {step} committed: {info}")

            def baseline(key: str = key, got: dict[str, float] = got) -> None:
                got["baseline"], _ = clocked(lambda: self.s3.upload_file(str(self.file), BUCKET, key))

            try:
                in_turn(rep, [podtrain, baseline])
            finally:
                run.close()
                delete_prefix(self.s3, key)
                delete_prefix(self.s3, f"{prefix}/")
            row.measured.append(got["podtrain"])
            row.baseline.append(got["baseline"])
            commit, upload = got["podtrain"], got["baseline"]
            self.say(f"  emergency #{rep + 1}: request -> commit {commit:.2f} s | upload_file {upload:.2f} s")
        return row

    # -- 4. CUDA -----------------------------------------------------------------------------------------------
    def cuda(self, repeat: int) -> Row | str:
        """The GPU stall against a pinned device-to-host copy; or the reason it was skipped."""
        import torch

        if not torch.cuda.is_available():
            return "skipped: no CUDA (torch.cuda.is_available() is False)"
        size = CUDA_FACTOR * self.size_mib * MIB
        free, _ = torch.cuda.mem_get_info()
        if free < size * 1.2:
            return f"skipped: {size / MIB:.0f} MiB needed on the GPU, {free / MIB:.0f} MiB free"
        try:
            return self.cuda_stall(build_model(size).to("cuda"), repeat)
        finally:
            torch.cuda.empty_cache()  # the model and the pinned buffers are gone with cuda_stall's frame

    def cuda_stall(self, model: Any, repeat: int) -> Row:
        import torch

        tensors = list(model.state_dict().values())
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.say(
            f"  cuda: {nbytes / MIB:.0f} MiB on {torch.cuda.get_device_name()}; checkpoints to a local folder; "
            "the stall lasts until the training stream is idle (the copies are queued on it)"
        )
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]

        def d2h() -> None:
            for buffer, tensor in zip(pinned, tensors, strict=True):
                buffer.copy_(tensor, non_blocking=True)
            torch.cuda.synchronize()

        def stalled(step: int) -> tuple[float, float]:
            """Seconds until ``run.checkpoint`` returns, and until the stream it queued copies on is idle."""
            settle()
            torch.cuda.synchronize()
            started = time.perf_counter()
            run.checkpoint(step, state)
            returned = time.perf_counter() - started
            torch.cuda.synchronize()
            return returned, time.perf_counter() - started

        row = Row(
            "cuda-stall",
            "Run.checkpoint() until the training stream is idle, async mode, pinned buffers warm",
            "device-to-host copy into preallocated pinned buffers",
            CUDA_GOAL,
        )
        state = {"model": model}
        run = self.make_run("cuda", "async")
        try:
            d2h()  # touches the pinned buffers
            _, cold = stalled(0)
            self.committed(run, 0)
            self.say(f"  warm-up checkpoint (allocates pinned snapshot buffers): stall {ms(cold)}, not counted")
            for rep in range(repeat):
                step = rep + 1
                got: dict[str, float] = {}

                def podtrain(step: int = step, got: dict[str, float] = got) -> None:
                    got["call"], got["podtrain"] = stalled(step)
                    got["write"] = self.committed(run, step)

                def baseline(got: dict[str, float] = got) -> None:
                    torch.cuda.synchronize()
                    got["baseline"], _ = clocked(d2h)

                in_turn(rep, [podtrain, baseline])
                row.measured.append(got["podtrain"])
                row.baseline.append(got["baseline"])
                self.say(
                    f"  cuda   #{rep + 1}: checkpoint() returns after {ms(got['call'])}, stream idle after "
                    f"{ms(got['podtrain'])} (write {got['write']:.2f} s) | pinned d2h copy {ms(got['baseline'])}"
                )
        finally:
            run.close()
        return row


def run(size_mib: int, repeat: int, workdir: Path, say: Callable[[str], None]) -> tuple[list[Row], list[str]]:
    """Start the S3 server, run every section; the rows, and the lines of sections that were skipped."""
    built: list[StallBench] = []
    with s3_server(lambda: built.append(StallBench(size_mib, workdir, say))) as server:
        say(f"{server.name} S3 server at {server.endpoint}")
        bench = built[0]
        bench.connect()
        rows: list[Row] = []
        skipped: list[str] = []
        say("stall of one checkpoint (async mode):")
        rows += bench.stall(repeat)
        say("stall of a training step:")
        rows += bench.steps(repeat)
        say("SIGTERM to a committed emergency checkpoint:")
        rows.append(bench.emergency(repeat))
        say(f"CUDA ({CUDA_FACTOR}x the state on the GPU):")
        cuda = bench.cuda(repeat)
        if isinstance(cuda, Row):
            rows.append(cuda)
        else:
            say(f"  cuda-stall: {cuda}")
            skipped.append(f"cuda-stall: {cuda}")
        delete_prefix(bench.s3, "")
    return rows, skipped


def table(rows: list[Row], skipped: list[str], size_mib: int, repeat: int) -> str:
    header = ("case", "measured ms", "baseline ms", "ratio", "goal", "met?")
    cells = [
        (
            r.name,
            f"{statistics.median(r.measured) * 1000:.2f}",
            f"{statistics.median(r.baseline) * 1000:.2f}",
            f"{r.ratio:.3f}x",
            f"<= {r.goal:.2f}x" if r.goal is not None else "(info)",
            ("yes" if r.met else "NO") if r.goal is not None else "-",
        )
        for r in rows
    ]
    widths = [max(len(r[i]) for r in (header, *cells)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))

    out = [
        f"async checkpoint stalls, {size_mib} MiB state, median of {repeat} "
        "(ratio = measured / baseline; lower is better; snapshot buffers warm: the first checkpoint is not counted)"
    ]
    out += [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in cells)]
    out += [f"  {r.name}: {r.measured_name} / {r.baseline_name}" for r in rows]
    out += [f"  {line}" for line in skipped]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = suite_args(argv, prog="python -m bench.stall", doc=__doc__ or "", default_repeat=DEFAULT_REPEAT)

    from sdk import log

    log.configure(level="error", fmt="console")  # run.preempted's warning per emergency save would drown the table

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podtrain-bench-stall-") as tmp:
        rows, skipped = run(args.size_mib, args.repeat, Path(tmp), say)
    say("")
    say(table(rows, skipped, args.size_mib, args.repeat))
    say(f"stall benchmark: {time.perf_counter() - started:.0f} s of wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
