"""One rank of :mod:`bench.sharded`: builds the state, runs podtrain's side and DCP's side in turn, times both.

Started by torchrun (``python -m torch.distributed.run ... -m bench._sharded_rank SPEC OUT``) on 127.0.0.1, gloo on
CPU. ``SPEC`` is the JSON the driver wrote (the jobs to run, sizes, URLs); rank 0 writes every figure to ``OUT`` as
JSON. Each figure is the time from one barrier to the next, so it is the slowest rank's, the whole save or load.
podtrain is driven through its public API only (``sdk.init``, ``Run.checkpoint``/``wait``/``resume``); a call it
refuses is reported as ``refused: <error>`` instead of seconds, and the other side is still measured.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.checkpoint import MIB, build_model

__all__ = ["main"]

ADAM_FACTOR = 3  # the state is the model and Adam's two moments: three times the parameters


class Refused(Exception):
    """A side's call failed on some rank: podtrain refused it, or DCP failed (the message is the lowest rank's)."""


# -- the state -------------------------------------------------------------------------------------------------
def fsdp_state(size_mib: int, seed: int) -> tuple[Any, Any]:
    """An FSDP2 model (each block, then the root, ``fully_shard``-ed) and Adam with moments: ``size_mib`` in all."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model(size_mib * MIB // ADAM_FACTOR)  # uniform values, the same on every rank
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, adam(model, seed + dist.get_rank())  # each rank's shard of the gradients


def adam(model: Any, seed: int) -> Any:
    """Adam over ``model`` after one step, so its moments exist and differ from the parameters.

    ``seed`` alone sets the gradients: a replicated (DDP) model gets the same moments on every rank, as in training.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator: torch.Generator | None = None
    for p in model.parameters():
        grad = torch.zeros_like(p)
        if generator is None:
            generator = torch.Generator(device=local(grad).device).manual_seed(seed)
        local(grad).uniform_(-1e-2, 1e-2, generator=generator)
        p.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tensors(model: Any, optimizer: Any) -> Iterator[torch.Tensor]:
    """This rank's part of every parameter and moment (what a load must restore)."""
    for t in model.state_dict().values():
        yield local(t)
    for per_param in optimizer.state.values():
        for name in ("exp_avg", "exp_avg_sq"):
            yield local(per_param[name])


