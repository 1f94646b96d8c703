"""``python -m bench``: checkpoint save/resume (:mod:`bench.checkpoint`), async stalls (:mod:`bench.stall`), the
cross-rank stop agreement (:mod:`bench.agreement`), dataset pull / artifact push against ``aws s3 sync``
(:mod:`bench.transfer`), sharded checkpoints on several ranks against torch.distributed.checkpoint
(:mod:`bench.sharded`), and what a preemption of one pod of two costs (:mod:`bench.multinode`)."""

from __future__ import annotations

import argparse
import sys

from bench import agreement, checkpoint, multinode, sharded, stall, transfer


def _agreement(argv: list[str]) -> int:
    """The agreement suite has no state size: --repeat sets its blocks (4 per repetition)."""
    repeat = int(argv[argv.index("--repeat") + 1])
    return agreement.main(["--blocks", str(4 * repeat)])


SUITES = {
    "checkpoint": checkpoint.main,
    "stall": stall.main,
    "agreement": _agreement,
    "transfer": transfer.main,
    "sharded": sharded.main,
    "multinode": multinode.main,
}
S3_SUITES = {"checkpoint", "stall", "transfer", "sharded"}  # those that start an S3 server
DEFAULT_REPEAT = {  # stall: ~2 min/rep at 1 GiB; transfer: ~2.5 min/rep at 1.5 GiB; sharded: see bench/README.md
    "checkpoint": 3,
    "stall": stall.DEFAULT_REPEAT,
    "agreement": 3,
    "transfer": transfer.DEFAULT_REPEAT,
    "sharded": sharded.DEFAULT_REPEAT,
    "multinode": 1,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="podtrain's benchmarks, as ratios against baselines measured in the same run: "
        "checkpoint save/resume against boto3 (bench.checkpoint), then the training stall of asynchronous "
        "checkpoints (bench.stall), then the cost of the cross-rank stop agreement (bench.agreement), then dataset "
        "pull and artifact push against aws s3 sync (bench.transfer; --size-mib 1024 is a 1.5 GiB dataset), then "
        "sharded checkpoints on 4 and 2 ranks against torch.distributed.checkpoint (bench.sharded), then a preemption "
        "of one pod of two (bench.multinode).",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the model state (default 1024)")
    parser.add_argument(
        "--repeat",
        type=int,
        help="repetitions of each case; median (default: checkpoint 3, stall 2, agreement 3, transfer 2, sharded 2, "
        "multinode 1)",
    )
    parser.add_argument("--only", choices=sorted(SUITES), help="run one suite (default: all, in turn)")
    parser.add_argument(
        "--s3-server",
        choices=checkpoint.S3_SERVERS,
        default="moto",
        help="the S3 server the checkpoint, stall, transfer and sharded suites use (default moto; seaweedfs: a real "
        "object store, whose ranged GETs read only the range)",
    )
    args = parser.parse_args(argv)
    if args.size_mib < 1 or (args.repeat is not None and args.repeat < 1):
        parser.error("--size-mib and --repeat must be at least 1")
    status = 0
    for name, suite in SUITES.items():
        if args.only in (None, name):
            repeat = DEFAULT_REPEAT[name] if args.repeat is None else args.repeat
            server = ["--s3-server", args.s3_server] if name in S3_SUITES else []
            status = suite(["--size-mib", str(args.size_mib), "--repeat", str(repeat), *server]) or status
            print(flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
