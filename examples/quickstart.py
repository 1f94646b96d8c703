"""A small, real flow of what podtrain does today: train, checkpoint, get interrupted, verify, resume exactly.

    python examples/quickstart.py                 # the whole demo (what `make demo` runs)
    python examples/quickstart.py train --steps 60  # just the training script, configured by PODTRAIN_*

The training part is an ordinary ``train.py``: it uses only ``import sdk``. The demo part runs it three times
in fresh processes — interrupted after step 35, resumed, and once uninterrupted for reference — against a
``file://`` "bucket" in a local folder, lists and verifies the checkpoints with the ``podtrain`` command, and
checks that the resumed run's final weights equal the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# -- the training script ------------------------------------------------------------------------------------
def train(steps: int, stop_at: int | None, every: int, seed: int, report: Path | None) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import sdk

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    # A deterministic toy task: classify points by which side of a few random planes they fall on.
    features = torch.randn(2048, 16, generator=torch.Generator().manual_seed(1234))
    labels = (features @ torch.randn(16, 4, generator=torch.Generator().manual_seed(5))).argmax(dim=1)
    loader = sdk.ResumableLoader(
        DataLoader(
            TensorDataset(features, labels), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
    )
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=25, gamma=0.5)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}

    losses: list[float] = []
    with sdk.init(checkpoint_every_steps=every) as run:
        start = run.resume(state)
        batches = _forever(loader)
        for step in range(start, steps):
            x, y = next(batches)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            run.checkpoint(step + 1, state)
            if stop_at is not None and step + 1 == stop_at:
                break  # the pod "vanishes" here: whatever was not checkpointed is lost
            if run.should_stop():  # SIGTERM: leaving the block commits this step if it fits, then exits 75
                break
    if report:
        report.write_text(
            json.dumps(
                {
                    "start": start,
                    "end": step + 1,
                    "first_loss": losses[0] if losses else None,
                    "last_loss": losses[-1] if losses else None,
                    "save_seconds": run.checkpointer.last_save_seconds,
                }
            )
        )
        torch.save(model.state_dict(), report.with_suffix(".weights.pt"))


def _forever(loader):  # type: ignore[no-untyped-def]
    """Batches across epochs; after a resume the first epoch is the rest of the interrupted one."""
    while True:
        yield from loader


# -- the demo around it -------------------------------------------------------------------------------------
def demo(workdir: Path, steps: int, stop_at: int, every: int) -> int:
    import torch

    shutil.rmtree(workdir, ignore_errors=True)
    bucket = workdir / "bucket"
    env = {**os.environ, "PODTRAIN_RUN_ID": "demo", "PODTRAIN_LOG_FORMAT": "json", "PODTRAIN_LOG_LEVEL": "warning"}
    podtrain = [sys.executable, "-m", "entrypoint"]

    def attempt(name: str, uri: str, n: int, stop: int | None) -> dict:
        report = workdir / f"{name}.json"
        cmd = [sys.executable, str(HERE), "train", "--steps", str(steps), "--every", str(every)]
        cmd += ["--report", str(report)]
        if stop is not None:
            cmd += ["--stop-at", str(stop)]
        began = time.perf_counter()
        subprocess.run(cmd, env={**env, "PODTRAIN_CHECKPOINT_URI": uri, "PODTRAIN_ATTEMPT": str(n)}, check=True)
        result = json.loads(report.read_text())
        print(
            f"  {name}: steps {result['start']}→{result['end']} in {time.perf_counter() - began:.1f}s, "
            f"loss {result['first_loss']:.3f}→{result['last_loss']:.3f}"
        )
        return result

    uri = f"file://{bucket}/demo"
    print(f"1) train, checkpoint every {every} steps to {uri}, and stop abruptly after step {stop_at}")
    first = attempt("attempt-1", uri, 1, stop_at)
    print("2) what is in the bucket (podtrain checkpoints list / verify):")
    subprocess.run([*podtrain, "checkpoints", "list", uri], env=env, check=True)
    subprocess.run([*podtrain, "checkpoints", "verify", uri], env=env, check=True)
    print("3) a fresh process resumes from the newest verified checkpoint and finishes")
    second = attempt("attempt-2", uri, 2, None)
    print("4) an uninterrupted run, for reference")
    attempt("reference", f"file://{bucket}/reference", 1, None)

    resumed = torch.load(workdir / "attempt-2.weights.pt", weights_only=True)
    reference = torch.load(workdir / "reference.weights.pt", weights_only=True)
    equal = all(torch.equal(resumed[k], reference[k]) for k in reference)
    print("\nsummary")
    print(
        f"  steps: {steps}; interrupted after {first['end']}, resumed from {second['start']} "
        f"({first['end'] - second['start']} steps lost to the interruption)"
    )
    print(f"  final loss {second['last_loss']:.4f}; last checkpoint save took {second['save_seconds']:.3f}s")
    print(f"  checkpoints: {uri}")
    print(f"  resumed weights == uninterrupted weights, bitwise: {equal}")
    return 0 if equal else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["demo", "train"], default="demo")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--stop-at", type=int, default=None, help="train: exit abruptly after this step")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=None, help="train: write a JSON summary here")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="demo: where the local bucket goes")
    args = parser.parse_args()
    if args.mode == "train":
        train(args.steps, args.stop_at, args.every, args.seed, args.report)
        return 0
    return demo(args.workdir.resolve(), args.steps, args.stop_at or 75, args.every)


if __name__ == "__main__":
    raise SystemExit(main())