def fingerprint(model: Any, optimizer: Any) -> float:
    """The sum of every value of the state over all ranks (float64): a load must give it back."""
    total = torch.zeros(1, dtype=torch.float64)
    for t in tensors(model, optimizer):
        total += t.sum(dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def local_bytes(model: Any, optimizer: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(model, optimizer))


def zero(model: Any, optimizer: Any) -> None:
    with torch.no_grad():
        for t in tensors(model, optimizer):
            t.zero_()


# -- timing ----------------------------------------------------------------------------------------------------
def clocked(fn: Callable[[], Any]) -> float:
    """Barrier, ``fn``, barrier: seconds of the slowest rank. Raises Refused on every rank if any rank failed."""
    import gc

    gc.collect()
    os.sync()
    dist.barrier()
    started = time.perf_counter()
    everywhere(fn)
    return seconds_max(time.perf_counter() - started)


def everywhere(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on every rank; if it failed on any, raise Refused on all with the lowest rank's error."""
    error = ""
    try:
        fn()
    except Exception as exc:  # podtrain's refusals and failures: reported, not fatal
        error = f"{type(exc).__name__}: {exc}"
    failed = torch.tensor([1 if error else 0])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise Refused(first_error(error))


def seconds_max(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def first_error(error: str) -> str:
    """The lowest rank's error message (every rank gets it)."""
    errors: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "failed on another rank")


def say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


class Side:
    """One side's seconds per repetition, or why it was refused or failed (then it is not tried again)."""

    def __init__(self, verb: str = "refused") -> None:
        self.seconds: list[float] = []
        self.refused = ""
        self.verb = verb

    def timed(self, fn: Callable[[], Any]) -> str:
        """Time ``fn`` on every rank (:func:`clocked`); its line for the log."""
        if self.refused:
            return self.verb
        try:
            seconds = clocked(fn)
        except Refused as exc:
            self.refused = str(exc)[:300]
            return f"{self.verb}: {self.refused}"
        self.seconds.append(seconds)
        return f"{seconds:.3f} s"

    def result(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "refused": self.refused}

    def wait(self, run: Any) -> str:
        """After an async checkpoint: ``run.wait()`` off the clock; a failed write takes back the figure."""
        if self.refused:
            return ""
        try:
            everywhere(run.wait)
        except Refused as exc:
            self.seconds.pop()
            self.refused = f"the background write failed: {exc}"[:300]
            return f"; {self.verb}: {self.refused}"
        return ""


def in_turn(rep: int, sides: Sequence[Callable[[], str]]) -> list[str]:
    """Run every side, in order on even repetitions and reversed on odd ones; their lines, in the given order."""
    order = list(range(len(sides))) if rep % 2 == 0 else list(reversed(range(len(sides))))
    lines: dict[int, str] = {}
    for i in order:
        lines[i] = sides[i]()
    return [lines[i] for i in range(len(sides))]


# -- podtrain through its public API ---------------------------------------------------------------------------
class _Abandon(Exception):
    """Leaves a ``sdk.init()`` block after podtrain refused: the block's end then saves nothing more."""


@contextmanager
def podtrain_run(uri: str, mode: str, attempt: int, side: Side, keep_last: int = 1) -> Iterator[Any]:
    """``sdk.init()`` for ``uri``; once ``side`` was refused, the block is left as failed (no final save).

    ``keep_last``: 1 where saves follow one another (the stall); the save cases keep every checkpoint, so that
    retention's deletions (DCP has none) stay off the clock, as DCP's own clean-up does."""
    import sdk

    os.environ["PODTRAIN_ATTEMPT"] = str(attempt)
    body_done = False
    try:
        with sdk.init(
            checkpoint_uri=uri,
            checkpoint_mode=mode,
            run_id="bench",
            keep_last=keep_last,
            log_level="error",
            grace_seconds=3600.0,
        ) as run:
            yield run
            body_done = True
            if side.refused:
                raise _Abandon
    except _Abandon:
        pass
    except (Exception, SystemExit) as exc:
        if not body_done:
            raise
        # The block's end: its final save, or the wait for a save in flight.
        side.refused = side.refused or f"at the end of the sdk.init() block: {type(exc).__name__}: {exc}"[:300]


def podtrain_sync_save(run: Any, step: int, state: dict[str, Any]) -> None:
    run.checkpoint(step, state, force=True)
    run.wait()


# -- DCP --------------------------------------------------------------------------------------------------------
def dcp_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def dcp_save(writer: Any, model: Any, optimizer: Any) -> None:
    from torch.distributed import checkpoint as dcp_api

    dcp_api.save(dcp_state(model, optimizer), storage_writer=writer)


def dcp_writer(target: str) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    if target.startswith("s3://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(target, client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    return FileSystemWriter(target)


def remove(target: str) -> None:
    """Delete one DCP checkpoint (rank 0; outside the clock)."""
    if dist.get_rank() == 0:
        if target.startswith("s3://"):
            import s3fs  # type: ignore[import-not-found]  # in .bench/venv-s3fs only

            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
            if fs.exists(target):
                fs.rm(target, recursive=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
    dist.barrier()


# -- jobs --------------------------------------------------------------------------------------------------------
def save_job(spec: dict[str, Any], model: Any, optimizer: Any, out: dict[str, Any]) -> None:
    """Sharded save: podtrain in sync mode against ``dcp.save``, for each store in ``spec["stores"]``."""
    state = {"model": model, "optim": optimizer}
    for store in spec["stores"]:
        name, root = store["name"], store["dcp"]
        podtrain, dcp = Side(), Side("failed")
        say(f"save to {name}:")
        with podtrain_run(store["podtrain"], "sync", 1, podtrain, keep_last=1000) as run:
            # Warm-up, not counted: first connections, the plan both sides reuse, podtrain's agreed writer folder.
            podtrain.timed(partial(podtrain_sync_save, run, 1000, state))
            dcp.timed(partial(dcp_save, dcp_writer(f"{root}/warm-up"), model, optimizer))
            remove(f"{root}/warm-up")
            podtrain.seconds.clear()
            dcp.seconds.clear()
            for rep in range(spec["repeat"]):
                target = f"{root}/rep-{rep}"
                ours = partial(podtrain.timed, partial(podtrain_sync_save, run, rep + 1, state))
                theirs = partial(dcp.timed, partial(dcp_save, dcp_writer(target), model, optimizer))
                got = in_turn(rep, [ours, theirs])
                say(f"  save {name} #{rep + 1}: podtrain {got[0]} | dcp.save {got[1]}")
                if rep + 1 < spec["repeat"] or name != "file":  # the last local one is loaded on 2 ranks
                    remove(target)
        out[f"save-{name}"] = {"podtrain": podtrain.result(), "baseline": dcp.result()}
        if name == "file":
            out["dcp-checkpoint"] = f"{root}/rep-{spec['repeat'] - 1}"
    out["fingerprint"] = fingerprint(model, optimizer)


def stagers() -> dict[str, Callable[[], Any]]:
    """DCP's staging options in this torch, each as a factory (None: ``async_save``'s own per-call stager)."""
    from torch.distributed.checkpoint.staging import BlockingAsyncStager, DefaultStager, StagingOptions

    cuda = torch.cuda.is_available()
    found: dict[str, Callable[[], Any]] = {
        "default (a fresh CPU copy each call)": lambda: None,
        "DefaultStager reused (CPU copies cached across calls)": lambda: DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda
            )
        ),
        "DefaultStager reused, async staging (the loop waits for staging_completion)": lambda: DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda
            )
        ),
    }
    if cuda:  # its cache is pinned memory, which needs CUDA
        found["BlockingAsyncStager(cache_staged_state_dict=True) (pinned, cached)"] = lambda: BlockingAsyncStager(
            cache_staged_state_dict=True
        )
    return found


