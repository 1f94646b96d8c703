"""podtrain's whole promise on one machine: pull, train, get preempted, resume, push — no cloud, no credentials.

    make demo           # a file:// "bucket" in .demo/bucket stands in for object storage
    make demo S3=1      # the same against an S3 server (moto) on 127.0.0.1
    make demo S3=seaweedfs   # ... against SeaweedFS, a real object store (signatures and checksums checked)

What happens, each step a real process as in a pod:

1. ``examples/dataset.py`` writes a small text corpus into the bucket (with S3, ``podtrain push`` uploads it).
2. Attempt 1: ``podtrain run -- python examples/train.py`` pulls the data, trains, checkpoints in the
   background; partway through, a real SIGTERM (what the kubelet sends on preemption) goes to ``podtrain run``.
   The run commits its current step, the supervisor exits 75 ("retry me") and writes its termination message.
3. Attempt 2, a fresh "pod" (empty data and output folders): pulls again, resumes from the newest verified
   checkpoint, finishes, exports the final weights and pushes its outputs; the run record gains its entry.
4. An uninterrupted run with the same seed, for reference.
5. A summary: steps, steps lost to the preemption, checkpoint sizes and the training stall per checkpoint, final
   loss, where the artifacts and the run record are, and whether the final weights equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUCKET = "podtrain-demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="where everything goes (default .demo)")
    parser.add_argument(
        "--s3",
        nargs="?",
        const="moto",
        choices=["moto", "seaweedfs"],
        help="use an S3 server on 127.0.0.1 instead of a folder: moto (the default) or seaweedfs",
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints (default 25)")
    parser.add_argument("--stop-at", type=float, default=0.5, help="SIGTERM once this fraction of steps is done")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    began = time.monotonic()
    server = (_SeaweedFS(workdir) if args.s3 == "seaweedfs" else _start_s3(workdir)) if args.s3 else None
    try:
        demo = Demo(workdir, args, server)
        return demo.run(began)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


class Demo:
    def __init__(self, workdir: Path, args: argparse.Namespace, server: Any) -> None:
        self.workdir, self.args = workdir, args
        bin_dir = Path(sys.executable).parent
        self.podtrain = (
            [str(bin_dir / "podtrain")] if (bin_dir / "podtrain").exists() else [sys.executable, "-m", "entrypoint"]
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PODTRAIN_", "AWS_"))}
        self.env.update(PODTRAIN_LOG_FORMAT="json", PODTRAIN_GRACE_SECONDS="20", PYTHONUNBUFFERED="1")
        if server is not None:
            self.env.update(server.env)
            self.base = f"s3://{BUCKET}"
        else:
            (workdir / "bucket").mkdir()
            self.base = f"file://{workdir / 'bucket'}"

    # -- the flow -----------------------------------------------------------------------------------------
    def run(self, began: float) -> int:
        where = "an S3 server on " + self.env["AWS_ENDPOINT_URL"] if self.base.startswith("s3") else "a local folder"
        if self.base.startswith("s3"):
            where += ", SeaweedFS" if self.args.s3 == "seaweedfs" else ", moto"
        print(f"podtrain demo: the bucket is {self.base} ({where})\n")
        self.dataset()
        stop_at = max(1, int(self.args.steps * self.args.stop_at))
        print(
            f"2) attempt 1: podtrain run -- python examples/train.py --steps {self.args.steps}; a SIGTERM once step "
            f"{stop_at} is logged"
        )
        first = self.attempt("demo", 1, stop_at=stop_at)
        print(f"   exit code {first['code']} (75: preempted, the DAG retries); termination message:")
        print(f"   {first['termination']}")
        print(f"   what stands in the bucket (podtrain checkpoints list / verify {self.base}/checkpoints/demo):")
        for command in ("list", "verify"):
            out = self.podtrain_cmd(["checkpoints", command, f"{self.base}/checkpoints/demo"])
            print("\n".join(f"   | {line}" for line in out.rstrip().splitlines()))
        print("\n3) attempt 2, a fresh pod: pull, resume from the newest verified checkpoint, finish, export, push")
        second = self.attempt("demo", 2)
        print(f"   exit code {second['code']}; termination message:\n   {second['termination']}")
        print("\n4) an uninterrupted run with the same seed, for reference")
        reference = self.attempt("demo-reference", 1)
        equal = _same_weights(second["export"], reference["export"])
        record = self.record("demo")
        self.summary(first=first, second=second, record=record, equal=equal, seconds=time.monotonic() - began)
        ok = first["code"] == 75 and second["code"] == 0 and reference["code"] == 0 and equal
        return 0 if ok else 1

    def dataset(self) -> None:
        local = self.workdir / "corpus"
        subprocess.run(
            [sys.executable, str(HERE / "dataset.py"), "--out", str(local)],
            check=True,
            env=self.env,
            stdout=subprocess.DEVNULL,
        )
        files = sorted(p.name for p in local.glob("shard-*"))
        if self.base.startswith("file://"):
            shutil.copytree(local, self.workdir / "bucket" / "data", ignore=shutil.ignore_patterns(".podtrain-*"))
            print(f"1) dataset: {len(files)} shards written to {self.base}/data")
        else:
            self.podtrain_cmd(["push", str(local), f"{self.base}/data", "--no-progress"])
            print(f"1) dataset: {len(files)} shards uploaded to {self.base}/data with `podtrain push`")

    def attempt(self, run_id: str, number: int, *, stop_at: int | None = None) -> dict[str, Any]:
        """One pod: ``podtrain run -- python examples/train.py``; SIGTERM once ``stop_at`` steps are done."""
        pod = self.workdir / f"{run_id}-attempt-{number}"
        pod.mkdir()
        env = {
            **self.env,
            "PODTRAIN_RUN_ID": run_id,
            "PODTRAIN_ATTEMPT": str(number),
            "PODTRAIN_DATA_URI": f"{self.base}/data",
            "PODTRAIN_DATA_DIR": str(pod / "data"),
            "PODTRAIN_OUTPUT_DIR": str(pod / "output"),
            "PODTRAIN_CHECKPOINT_URI": f"{self.base}/checkpoints/{run_id}",
            "PODTRAIN_ARTIFACT_URI": f"{self.base}/artifacts",
            "PODTRAIN_TERMINATION_LOG": str(pod / "termination-log"),
        }
        cmd = [
            *self.podtrain,
            "run",
            "--",
            sys.executable,
            str(HERE / "train.py"),
            "--steps",
            str(self.args.steps),
            "--checkpoint-every",
            str(self.args.checkpoint_every),
            "--log-every",
            "25",
        ]
        with (pod / "log.jsonl").open("w") as log:
            child = subprocess.Popen(cmd, env=env, cwd=pod, stdout=subprocess.PIPE, stderr=log, text=True)
            assert child.stdout is not None
            summary: dict[str, Any] = {}
            for raw in child.stdout:
                line = raw.rstrip()
                if line.startswith("{"):
                    summary = json.loads(line)
                    continue
                print(f"   | {line}")
                if stop_at is not None and line.startswith("step") and _step_of(line) >= stop_at:
                    print("   ! SIGTERM → podtrain run (as the kubelet does on preemption)")
                    child.send_signal(signal.SIGTERM)
                    stop_at = None
            code = child.wait()
        events = [json.loads(x) for x in (pod / "log.jsonl").read_text().splitlines() if x.startswith("{")]
        termination = (pod / "termination-log").read_text().strip() if (pod / "termination-log").exists() else "—"
        return {
            "code": code,
            "termination": termination,
            "summary": summary,
            "events": events,
            "export": pod / "output" / "export" / "model.safetensors",
            "pod": pod,
        }

    def record(self, run_id: str) -> dict[str, Any]:
        out = self.podtrain_cmd(["record", f"{self.base}/artifacts/{run_id}", "--json"])
        return dict(json.loads(out))

    def podtrain_cmd(self, args: list[str]) -> str:
        done = subprocess.run([*self.podtrain, *args], env=self.env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"podtrain {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def summary(
        self,
        *,
        first: dict[str, Any],
        second: dict[str, Any],
        record: dict[str, Any],
        equal: bool,
        seconds: float,
    ) -> None:
        entries = record.get("attempts", [])
        lost = sum(int(e.get("steps_lost") or 0) for e in entries)
        stopped = first["summary"].get("end_step")
        resumed = second["summary"].get("start_step")
        committed = [e for a in (first, second) for e in a["events"] if e.get("event") == "checkpoint.committed"]
        stalls = [
            e["stall_seconds"] * 1000
            for a in (first, second)
            for e in a["events"]
            if e.get("event") == "checkpoint.started"
        ]
        sizes = [e["bytes"] / 2**20 for e in committed]
        last = second["summary"]
        print("\nsummary")
        print(
            f"  steps: {self.args.steps} in 2 attempts; attempt 1 stopped at step {stopped} and exited "
            f"{first['code']}, attempt 2 resumed from step {resumed}: {lost} steps lost to the preemption"
        )
        if sizes:
            print(
                f"  checkpoints: {len(committed)} committed, {statistics.median(sizes):.2f} MiB each; training "
                f"stall per checkpoint: median {statistics.median(stalls):.1f} ms, max {max(stalls):.1f} ms "
                f"(the copy; writing and committing ran in the background)"
            )
        if last.get("final_loss") is not None:
            print(
                f"  loss: {first['summary'].get('first_loss', float('nan')):.3f} at step 1, {last['final_loss']:.3f} "
                f"at step {last.get('end_step')} (a model that knew only letter frequencies would score "
                f"{last.get('unigram_entropy', float('nan')):.3f})"
            )
        print(f"  artifacts: {self.base}/artifacts/demo/ (export/model.safetensors + .json, metrics.jsonl)")
        print(f"  run record: {self.base}/artifacts/demo/run.json — `podtrain record {self.base}/artifacts/demo`:")
        table = self.podtrain_cmd(["record", f"{self.base}/artifacts/demo"])
        print("\n".join(f"    {line}" for line in table.rstrip().splitlines()))
        print(f"  final weights equal the uninterrupted run's, bitwise: {equal}")
        print(f"  demo took {seconds:.0f} s")


def _step_of(line: str) -> int:
    try:
        return int(line.split()[1].split("/", maxsplit=1)[0])
    except (IndexError, ValueError):
        return -1


def _same_weights(a: Path, b: Path) -> bool:
    if not a.exists() or not b.exists():
        return False
    import torch
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


class _SeaweedFS:
    """SeaweedFS set up as the test suite sets it up (``tests/servers.py``), with one bucket; what ``main`` needs of
    a server: ``env``, ``terminate()``, ``wait()``."""

    def __init__(self, workdir: Path) -> None:
        sys.path.insert(0, str(HERE.parent))
        from tests.servers import SeaweedFSServer

        self.server = SeaweedFSServer()
        try:
            self.server.start()
        except RuntimeError as e:
            raise SystemExit(f"the S3 server (SeaweedFS) did not start: {e}") from None
        self.server.create_bucket(BUCKET)
        self.env = {
            **self.server.env(),
            "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def terminate(self) -> None:
        self.server.stop()

    def wait(self, timeout: float) -> None:
        """Stopped already by ``terminate()``."""


def _start_s3(workdir: Path) -> subprocess.Popen[bytes]:
    """moto's S3 server on a free loopback port, with one bucket; its environment on ``.env``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (workdir / "moto.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                raise SystemExit(f"the S3 server did not start; see {workdir / 'moto.log'}") from None
            time.sleep(0.1)
    import boto3

    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="demo",
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=BUCKET)
    server.env = env  # type: ignore[attr-defined]
    return server


if __name__ == "__main__":
    raise SystemExit(main())
