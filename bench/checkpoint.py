"""Checkpoint save and resume through podtrain, against plain boto3 on the same S3 server, as ratios.

One S3 server is started on 127.0.0.1 (moto; ``--s3-server seaweedfs``: SeaweedFS) and both clients talk to it
(``AWS_ENDPOINT_URL`` and test credentials in the environment). The state is a model shaped like a real one: a
few large float32 matrices (an embedding and two per block) and many small vectors (biases, norms),
``--size-mib`` in all.

* **save**: ``Checkpointer(s3://…).save(step, {"model": model})`` — serialize, checksum, upload, commit —
  against boto3 ``upload_file`` (default ``TransferConfig``) of a file of the same size.
* **resume**: ``Checkpointer(s3://…).load({"model": model})`` — list, download, verify CRC32C, deserialize,
  ``load_state_dict`` — against boto3 ``download_file`` of a ``torch.save`` file of the same state, then
  ``torch.load`` and ``load_state_dict``. The download is one GET (``multipart_threshold`` above the size):
  moto answers every ranged GET by reading the whole object, so the default ``TransferConfig`` (8 MiB ranges)
  costs about 128 full reads of a 1 GiB object — some 140 s on two cores — and would flatter podtrain.

Clients are created, and their connections opened, before the clock starts (a training job does that once).
The two sides alternate within each repetition (podtrain first on even ones, baseline first on odd ones) and
the table shows medians. On a small machine the server itself is the bottleneck, so absolute seconds mean
little; only the ratio is the figure, and nothing here fails on time.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

BUCKET = "podtrain-bench"
MIB = 2**20
SAVE_GOAL = 1.2
RESUME_GOAL = 1.3


# -- the state -------------------------------------------------------------------------------------------------
def build_model(size_bytes: int) -> Any:
    """A float32 model of about ``size_bytes``: a ``2d x d`` embedding, 7 blocks of two ``d x d`` layers, 44 vectors."""
    import torch
    from torch import nn

    d = max(64, int(math.sqrt(size_bytes / (16 * 4))) // 64 * 64)
    blocks = 7

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(d, device="meta")
            self.attn = nn.Linear(d, d, device="meta")
            self.norm2 = nn.LayerNorm(d, device="meta")
            self.mlp = nn.Linear(d, d, device="meta")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(2 * d, d, device="meta")
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.norm = nn.LayerNorm(d, device="meta")

    model = Model().to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.uniform_(-0.05, 0.05, generator=generator)
    return model


def state_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# -- measurements ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One comparison: the measured side's and the baseline's seconds per repetition (shared by every suite)."""

    name: str
    measured_name: str
    baseline_name: str
    goal: float | None  # None: shown for information
    measured: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.measured) / statistics.median(self.baseline)

    @property
    def met(self) -> bool:
        return self.goal is not None and self.ratio <= self.goal


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes, started with no garbage and no dirty pages left by the side that ran before."""
    gc.collect()
    os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternate(rep: int, podtrain: Callable[[], float], baseline: Callable[[], float]) -> tuple[float, float]:
    """Run both sides, podtrain first on even repetitions and the baseline first on odd ones."""
    if rep % 2 == 0:
        p = podtrain()
        return p, baseline()
    b = baseline()
    return podtrain(), b


S3_SERVERS = ("moto", "seaweedfs")
S3_SERVER = "moto"  # the server every S3 suite starts; ``--s3-server`` (suite_args) sets it


@contextmanager
def s3_server(while_starting: Callable[[], Any] = lambda: None) -> Iterator[Any]:
    """The S3 server :data:`S3_SERVER` on 127.0.0.1 (moto, or SeaweedFS: a real store, whose ranged GETs read
    only the range), with the client environment set for this process.

    ``while_starting`` runs in a thread while the server boots (seconds of imports), so the two overlap. The
    server itself is started from this thread: it is killed when the thread that started it ends.
    """
    from tests.servers import SeaweedFSServer, s3_server_class

    # SeaweedFS without the tests' heap limit: its garbage collector would slow heavy parallel uploads (~2x).
    server = SeaweedFSServer(heap_limit=None) if S3_SERVER == "seaweedfs" else s3_server_class(S3_SERVER)()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-build") as pool:
            building = pool.submit(while_starting)
            server.start()
            building.result()
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        server.stop()


def delete_prefix(s3: Any, prefix: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


class Bench:
    """The state, the reference copy that proves a resume restored it, and both clients of one server."""

    def __init__(self, size_mib: int, workdir: Path, say: Callable[[str], None]) -> None:
        import torch
        from boto3.s3.transfer import TransferConfig

        self.say = say
        say(f"building a {size_mib} MiB float32 model ...")
        self.model = build_model(size_mib * MIB)
        self.reference = {k: v.clone() for k, v in self.model.state_dict().items()}
        nbytes = state_bytes(self.model)
        say(f"  {len(self.reference)} tensors, {nbytes / MIB:.1f} MiB")
        # The baseline's file: the same state, written by torch.save (uploaded, and downloaded on resume).
        self.file = workdir / "state.pt"
        torch.save(self.model.state_dict(), self.file)
        self.downloaded = workdir / "download.pt"
        # One GET for the baseline's download (see the module docstring); uploads keep the default config.
        self.one_get = TransferConfig(multipart_threshold=2 * nbytes + 64 * MIB)
        self.s3: Any = None

    def connect(self) -> None:
        """The baseline's client, once the server's environment is set; the bucket, and a first connection."""
        import boto3

        self.s3 = boto3.client("s3")
        self.s3.create_bucket(Bucket=BUCKET)
        self.s3.head_bucket(Bucket=BUCKET)

    def checkpointer(self, url: str) -> Any:
        from sdk.checkpoints.checkpointer import Checkpointer

        ckpt = Checkpointer(url)
        ckpt.store.ensure_root()  # creates the client and opens its connection, as a job does at start
        return ckpt

    def save(self, repeat: int) -> Row:
        case = Row("save", "Checkpointer.save", "boto3 upload_file (default TransferConfig)", SAVE_GOAL)
        for rep in range(repeat):
            ckpt = self.checkpointer(f"s3://{BUCKET}/save-{rep}")
            key = f"baseline/save-{rep}.pt"
            p, b = alternate(
                rep,
                partial(timed, partial(ckpt.save, 1, {"model": self.model})),
                partial(timed, partial(self.s3.upload_file, str(self.file), BUCKET, key)),
            )
            case.measured.append(p)
            case.baseline.append(b)
            self.say(f"  save   #{rep + 1}: podtrain {p:7.3f} s   baseline {b:7.3f} s")
            delete_prefix(self.s3, key)
            if rep + 1 < repeat:  # the last one is resumed from below
                delete_prefix(self.s3, f"save-{rep}/")
        return case

    def resume(self, repeat: int) -> Row:
        import torch

        case = Row(
            "resume", "Checkpointer.load", "boto3 download_file (one GET) + torch.load + load_state_dict", RESUME_GOAL
        )
        url = f"s3://{BUCKET}/save-{repeat - 1}"
        self.s3.upload_file(str(self.file), BUCKET, "baseline/state.pt")

        def baseline() -> None:
            self.s3.download_file(BUCKET, "baseline/state.pt", str(self.downloaded), Config=self.one_get)
            self.model.load_state_dict(torch.load(self.downloaded, map_location="cpu", weights_only=True))

        for rep in range(repeat):
            ckpt = self.checkpointer(url)
            p, b = alternate(
                rep,
                partial(self.checked, "podtrain", partial(ckpt.load, {"model": self.model})),
                partial(self.checked, "baseline", baseline),
            )
            case.measured.append(p)
            case.baseline.append(b)
            self.say(f"  resume #{rep + 1}: podtrain {p:7.3f} s   baseline {b:7.3f} s")
        return case

    def checked(self, who: str, load: Callable[[], Any]) -> float:
        """Zero the model, time ``load``, then check that it restored every tensor exactly."""
        import torch

        with torch.no_grad():
            for tensor in self.model.state_dict().values():
                tensor.zero_()
        seconds = timed(load)
        self.downloaded.unlink(missing_ok=True)  # now: its dirty pages would be written back during the next run
        loaded = self.model.state_dict()
        wrong = [k for k, v in self.reference.items() if not torch.equal(loaded[k], v)]
        if wrong:
            raise RuntimeError(f"{who} resume restored wrong values for {', '.join(wrong[:5])}")
        return seconds


def run(size_mib: int, repeat: int, workdir: Path, say: Callable[[str], None]) -> list[Row]:
    """Start the S3 server, run both cases, clean up; the cases come back with every repetition's seconds."""
    built: list[Bench] = []
    with s3_server(lambda: built.append(Bench(size_mib, workdir, say))) as server:
        say(f"{server.name} S3 server at {server.endpoint}")
        bench = built[0]
        bench.connect()
        cases = [bench.save(repeat), bench.resume(repeat)]
        delete_prefix(bench.s3, "")
    return cases