def stall_job(spec: dict[str, Any], model: Any, optimizer: Any, out: dict[str, Any]) -> None:
    """The training loop's stall per checkpoint: podtrain async mode against ``dcp.async_save`` per stager."""
    from torch.distributed import checkpoint as dcp_api
    from torch.distributed.checkpoint.staging import AsyncStager

    state = {"model": model, "optim": optimizer}
    group = dist.new_group(backend="gloo")  # DCP's background collectives never meet the loop's
    podtrain = Side()
    dcps = {name: Side("failed") for name in stagers()}
    made = {name: factory() for name, factory in stagers().items()}
    say("stall per checkpoint (async):")
    with podtrain_run(spec["stall_uri"], "async", 1, podtrain) as run:

        def ours(step: int) -> str:
            got = podtrain.timed(lambda: run.checkpoint(step, state))
            return got + podtrain.wait(run)  # the write and commit, off the clock

        def theirs(name: str, rep: int) -> str:
            stager: AsyncStager | None = made[name]
            target = f"{spec['dcp_stall_root']}/{rep}"
            futures: list[Any] = []

            def call() -> None:
                response = dcp_api.async_save(
                    dcp_state(model, optimizer),
                    storage_writer=dcp_writer(target),
                    async_stager=stager,
                    process_group=group,
                )
                staging = getattr(response, "staging_completion", None)
                if staging is not None:  # async staging: the state may change once its copy is done
                    staging.result()
                futures.append(getattr(response, "upload_completion", response))

            got = dcps[name].timed(call)
            for future in futures:
                future.result()
            remove(target)
            return got

        ours(0)  # warm-up: allocates podtrain's snapshot buffers
        for name in made:
            theirs(name, -1)  # warm-up: DCP's planning cache, imports, the reused stagers' buffers
        podtrain.seconds.clear()
        for side in dcps.values():
            side.seconds.clear()
        for rep in range(spec["repeat"]):
            sides = [partial(ours, rep + 1)] + [partial(theirs, n, rep) for n in made]
            got = in_turn(rep, sides)
            say(f"  stall #{rep + 1}: podtrain {got[0]} | " + " | ".join(f"dcp {g}" for g in got[1:]))
    for stager in made.values():
        if stager is not None:
            stager.close()
    out["stall"] = {"podtrain": podtrain.result(), "baselines": {n: s.result() for n, s in dcps.items()}}
    out["stall-overlap"] = overlap_stall(spec, model, optimizer, state)


