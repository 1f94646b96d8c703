"""Dataset pull and artifact push through the ``podtrain`` CLI, against ``aws s3 sync``, on one moto S3 server.

One moto S3 server is started on 127.0.0.1 (as in :mod:`bench.checkpoint`). Both clients run as subprocesses
with the same environment: ``AWS_ENDPOINT_URL``, fake credentials, ``AWS_DEFAULT_REGION=us-east-1`` and no
AWS config file, so the CLI keeps its default transfer settings (10 concurrent requests, 8 MiB multipart
threshold and chunk size), as users run it; ``podtrain`` keeps its defaults too (16 workers). The CLI is
``awscli`` from PyPI, in its own venv (``.venv-awscli/``, created on first use: its exact botocore pin clashes
with podtrain's pinned botocore); when it cannot be installed the suite says so and measures nothing.

The dataset is random bytes from a seeded generator: 1,000 files of 1 MiB and 8 of 64 MiB at the default
``--size-mib 1024`` (1.5 GiB). Counts scale with ``size_mib / 1024`` (at least 16 small and 2 large files),
file sizes stay 1 MiB and 64 MiB from 1024 up and shrink with it below (at least 256 KiB and 2 MiB): ``--size-mib
8`` is 16 x 256 KiB + 2 x 2 MiB.

* **cold-pull**: ``podtrain pull s3://…/data/ --dest <empty dir>`` against ``aws s3 sync s3://…/data/ <empty
  dir>``. Goals: wall <= 1.0x the CLI's, client CPU <= 0.5x the CLI's.
* **warm-pull**: the same commands again into the now-full folders, :data:`WARM_SAMPLES` times per repetition (a
  sub-second run is within this box's scheduling noise; the median of many is the figure). Goals: <= 0.5x the
  CLI's warm sync, and <= 0.05x podtrain's own cold pull (row *warm-pull-vs-cold*).
* **hand-filled-pull** (information): the files copied into fresh folders by hand (new mtimes, no
  ``.podtrain-pull.jsonl``). ``aws s3 sync`` re-downloads every local file newer than its object; podtrain has
  no record there and fetches what it cannot match against the store's checksum (multipart objects have no
  whole-object one). The files and bytes each side moved are printed under the table.
* **push**: ``podtrain push <dir> s3://…/push-podtrain/`` against ``aws s3 sync <dir> s3://…/push-cli/``
  (``--exclude .podtrain-push.jsonl``, podtrain's record of what it sent). Goals: wall <= 1.0x, client CPU
  <= 0.5x. **warm-push**: both again, nothing changed, :data:`WARM_SAMPLES` times per repetition. Goal: <= 0.5x.

Each case is measured as wall seconds, client CPU seconds (user + sys of the subprocess, from
``getrusage(RUSAGE_CHILDREN)``) and moto's CPU seconds during the case (``/proc/<pid>/stat``). Every case
starts from the same state (fresh empty folders, push prefixes and podtrain's push record deleted), the sides
alternate (podtrain first on even repetitions) and the tables show medians.

moto answers every ranged GET by reading the whole object and slicing it: the CLI downloads a 64 MiB object as
8 ranged GETs of 8 MiB, which costs moto 8 full reads (server CPU, and wall time on a small machine) that real
S3 does not charge, and so would any ranged reads of podtrain's. Measure ranged-GET changes against real S3.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import checkpoint
from bench.checkpoint import BUCKET, MIB, Row, delete_prefix, s3_server, suite_args, timed

ROOT = Path(__file__).resolve().parents[1]
AWSCLI = "awscli==1.46.2"
AWSCLI_VENV = ROOT / ".venv-awscli"
PUSH_INDEX = ".podtrain-push.jsonl"
WALL_GOAL = 1.0
CPU_GOAL = 0.5
WARM_GOAL = 0.5
WARM_COLD_GOAL = 0.05
KIB = 2**10
DEFAULT_REPEAT = 2  # at 1.5 GiB: ~1.5 min to write and upload the dataset, then ~2.5 min per repetition on two cores
WARM_SAMPLES = 5  # warm cases take 0.2-2 s, within this box's scheduling noise: each repetition measures them 5 times


# -- the dataset and the CLI -----------------------------------------------------------------------------------
def dataset(size_mib: int) -> dict[str, int]:
    """Relative name -> size: ``size_mib`` 1024 is 1,000 x 1 MiB + 8 x 64 MiB (see the module docstring)."""
    scale = size_mib / 1024
    small = max(256 * KIB, min(MIB, int(MIB * scale) // KIB * KIB))
    large = max(2 * MIB, min(64 * MIB, int(64 * MIB * scale) // KIB * KIB))
    files = {f"small/{i:05d}.bin": small for i in range(max(16, round(1000 * scale)))}
    files.update({f"large/{i:03d}.bin": large for i in range(max(2, round(8 * scale)))})
    return files


def describe(files: dict[str, int]) -> str:
    sizes: dict[int, int] = {}
    for size in files.values():
        sizes[size] = sizes.get(size, 0) + 1
    parts = [f"{n} x {s / MIB:g} MiB" for s, n in sorted(sizes.items())]
    return f"{' + '.join(parts)} = {sum(files.values()) / MIB:.0f} MiB in {len(files)} files"


def write_dataset(files: dict[str, int], folder: Path, say: Callable[[str], None]) -> None:
    import numpy as np

    say(f"writing the dataset: {describe(files)} ...")
    rng = np.random.default_rng(0)
    for name, size in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(size))


def aws_cli(say: Callable[[str], None]) -> tuple[Path | None, str]:
    """The ``aws`` executable in ``.venv-awscli`` (installed there if missing), or None and why not."""
    aws = AWSCLI_VENV / "bin" / "aws"
    try:
        if not aws.exists():
            say(f"installing {AWSCLI} into {AWSCLI_VENV.relative_to(ROOT)}/ ...")
            for cmd in (
                [sys.executable, "-m", "venv", "--clear", str(AWSCLI_VENV)],
                [str(AWSCLI_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input", AWSCLI],
            ):
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
                if out.returncode != 0:
                    shutil.rmtree(AWSCLI_VENV, ignore_errors=True)
                    tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
                    return None, f"`{' '.join(cmd[:5])} …` exited with {out.returncode}: {' / '.join(tail)}"
        out = subprocess.run([str(aws), "--version"], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if out.returncode != 0:
        return None, f"`aws --version` exited with {out.returncode}: {out.stderr.strip()[-300:]}"
    return aws, (out.stdout or out.stderr).strip()


# -- measurements ----------------------------------------------------------------------------------------------
def process_cpu(pid: int) -> float:
    """CPU seconds (user + sys, all threads) of a running process, from ``/proc``; NaN where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sample:
    """One client run: wall, its CPU, moto's CPU, and the files and bytes it moved."""

    wall: float
    cpu: float
    server: float
    files: int
    nbytes: int


