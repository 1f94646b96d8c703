"""Sharded checkpoints on several ranks, as ratios against torch.distributed.checkpoint (DCP) in the same run.

Ranks are real processes started by torchrun on 127.0.0.1 (gloo, CPU; :mod:`bench._sharded_rank` is one rank). The
state is the float32 model of :mod:`bench.checkpoint` plus Adam's two moments, ``--size-mib`` in all, the model
``fully_shard``-ed per block and then at the root (FSDP2 on a CPU device mesh). podtrain is driven through its public
API only: ``sdk.init()`` with ``run.checkpoint()``, ``run.wait()`` and ``run.resume()``.

* **save-file / save-s3** (4 ranks): ``run.checkpoint(step, state, force=True)`` in sync mode, then ``run.wait()``,
  against ``dcp.save`` of ``get_state_dict(model, optimizer)`` with ``FileSystemWriter`` (a local folder) or
  ``FsspecWriter`` (S3: moto on 127.0.0.1, through s3fs). Goal <= 1.1x.
* **stall** (4 ranks, local folder): how long ``run.checkpoint(step, state)`` in async mode keeps the loop from
  changing the state, against ``dcp.async_save`` with each stager this torch offers on the machine (its default
  per-call copy, a reused ``DefaultStager`` whose CPU copies are cached across calls, the same with async staging,
  where the loop waits for ``staging_completion``; with CUDA also the pinned ``BlockingAsyncStager`` cache). The
  baseline is the best of them. Goal <= 0.5x. Every side gets a warm-up call first, not counted.
* **load-4to2** (2 ranks): ``run.resume(state)`` of podtrain's 4-rank checkpoint against ``dcp.load`` with
  ``FileSystemReader`` of DCP's 4-rank checkpoint, then ``set_state_dict``; both from a zeroed state, and checked to
  restore the sum of every value saved. Goal <= 1.2x.
* **ddp-bytes** (2 ranks): the bytes podtrain writes for a DDP model and Adam (a plain model, the same on both
  ranks) against one rank's checkpoint of the same model. Goal <= 1.1x.
* **cuda-stall** (only with CUDA): the async stall of a 4x larger state on the GPU until the training stream is
  idle, against a device-to-host copy into preallocated pinned buffers. Goal <= 1.5x.

Where podtrain refuses a case (before sharded checkpoints, each rank saves its full copy and a checkpoint of 4
ranks does not load on 2), the table says ``refused`` and the error is printed under it; the baseline is still
measured. Seconds are medians over ``--repeat`` repetitions, the two sides alternating; each is the time from a
barrier before the call to one after it, i.e. the slowest rank's.

DCP's ``FsspecWriter`` needs s3fs, which podtrain's environment does not install: the ranks run from
``.bench/venv-s3fs/``, a venv holding only s3fs, aiobotocore and aioitertools (pinned, installed on first use) that
reaches ``.venv``'s packages (torch, podtrain, botocore) through a ``.pth`` file. Without it the S3 row says why it
was skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.checkpoint import BUCKET, MIB, s3_server, suite_args

ROOT = Path(__file__).resolve().parents[1]
S3FS_VENV = ROOT / ".bench" / "venv-s3fs"
# The Airflow environment's pins (requirements/airflow-constraints.txt): they work with .venv's botocore and fsspec.
S3FS_PACKAGES = ("s3fs==2026.9.0", "aiobotocore==3.10.0", "aioitertools==0.13.0")
SAVE_GOAL = 1.1
STALL_GOAL = 0.5
STEP_SECONDS = 0.5  # overlap mode: the compute between a checkpoint and the next optimizer step (a forward+backward)
LOAD_GOAL = 1.2
BYTES_GOAL = 1.1
CUDA_GOAL = 1.5
CUDA_FACTOR = 4  # the GPU state is this many times --size-mib (4 GiB at the default)
SAVE_RANKS = 4
LOAD_RANKS = 2
DEFAULT_REPEAT = 2
JOB_TIMEOUT = 3600.0


# -- the environment with s3fs ---------------------------------------------------------------------------------
def s3fs_python(say: Callable[[str], None]) -> tuple[Path | None, str]:
    """The python of ``.bench/venv-s3fs`` (made if missing, remade once if it no longer imports), or None and why."""
    python = S3FS_VENV / "bin" / "python"
    probe = [str(python), "-c", "import s3fs, torch.distributed.checkpoint, sdk; print(s3fs.__version__)"]
    why = ""
    for _ in range(2):
        try:
            if not python.exists():
                why = make_s3fs_venv(python, say)
                if why:
                    return None, why
            out = subprocess.run(probe, check=False, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if out.returncode == 0:
            return python, f"s3fs {out.stdout.strip()}"
        why = f"{python} cannot import s3fs with torch and podtrain: {out.stderr.strip()[-300:]}"
        shutil.rmtree(S3FS_VENV, ignore_errors=True)  # made for another .venv, or half made: once more
    return None, why


def make_s3fs_venv(python: Path, say: Callable[[str], None]) -> str:
    """Make ``.bench/venv-s3fs``: s3fs and its two packages that .venv lacks, the rest from .venv; "" or why not."""
    say(f"installing {' '.join(S3FS_PACKAGES)} into {S3FS_VENV.relative_to(ROOT)}/ ...")
    # No pip or setuptools of its own: .venv's serve (an older setuptools here would shadow the one torch requires).
    venv = [sys.executable, "-m", "venv", "--clear", "--without-pip", str(S3FS_VENV)]
    subprocess.run(venv, check=True, capture_output=True)
    purelib = Path(sysconfig.get_path("purelib"))  # this environment's packages: torch, podtrain, botocore
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # addsitedir, not a bare path: .venv's own .pth files (podtrain's editable install) are read too.
    (Path(target) / "podtrain-venv.pth").write_text(f"import site; site.addsitedir({str(purelib)!r})\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-input", "--no-deps"]
    pip += ["--disable-pip-version-check"]
    out = subprocess.run([*pip, *S3FS_PACKAGES], check=False, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        shutil.rmtree(S3FS_VENV, ignore_errors=True)
        tail = " / ".join((out.stdout + out.stderr).strip().splitlines()[-3:])
        return f"pip install exited with {out.returncode}: {tail}"
    return ""


# -- launching ranks -------------------------------------------------------------------------------------------
def launch(python: Path, ranks: int, spec: dict[str, Any], workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Run one torchrun job of ``ranks`` processes on ``spec``; what rank 0 wrote (``{"failed": ...}`` if none)."""
    from tests.servers import free_port

    name = "-".join(spec["jobs"])
    spec_file, out_file = workdir / f"{name}.json", workdir / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [str(python), "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={ranks}"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "bench._sharded_rank"]
    cmd += [str(spec_file), str(out_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PODTRAIN_LOG_LEVEL": "error"}
    env.pop("PODTRAIN_CHECKPOINT_URI", None)
    started = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as proc:
        # A rank that hangs (a collective another rank never reaches) must not hang the benchmark.
        watchdog = threading.Timer(JOB_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if not line.startswith(("[", "W", "I")) or line.startswith("[rank"):  # not torchrun's own log lines
                    say(line.rstrip("\n"))
            code = proc.wait()
        finally:
            watchdog.cancel()
    say(f"  ({ranks} ranks, {time.perf_counter() - started:.0f} s)")
    if code != 0 or not out_file.exists():
        tail = [line for line in lines if line.strip()][-6:]
        return {"failed": f"torchrun exited with {code}: " + " / ".join(tail)[-600:]}
    result: dict[str, Any] = json.loads(out_file.read_text())
    return result


# -- rows --------------------------------------------------------------------------------------------------------
@dataclass
class Line:
    """One row of the table: podtrain's and the baseline's figures (medians), or why a side has none."""

    name: str
    unit: str  # "s", "ms" or "MiB"
    goal: float
    podtrain: float | None
    baseline: float | None
    podtrain_name: str
    baseline_name: str
    note: str = ""  # why podtrain or the baseline has no figure

    @property
    def ratio(self) -> float | None:
        if self.podtrain is None or not self.baseline:
            return None
        return self.podtrain / self.baseline

    @property
    def met(self) -> bool:
        return self.ratio is not None and self.ratio <= self.goal


def median(side: dict[str, Any]) -> float | None:
    return statistics.median(side["seconds"]) if side.get("seconds") else None


def timed_line(name: str, goal: float, got: dict[str, Any] | None, podtrain: str, baseline: str) -> Line:
    if got is None:
        return Line(name, "s", goal, None, None, podtrain, baseline, "not measured")
    ours, theirs = got["podtrain"], got["baseline"]
    note = "; ".join(
        f"{who}: {side['refused']}"
        for who, side in (("podtrain refused", ours), ("baseline failed", theirs))
        if side["refused"]
    )
    return Line(name, "s", goal, median(ours), median(theirs), podtrain, baseline, note)


def stall_line(got: dict[str, Any] | None) -> tuple[Line, list[str]]:
    podtrain = "run.checkpoint() in async mode, until it returns (snapshot into reused CPU buffers)"
    if got is None:
        return Line("stall", "ms", STALL_GOAL, None, None, podtrain, "dcp.async_save", "not measured"), []
    candidates = {name: median(side) for name, side in got["baselines"].items()}
    info = [
        f"    dcp.async_save, {name}: "
        + (f"{m * 1000:.1f} ms" if m is not None else f"failed: {got['baselines'][name]['refused']}")
        for name, m in candidates.items()
    ]
    measured = {n: m for n, m in candidates.items() if m is not None}
    best = min(measured, key=lambda n: measured[n]) if measured else None
    ours = median(got["podtrain"])
    note = f"podtrain refused: {got['podtrain']['refused']}" if got["podtrain"]["refused"] else ""
    line = Line(
        "stall",
        "ms",
        STALL_GOAL,
        None if ours is None else ours * 1000,
        None if best is None else measured[best] * 1000,
        podtrain,
        f"dcp.async_save with its best stager here: {best}" if best else "dcp.async_save (every stager failed)",
        note,
    )
    return line, info


def bytes_line(got: dict[str, Any] | None, ranks_dir: Path, single_dir: Path) -> Line:
    podtrain = f"podtrain checkpoint of a DDP model + Adam on {LOAD_RANKS} ranks (bytes of every file written)"
    baseline = "podtrain checkpoint of the same model + Adam on 1 rank"
    if got is None:
        return Line("ddp-bytes", "MiB", BYTES_GOAL, None, None, podtrain, baseline, "not measured")
    note = f"podtrain refused: {got['ranks']['refused']}" if got["ranks"]["refused"] else ""
    ours = folder_bytes(ranks_dir) / MIB if not note else None
    return Line("ddp-bytes", "MiB", BYTES_GOAL, ours, folder_bytes(single_dir) / MIB, podtrain, baseline, note)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def table(lines: list[Line], skipped: list[str], notes: list[str], size_mib: int, repeat: int) -> str:
    header = ("case", "unit", "podtrain", "baseline", "ratio", "goal", "met?")

    def figure(value: float | None) -> str:
        return "refused" if value is None else f"{value:.3f}"

    cells = [
        (
            line.name,
            line.unit,
            figure(line.podtrain) if line.podtrain is not None or "podtrain" in line.note else "-",
            figure(line.baseline) if line.baseline is not None else "-",
            f"{line.ratio:.3f}x" if line.ratio is not None else "-",
            f"<= {line.goal:.2f}x",
            "yes" if line.met else "NO",
        )
        for line in lines
    ]
    widths = [max(len(r[i]) for r in (header, *cells)) for i in range(len(header))]

    def row(values: tuple[str, ...]) -> str:
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    out = [
        f"sharded checkpoints, {size_mib} MiB state (model + Adam moments), median of {repeat} "
        "(ratio = podtrain / baseline; lower is better)"
    ]
    out += [row(header), row(tuple("-" * w for w in widths)), *(row(c) for c in cells)]
    for line in lines:
        out.append(f"  {line.name}: {line.podtrain_name} / {line.baseline_name}")
        if line.note:
            out.append(f"    {line.note}")
        if line.name == "stall":
            out += notes
    out += [f"  {text}" for text in skipped]
    met = sum(line.met for line in lines)
    out.append(f"goals met: {met} of {len(lines)}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return "\n".join(out)


# -- the run -----------------------------------------------------------------------------------------------------
def run(
    size_mib: int, repeat: int, workdir: Path, say: Callable[[str], None]
) -> tuple[list[Line], list[str], list[str]]:
    """Start the S3 server, run the 4-rank job, then the 2-rank one; the rows, the skipped cases, the stall's
    details."""
    skipped: list[str] = []
    python, why = s3fs_python(say)
    say(f"s3fs environment: {why}")
    with s3_server() as server:
        server.create_bucket(BUCKET)
        say(f"{server.name} S3 server at {server.endpoint}")
        stores = [{"name": "file", "podtrain": str(workdir / "podtrain-save"), "dcp": str(workdir / "dcp-save")}]
        if python is not None:
            stores.append({"name": "s3", "podtrain": f"s3://{BUCKET}/podtrain-save", "dcp": f"s3://{BUCKET}/dcp-save"})
        else:
            skipped.append(f"save-s3: skipped: no s3fs for DCP's FsspecWriter ({why})")
        spec = {
            "jobs": ["save"],
            "size_mib": size_mib,
            "repeat": repeat,
            "stores": stores,
            "stall_uri": str(workdir / "podtrain-stall"),
            "step_seconds": STEP_SECONDS,
            "dcp_stall_root": str(workdir / "dcp-stall"),
        }
        say(f"{SAVE_RANKS} ranks: save, then the stall per checkpoint ...")
        saved = launch(python or Path(sys.executable), SAVE_RANKS, spec, workdir, say)
    failed = saved.get("failed")
    if failed:
        say(f"  the {SAVE_RANKS}-rank job failed: {failed}")
    spec = {
        "jobs": ["load", "ddp"] if not failed else ["ddp"],
        "size_mib": size_mib,
        "repeat": repeat,
        "fingerprint": saved.get("fingerprint"),
        "saved_ranks": SAVE_RANKS,
        "podtrain_save_refused": bool(saved.get("save-file", {}).get("podtrain", {}).get("refused")),
        "podtrain_uri": str(workdir / "podtrain-save"),
        "dcp_checkpoint": saved.get("dcp-checkpoint"),
        "ddp_uri": str(workdir / "podtrain-ddp"),
        "single_uri": str(workdir / "podtrain-single"),
    }
    say(f"{LOAD_RANKS} ranks: load of the {SAVE_RANKS}-rank checkpoints, then DDP ...")
    loaded = launch(Path(sys.executable), LOAD_RANKS, spec, workdir, say)
    if loaded.get("failed"):
        say(f"  the {LOAD_RANKS}-rank job failed: {loaded['failed']}")
    lines = [
        timed_line(
            "save-file",
            SAVE_GOAL,
            saved.get("save-file"),
            "run.checkpoint(force=True) + run.wait(), sync mode, local folder",
            "dcp.save with FileSystemWriter",
        ),
    ]
    if python is not None:
        lines.append(
            timed_line(
                "save-s3",
                SAVE_GOAL,
                saved.get("save-s3"),
                "run.checkpoint(force=True) + run.wait(), sync mode, S3 (moto)",
                "dcp.save with FsspecWriter (s3fs)",
            )
        )
    stall, notes = stall_line(saved.get("stall"))
    lines.append(stall)
    overlap = saved.get("stall-overlap")
    if overlap is not None and stall.baseline is not None:
        ours = median(overlap)
        lines.append(
            Line(
                "stall-overlap",
                "ms",
                STALL_GOAL,
                None if ours is None else ours * 1000,
                stall.baseline,
                f"overlap mode: run.checkpoint() + the next step's wait, after {STEP_SECONDS:.2f} s of compute",
                stall.baseline_name,
                f"podtrain refused: {overlap['refused']}" if overlap["refused"] else "",
            )
        )
    lines.append(
        timed_line(
            f"load-{SAVE_RANKS}to{LOAD_RANKS}",
            LOAD_GOAL,
            loaded.get("load"),
            f"run.resume(state) on {LOAD_RANKS} ranks of podtrain's {SAVE_RANKS}-rank checkpoint",
            f"dcp.load (FileSystemReader) + set_state_dict on {LOAD_RANKS} ranks of DCP's {SAVE_RANKS}-rank checkpoint",
        )
    )
    lines.append(bytes_line(loaded.get("ddp"), workdir / "podtrain-ddp", workdir / "podtrain-single"))
    for line in lines:  # rows a failed job left without figures: say which job and why
        job = saved if line.name in ("save-file", "save-s3", "stall", "stall-overlap") else loaded
        if line.note == "not measured" and job.get("failed"):
            line.note = f"not measured: {job['failed']}"
    cuda = cuda_line(size_mib, repeat, workdir, say)
    if isinstance(cuda, Line):
        lines.append(cuda)
    else:
        skipped.append(f"cuda-stall: {cuda}")
    return lines, skipped, notes


def cuda_line(size_mib: int, repeat: int, workdir: Path, say: Callable[[str], None]) -> Line | str:
    """The GPU stall row (one rank per GPU, up to 4), or why it was skipped."""
    import torch

    if not torch.cuda.is_available():
        return "skipped: no CUDA (torch.cuda.is_available() is False)"
    ranks = min(SAVE_RANKS, torch.cuda.device_count())
    size = CUDA_FACTOR * size_mib
    free, _ = torch.cuda.mem_get_info()
    if free < size * MIB * 1.3 / ranks:
        return f"skipped: {size / ranks:.0f} MiB needed per GPU, {free / MIB:.0f} MiB free"
    spec = {"jobs": ["cuda"], "cuda_mib": size, "repeat": repeat, "cuda_uri": str(workdir / "podtrain-cuda")}
    say(f"{ranks} rank(s), one per GPU: the stall of a {size} MiB state on the GPU ...")
    got = launch(Path(sys.executable), ranks, spec, workdir, say)
    if got.get("failed"):
        return f"failed: {got['failed']}"
    line = timed_line(
        "cuda-stall",
        CUDA_GOAL,
        got["cuda"],
        "run.checkpoint() in async mode until the training stream is idle",
        "device-to-host copy of the same tensors into preallocated pinned buffers",
    )
    line.unit = "ms"
    line.podtrain = None if line.podtrain is None else line.podtrain * 1000
    line.baseline = None if line.baseline is None else line.baseline * 1000
    return line


def main(argv: list[str] | None = None) -> int:
    args = suite_args(argv, prog="python -m bench.sharded", doc=__doc__ or "", default_repeat=DEFAULT_REPEAT)

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podtrain-bench-sharded-") as tmp:
        lines, skipped, notes = run(args.size_mib, args.repeat, Path(tmp), say)
    say("")
    say(table(lines, skipped, notes, args.size_mib, args.repeat))
    say(f"sharded benchmark: {time.perf_counter() - started:.0f} s of wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