def overlap_stall(spec: dict[str, Any], model: Any, optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Overlap mode: the loop is blocked for ``run.checkpoint()`` and then for what the next optimizer step's
    pre-hook still waits for (the optimizer's tensors are copied in the background meanwhile), after a forward and
    backward emulated by ``spec["step_seconds"]`` of matrix products (the copy competes with them for the cores)."""
    side = Side()
    say(f"stall per checkpoint (overlap, {spec['step_seconds']:.2f} s of compute before the next step):")
    with podtrain_run(spec["stall_uri"] + "-overlap", "overlap", 1, side) as run:

        def blocked(step: int) -> str:
            if side.refused:
                return side.verb
            try:
                call = clocked(partial(run.checkpoint, step, state))
                compute(spec["step_seconds"])
                gradients(model, seed=step)
                everywhere(optimizer.step)
                seconds = call + seconds_max(run.saver.last_hook_wait)
            except Refused as exc:
                side.refused = str(exc)[:300]
                return f"{side.verb}: {side.refused}"
            side.seconds.append(seconds)
            return f"{seconds:.3f} s" + side.wait(run)

        blocked(0)  # warm-up: the snapshot buffers, the optimizer's pre-hook
        side.seconds.clear()
        for rep in range(spec["repeat"]):
            say(f"  overlap #{rep + 1}: podtrain {blocked(rep + 1)}")
    return side.result()


def compute(seconds: float) -> None:
    """A forward and backward's worth of CPU work: matrix products for ``seconds``."""
    a = torch.full((256, 256), 0.01)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def gradients(model: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        grad = torch.zeros_like(p)
        local(grad).uniform_(-1e-3, 1e-3, generator=generator)
        p.grad = grad


def load_job(spec: dict[str, Any], model: Any, optimizer: Any, out: dict[str, Any]) -> None:
    """Resharding load on this job's ranks of a checkpoint saved by more: ``run.resume`` against ``dcp.load``."""
    from torch.distributed import checkpoint as dcp_api
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    expected = spec["fingerprint"]
    state = {"model": model, "optim": optimizer}
    podtrain, dcp = Side(), Side("failed")
    say(f"load on {dist.get_world_size()} ranks:")

    def checked(side: Side, who: str, load: Callable[[], str]) -> str:
        zero(model, optimizer)
        line = load()
        got = fingerprint(model, optimizer)
        if not side.refused and abs(got - expected) > 1e-6 * abs(expected) + 1e-6:
            side.seconds.pop()
            side.refused = f"{who} restored the wrong values (state sum {got!r}, saved {expected!r})"
            return f"{side.verb}: {side.refused}"
        return line

    def resumed(run: Any) -> None:
        if run.resume(state) == 0:
            raise RuntimeError("run.resume found no checkpoint")

    def ours_load() -> str:
        """Only ``run.resume`` is timed: opening the run (logs, signals, the attempt) is not the load."""
        line = podtrain.verb
        with podtrain_run(spec["podtrain_uri"], "sync", 2, podtrain, keep_last=1000) as run:
            line = podtrain.timed(partial(resumed, run))
        return line

    def theirs_load() -> None:
        sd = dcp_state(model, optimizer)
        dcp_api.load(sd, storage_reader=FileSystemReader(spec["dcp_checkpoint"]))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    if spec.get("podtrain_save_refused"):
        podtrain.refused = f"no {spec['saved_ranks']}-rank checkpoint to load: its save was refused"
    for rep in range(spec["repeat"]):
        got = in_turn(
            rep,
            [
                partial(checked, podtrain, "run.resume", ours_load),
                partial(checked, dcp, "dcp.load", partial(dcp.timed, theirs_load)),
            ],
        )
        say(f"  load #{rep + 1}: podtrain run.resume {got[0]} | dcp.load {got[1]}")
    out["load"] = {"podtrain": podtrain.result(), "baseline": dcp.result()}


def ddp_job(spec: dict[str, Any], out: dict[str, Any]) -> None:
    """Bytes a DDP checkpoint of this job's ranks writes, against one rank's checkpoint of the same model."""
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(spec["size_mib"] * MIB // ADAM_FACTOR)
    ddp = DistributedDataParallel(model)
    optimizer = adam(model, seed=0)
    say(f"DDP on {dist.get_world_size()} ranks, bytes written:")
    result: dict[str, Any] = {"state_bytes": local_bytes(model, optimizer)}
    ranks = Side()
    with podtrain_run(spec["ddp_uri"], "sync", 1, ranks) as run:
        ranks.timed(partial(podtrain_sync_save, run, 1, {"model": ddp, "optim": optimizer}))
    result["ranks"] = ranks.result()
    if dist.get_rank() == 0:  # one rank alone, as a single-process job would save the same model
        import sdk

        with sdk.init(
            checkpoint_uri=spec["single_uri"],
            checkpoint_mode="sync",
            run_id="bench",
            world_size=1,
            rank=0,
            attempt=1,
            log_level="error",
        ) as single:
            single.checkpoint(1, {"model": model, "optim": optimizer}, force=True)
    dist.barrier()
    out["ddp"] = result


def cuda_job(spec: dict[str, Any], out: dict[str, Any]) -> None:
    """The stall on the GPU: podtrain's async checkpoint until the stream is idle, against a pinned D2H copy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model(spec["cuda_mib"] * MIB // ADAM_FACTOR)
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # moves the parameters to the GPU
    optimizer = adam(model, seed=2)
    state = {"model": model, "optim": optimizer}
    local_tensors = list(tensors(model, optimizer))
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in local_tensors]
    say(f"cuda: {seconds_max(local_bytes(model, optimizer)) / MIB:.0f} MiB per rank on {torch.cuda.get_device_name()}")

    def d2h() -> None:
        for buffer, t in zip(pinned, local_tensors, strict=True):
            buffer.copy_(t, non_blocking=True)
        torch.cuda.synchronize()

    podtrain, copy = Side(), Side("failed")
    with podtrain_run(spec["cuda_uri"], "async", 1, podtrain) as run:

        def ours(step: int) -> str:
            def call() -> None:
                run.checkpoint(step, state)
                torch.cuda.synchronize()  # the copies were queued on the training stream: it is busy until then

            torch.cuda.synchronize()
            got = podtrain.timed(call)
            return got + podtrain.wait(run)

        ours(0)
        d2h()
        podtrain.seconds.clear()
        for rep in range(spec["repeat"]):
            got = in_turn(rep, [partial(ours, rep + 1), partial(copy.timed, d2h)])
            say(f"  cuda #{rep + 1}: podtrain {got[0]} | pinned d2h copy {got[1]}")
    out["cuda"] = {"podtrain": podtrain.result(), "baseline": copy.result()}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out_path = Path(argv[1])
    warnings.filterwarnings("ignore")  # DCP and FSDP warn on every call on CPU: the table is what counts
    torch.set_num_threads(1)  # several ranks share the machine's cores
    if "cuda" in spec["jobs"]:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    out: dict[str, Any] = {"world_size": dist.get_world_size()}
    try:
        for job in spec["jobs"]:
            if job == "save":
                model, optimizer = fsdp_state(spec["size_mib"], seed=0)
                out["local_bytes"] = seconds_max(float(local_bytes(model, optimizer)))
                save_job(spec, model, optimizer, out)
                stall_job(spec, model, optimizer, out)
                del model, optimizer
            elif job == "load":
                model, optimizer = fsdp_state(spec["size_mib"], seed=1)
                load_job(spec, model, optimizer, out)
                del model, optimizer
            elif job == "ddp":
                ddp_job(spec, out)
            elif job == "cuda":
                cuda_job(spec, out)
        if dist.get_rank() == 0:
            out_path.write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