def table(cases: list[Row], size_mib: int, repeat: int) -> str:
    header = ("case", "podtrain s", "baseline s", "ratio", "goal", "met?")
    rows = [
        (
            c.name,
            f"{statistics.median(c.measured):.3f}",
            f"{statistics.median(c.baseline):.3f}",
            f"{c.ratio:.2f}x",
            f"<= {c.goal:.1f}x",
            "yes" if c.met else "NO",
        )
        for c in cases
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))

    out = [f"checkpoint of {size_mib} MiB, median of {repeat} (ratio = podtrain / baseline; lower is better)"]
    out += [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]
    out += [f"  baseline for {c.name}: {c.baseline_name}" for c in cases]
    return "\n".join(out)


def suite_args(
    argv: list[str] | None, *, prog: str, doc: str, default_repeat: int, size_help: str = "size of the model state"
) -> argparse.Namespace:
    """``--size-mib``, ``--repeat`` (both at least 1) and ``--s3-server``, as every S3 suite takes them."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--size-mib", type=int, default=1024, help=f"{size_help} (default 1024)")
    repeat_help = f"repetitions of each case; median (default {default_repeat})"
    parser.add_argument("--repeat", type=int, default=default_repeat, help=repeat_help)
    parser.add_argument(
        "--s3-server", choices=S3_SERVERS, default="moto", help="the S3 server on 127.0.0.1 (default moto)"
    )
    args = parser.parse_args(argv)
    global S3_SERVER  # noqa: PLW0603 - one server per process, chosen once from the command line
    S3_SERVER = args.s3_server
    if args.size_mib < 1 or args.repeat < 1:
        parser.error("--size-mib and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = suite_args(argv, prog="python -m bench", doc=__doc__ or "", default_repeat=3)

    from sdk import log

    log.configure(level="warning", fmt="console")  # podtrain's info lines would drown the table

    def say(text: str) -> None:
        print(text, flush=True)

    with tempfile.TemporaryDirectory(prefix="podtrain-bench-") as tmp:
        cases = run(args.size_mib, args.repeat, Path(tmp), say)
    say("")
    say(table(cases, args.size_mib, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