@dataclass
class Case:
    name: str
    goal: float | None  # wall, podtrain / aws
    cpu_goal: float | None  # client CPU, podtrain / aws
    podtrain: list[Sample] = field(default_factory=list)
    aws: list[Sample] = field(default_factory=list)

    def row(self, what: str, goal: float | None) -> Row:
        """The ``what`` figure (``wall`` or ``cpu``) of both sides, against ``goal``."""
        measured, baseline = [getattr(s, what) for s in self.podtrain], [getattr(s, what) for s in self.aws]
        return Row(self.name, "podtrain", "aws s3 sync", goal, measured, baseline)


class TransferBench:
    def __init__(self, files: dict[str, int], aws: Path, workdir: Path, server: Any, say: Callable[[str], None]):
        self.files = files
        self.aws = str(aws)
        self.workdir = workdir
        self.source = workdir / "source"
        self.server_pid: int = server.proc.pid
        self.say = say
        podtrain = Path(sys.executable).with_name("podtrain")
        self.podtrain = [str(podtrain)] if podtrain.exists() else [sys.executable, "-m", "entrypoint"]
        # The same environment for both: the server's (set by s3_server), and no AWS config or credential files.
        self.env = {k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", "AWS_CA_BUNDLE")}
        self.env.update(
            AWS_CONFIG_FILE=str(workdir / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(workdir / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        import boto3

        self.s3 = boto3.client("s3")
        self.s3.create_bucket(Bucket=BUCKET)

    def upload_dataset(self) -> None:
        """The dataset under ``data/`` (boto3, default ``TransferConfig``, 8 threads; not timed)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda n: self.s3.upload_file(str(self.source / n), BUCKET, f"data/{n}"), self.files))

    def run(self, who: str, args: list[str]) -> Sample:
        """Run one client to completion; raises on a non-zero exit."""
        cmd = (
            [*self.podtrain, *args, "--json"] if who == "podtrain" else [self.aws, "s3", "sync", *args, "--no-progress"]
        )
        got: dict[str, Any] = {}

        def call() -> None:
            got["cpu"], got["server"] = children_cpu(), process_cpu(self.server_pid)
            got["out"] = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=3600, check=False)
            got["cpu"], got["server"] = children_cpu() - got["cpu"], process_cpu(self.server_pid) - got["server"]

        wall = timed(call)
        out: subprocess.CompletedProcess[str] = got["out"]
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {out.returncode}:\n{(out.stdout + out.stderr)[-2000:]}")
        if who == "podtrain":
            result = json.loads(out.stdout.strip().splitlines()[-1])
            files = result["fetched"] if "fetched" in result else result["sent"]
            nbytes = result["bytes_fetched"] if "bytes_fetched" in result else result["bytes_sent"]
        else:  # one "download: s3://… to …" / "upload: … to s3://…" line per file moved
            names = [
                word.split("/", 4)[4]
                for line in out.stdout.splitlines()
                if line.startswith(("download:", "upload:"))
                for word in line.split()
                if word.startswith("s3://")
            ]
            files, nbytes = len(names), sum(self.files.get(n, 0) for n in names)
        return Sample(wall, got["cpu"], got["server"], files, nbytes)

    def check_folder(self, folder: Path) -> None:
        wrong = [
            n for n, size in self.files.items() if not (folder / n).is_file() or (folder / n).stat().st_size != size
        ]
        if wrong:
            raise RuntimeError(f"{folder}: {len(wrong)} files missing or of the wrong size, e.g. {wrong[0]}")

    def both(
        self, rep: int, case: Case, podtrain: list[str], aws: list[str], files: int | None, *, sample: int | None = None
    ) -> None:
        """Both sides of one repetition of ``case`` (``sample``: which of a warm case's runs), in alternating order;
        logs, checks, records."""
        if (rep + (sample or 0)) % 2 == 0:  # as bench.checkpoint.alternate: podtrain first on even runs
            p = self.run("podtrain", podtrain)
            a = self.run("aws", aws)
        else:
            a = self.run("aws", aws)
            p = self.run("podtrain", podtrain)
        for who, got in (("podtrain", p), ("aws", a)):
            if files is not None and got.files != files:
                raise RuntimeError(f"{who} {case.name}: {files} files should have moved, {got.files} did")
        case.podtrain.append(p)
        case.aws.append(a)
        run = f"{rep + 1}" if sample is None else f"{rep + 1}.{sample + 1}"
        self.say(
            f"  {case.name:<16} #{run}: podtrain {p.wall:7.2f} s (cpu {p.cpu:6.2f}, server {p.server:6.2f}, "
            f"{p.files} files) | aws {a.wall:7.2f} s (cpu {a.cpu:6.2f}, server {a.server:6.2f}, {a.files} files)"
        )

    def pulls(self, repeat: int) -> list[Case]:
        cold = Case("cold-pull", WALL_GOAL, CPU_GOAL)
        warm = Case("warm-pull", WARM_GOAL, None)
        hand = Case("hand-filled-pull", None, None)
        url, n = f"s3://{BUCKET}/data/", len(self.files)
        for rep in range(repeat):
            mine, theirs = self.workdir / f"pull-{rep}-podtrain", self.workdir / f"pull-{rep}-aws"
            for folder in (mine, theirs):
                folder.mkdir()
            self.both(rep, cold, ["pull", url, "--dest", str(mine)], [url, str(theirs)], n)
            self.check_folder(mine)
            self.check_folder(theirs)
            for sample in range(WARM_SAMPLES):
                self.both(rep, warm, ["pull", url, "--dest", str(mine)], [url, str(theirs)], 0, sample=sample)
            shutil.rmtree(mine)
            shutil.rmtree(theirs)
            mine, theirs = self.workdir / f"hand-{rep}-podtrain", self.workdir / f"hand-{rep}-aws"
            for folder in (mine, theirs):  # copyfile: fresh files, mtime now, no index
                shutil.copytree(
                    self.source, folder, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns(PUSH_INDEX)
                )
            self.both(rep, hand, ["pull", url, "--dest", str(mine)], [url, str(theirs)], None)
            shutil.rmtree(mine)
            shutil.rmtree(theirs)
        return [cold, warm, hand]

    def pushes(self, repeat: int) -> list[Case]:
        cold = Case("push", WALL_GOAL, CPU_GOAL)
        warm = Case("warm-push", WARM_GOAL, None)
        mine = ["push", str(self.source), f"s3://{BUCKET}/push-podtrain/"]
        theirs = [str(self.source), f"s3://{BUCKET}/push-cli/", "--exclude", PUSH_INDEX]
        for rep in range(repeat):
            delete_prefix(self.s3, "push-")
            (self.source / PUSH_INDEX).unlink(missing_ok=True)
            self.both(rep, cold, mine, theirs, len(self.files))
            for sample in range(WARM_SAMPLES):
                self.both(rep, warm, mine, theirs, 0, sample=sample)
        delete_prefix(self.s3, "push-")
        return [cold, warm]


def run(size_mib: int, repeat: int, workdir: Path, say: Callable[[str], None]) -> list[Case] | str:
    """The cases with every repetition's samples, or why the suite was skipped."""
    aws, version = aws_cli(say)
    if aws is None:
        return f"aws CLI unavailable: {version}"
    say(f"baseline: {version}")
    files = dataset(size_mib)
    source = workdir / "source"
    with s3_server(lambda: write_dataset(files, source, say)) as server:
        say(f"{server.name} S3 server at {server.endpoint}")
        bench = TransferBench(files, aws, workdir, server, say)
        bench.upload_dataset()
        cases = bench.pulls(repeat) + bench.pushes(repeat)
        delete_prefix(bench.s3, "")
    return cases


# -- the tables ------------------------------------------------------------------------------------------------
def median(samples: list[Sample], what: str) -> float:
    return statistics.median(getattr(s, what) for s in samples)


def render(header: tuple[str, ...], cells: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *cells)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))

    return [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in cells)]


def ratio_cells(row: Row) -> tuple[str, str, str]:
    """The ratio, the goal and whether it is met."""
    if row.goal is None:
        return f"{row.ratio:.3f}x", "(info)", "-"
    return f"{row.ratio:.3f}x", f"<= {row.goal:.2f}x", "yes" if row.met else "NO"


def table(cases: list[Case], files: dict[str, int], repeat: int) -> str:
    by_name = {c.name: c for c in cases}
    rows = [c.row("wall", c.goal) for c in cases]
    cold, warm = by_name["cold-pull"], by_name["warm-pull"]
    warm_cold = Row("warm-pull-vs-cold", "podtrain warm pull", "podtrain cold pull", WARM_COLD_GOAL)
    warm_cold.measured, warm_cold.baseline = [s.wall for s in warm.podtrain], [s.wall for s in cold.podtrain]
    rows.insert(2, warm_cold)
    wall = [
        (r.name, f"{statistics.median(r.measured):.3f}", f"{statistics.median(r.baseline):.3f}", *ratio_cells(r))
        for r in rows
    ]
    cpu = [
        (
            c.name,
            f"{median(c.podtrain, 'cpu'):.2f}",
            f"{median(c.aws, 'cpu'):.2f}",
            *ratio_cells(c.row("cpu", c.cpu_goal)),
            f"{median(c.podtrain, 'server'):.2f}",
            f"{median(c.aws, 'server'):.2f}",
        )
        for c in cases
    ]
    out = [
        f"data transfer against aws s3 sync: {describe(files)}, median of {repeat} (warm cases: of "
        f"{repeat * WARM_SAMPLES}) (ratio = podtrain / baseline; lower is better)"
    ]
    out += render(("case", "podtrain s", "baseline s", "ratio", "goal", "met?"), wall)
    out += ["  baseline: aws s3 sync (awscli defaults: 10 requests at once, 8 MiB multipart threshold and parts)"]
    out += ["  warm-pull-vs-cold: podtrain's warm pull / podtrain's cold pull"]
    hand = by_name["hand-filled-pull"]
    out += [
        f"  hand-filled-pull: files copied in by hand (new mtimes, no .podtrain-pull.jsonl): podtrain moved "
        f"{median(hand.podtrain, 'files'):.0f} files ({median(hand.podtrain, 'nbytes') / MIB:.1f} MiB), "
        f"aws s3 sync {median(hand.aws, 'files'):.0f} files ({median(hand.aws, 'nbytes') / MIB:.1f} MiB)"
    ]
    name = checkpoint.S3_SERVER
    out += ["", f"client CPU seconds (user+sys of the client process) and {name}'s CPU seconds during each case"]
    out += render(
        ("case", "podtrain cpu s", "aws cpu s", "ratio", "goal", "met?", f"{name} s (podtrain)", f"{name} s (aws)"),
        cpu,
    )
    if name == "moto":
        out += [
            "  moto answers each ranged GET by reading the whole object: every 8 MiB range the CLI reads of a large",
            "  object costs the server a full read of it, which real S3 does not charge (nor would it for podtrain's)",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = suite_args(
        argv,
        prog="python -m bench.transfer",
        doc=__doc__ or "",
        default_repeat=DEFAULT_REPEAT,
        size_help="dataset scale: 1024 is 1.5 GiB",
    )

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podtrain-bench-transfer-") as tmp:
        cases = run(args.size_mib, args.repeat, Path(tmp), say)
    say("")
    if isinstance(cases, str):
        say(f"data transfer against aws s3 sync: skipped: {cases}")
        return 0
    say(table(cases, dataset(args.size_mib), args.repeat))
    say(f"transfer benchmark: {time.perf_counter() - started:.0f} s of wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
