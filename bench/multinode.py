"""What a preemption of one pod costs a job of two pods: the real ``examples/train.py`` (DDP over 2 pods x 2 ranks,
gloo on CPU), each pod ``podtrain run -- torchrun --nnodes=2 --node-rank=<i> …`` on 127.0.0.1 with its data pulled
from a ``file://`` bucket.

Attempt 1 trains until its first checkpoint, then pod 1 alone gets SIGTERM; attempt 2 (both pods) resumes. From
the run record (one entry per pod per attempt) and the pods' exits:

* **stop** — seconds from the SIGTERM to the last pod's exit, against the grace period. Goal <= 1.0x.
* **steps lost** — the newest step any rank reached minus the step committed at the stop. Goal <= 1.
* **wasted** — pod-seconds spent because of the preemption: the stop, the work lost, and the restart up to the
  resumed step (both pods), against the floor every restart pays whatever the runtime does: the pods starting,
  the data pulled, the checkpoint loaded (attempt 2's time to its resume). Goal <= 1.5x.

No GPU here: pod-seconds stand for GPU-seconds (a pod holds its GPUs for all of it).

    python -m bench.multinode [--repeat 1] [--size-mib N: ignored, the model is train.py's default]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GRACE = 20.0
EVERY = 20  # steps between checkpoints
STOP_GOAL, LOST_GOAL, WASTE_GOAL = 1.0, 1, 1.5


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pods(tmp: Path, attempt: int, steps: int, level: str = "warning") -> list[subprocess.Popen[bytes]]:
    port, pods = _port(), []
    for node in (0, 1):
        env = {
            **os.environ,
            "PODTRAIN_RUN_ID": "bench",
            "PODTRAIN_ATTEMPT": str(attempt),
            "PODTRAIN_DATA_URI": (tmp / "bucket" / "data").as_uri(),
            "PODTRAIN_DATA_DIR": str(tmp / f"pod{node}" / "data"),
            "PODTRAIN_CHECKPOINT_URI": (tmp / "bucket" / "ckpt").as_uri(),
            "PODTRAIN_ARTIFACT_URI": (tmp / "bucket" / "artifacts").as_uri(),
            "PODTRAIN_OUTPUT_DIR": str(tmp / f"pod{node}" / "output"),
            "PODTRAIN_GRACE_SECONDS": str(GRACE),
            "PODTRAIN_TERMINATION_LOG": str(tmp / f"termination-{attempt}-{node}"),
            "PODTRAIN_LOG_LEVEL": level,
            "JOB_COMPLETION_INDEX": str(node),
        }
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}"]
        torchrun += ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}"]
        train = [str(ROOT / "examples" / "train.py"), "--steps", str(steps), "--checkpoint-every", str(EVERY)]
        train += ["--log-every", "1000000", "--threads", "1"]
        with (tmp / f"attempt-{attempt}-pod{node}.log").open("w") as sink:
            pods.append(
                subprocess.Popen(
                    [sys.executable, "-m", "entrypoint", "run", "--", *torchrun, *train],
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    return pods


def _committed(tmp: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (tmp / "bucket" / "ckpt").glob("step-*/MANIFEST.json"))


def _record(tmp: Path) -> list[dict[str, Any]]:
    from sdk.lifecycle import runrecord

    return list(runrecord.read((tmp / "bucket" / "artifacts" / "bench").as_uri())["attempts"])


def _resumed_at(log: Path) -> float:
    """When the pod's ranks had resumed: the last ``checkpoint.resumed`` line of its JSON log (UNIX time)."""
    from datetime import datetime

    at = None
    for line in log.read_text(errors="replace").splitlines():
        if '"checkpoint.resumed"' in line:
            try:
                at = datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError):
                continue
    if at is None:
        raise RuntimeError(f"{log} has no checkpoint.resumed line")
    return at


def one(tmp: Path) -> dict[str, float]:
    """One preemption and its restart; the figures of the module's doc."""
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dataset.py"), "--out", str(tmp / "bucket" / "data")],
        check=True,
        capture_output=True,
    )
    pods = _pods(tmp, 1, 100_000)
    try:
        give_up = time.monotonic() + 300
        while len(_committed(tmp)) < 1:
            if any(p.poll() is not None for p in pods) or time.monotonic() > give_up:
                raise RuntimeError(f"attempt 1 ended or stalled before its first checkpoint: see {tmp}")
            time.sleep(0.05)
        time.sleep(1.0)  # mid-way between checkpoints, as a preemption lands
        os.kill(pods[1].pid, signal.SIGTERM)
        sent = time.monotonic()
        codes = [p.wait(timeout=120) for p in pods]
        stop = time.monotonic() - sent
    finally:
        for pod in pods:
            if pod.poll() is None:
                pod.kill()
    if codes != [75, 75]:
        raise RuntimeError(f"attempt 1 exited {codes}, not 75 on both pods: see {tmp}")
    committed = _committed(tmp)[-1]
    first = [e for e in _record(tmp) if e.get("attempt") == 1]
    reached = max(int(e.get("last_step") or 0) for e in first)
    started = time.time()
    pods = _pods(tmp, 2, committed + 1, level="info")
    codes = [p.wait(timeout=300) for p in pods]
    if codes != [0, 0]:
        raise RuntimeError(f"attempt 2 exited {codes}: see {tmp}")
    # The floor: attempt 2 up to its resume (pods started, data pulled, checkpoint loaded), the slower pod's.
    restart = max(_resumed_at(tmp / f"attempt-2-pod{node}.log") for node in (0, 1)) - started
    step_seconds = max(float(e.get("wall_seconds") or 0) for e in first) / max(1, reached)
    lost = reached - committed
    wasted = 2 * (stop + lost * step_seconds + restart)
    return {"stop": stop, "lost": float(lost), "wasted": wasted, "floor": 2 * restart}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--size-mib", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="podtrain-bench-multinode-") as tmp:
            runs.append(one(Path(tmp)))
    print(table(runs))
    return 0


def table(runs: list[dict[str, float]]) -> str:
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    rows = [
        ("stop", "s", median["stop"], GRACE, STOP_GOAL, "SIGTERM to one pod -> the last pod's exit / the grace period"),
        (
            "steps-lost",
            "steps",
            median["lost"],
            1.0,
            float(LOST_GOAL),
            "newest step reached - step committed at the stop",
        ),
        (
            "wasted",
            "pod-s",
            median["wasted"],
            median["floor"],
            WASTE_GOAL,
            "stop + lost work + restart / restart floor",
        ),
    ]
    lines = [
        f"preemption of one pod of 2 (2 ranks each, examples/train.py, gloo), median of {len(runs)}",
        f"{'case':<11} {'unit':<6} {'podtrain':>9} {'baseline':>9} {'ratio':>7} {'goal':>9}  met?",
    ]
    for name, unit, value, base, goal, _ in rows:
        ratio = value / base if base else float("inf")
        met = "yes" if (value <= goal if name == "steps-lost" else ratio <= goal) else "NO"
        shown = f"<= {goal:g}" if name == "steps-lost" else f"<= {goal:.2f}x"
        lines.append(f"{name:<11} {unit:<6} {value:>9.3f} {base:>9.3f} {ratio:>6.3f}x {shown:>9}  {met}")
    lines += [f"  {name}: {why}" for name, *_, why in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
