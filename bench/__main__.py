"""``python -m bench``: checkpoint save/resume (:mod:`bench.checkpoint`), then async stalls (:mod:`bench.stall`)."""

from __future__ import annotations

import argparse
import sys

from bench import checkpoint, stall

SUITES = {"checkpoint": checkpoint.main, "stall": stall.main}
DEFAULT_REPEAT = {"checkpoint": 3, "stall": stall.DEFAULT_REPEAT}  # stall: ~2 min per repetition at 1 GiB here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="podtrain's benchmarks, as ratios against baselines measured in the same run: "
        "checkpoint save/resume against boto3 (bench.checkpoint), then the training stall of asynchronous "
        "checkpoints (bench.stall).",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the model state (default 1024)")
    parser.add_argument(
        "--repeat", type=int, help="repetitions of each case; median (default 3 for checkpoint, 2 for stall)"
    )
    parser.add_argument("--only", choices=sorted(SUITES), help="run one suite (default: both, in turn)")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or (args.repeat is not None and args.repeat < 1):
        parser.error("--size-mib and --repeat must be at least 1")
    status = 0
    for name, suite in SUITES.items():
        if args.only in (None, name):
            repeat = DEFAULT_REPEAT[name] if args.repeat is None else args.repeat
            status = suite(["--size-mib", str(args.size_mib), "--repeat", str(repeat)]) or status
            print(flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
