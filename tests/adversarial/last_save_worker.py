"""A ``train.py``-style script for test_last_save: ``with sdk.init() as run`` and ``run.checkpoint()`` every step.

    python last_save_worker.py --steps 10 --every 5 [--hold]

Every step adds 1 to every weight of a small model, so the checkpoint of step N holds ``initial + N``.
``--hold`` makes the first policy save slow, deterministically: the background write is held at a gate (the
script wraps ``run.checkpointer.write``) until the next due save has been deferred behind it; then the gate
opens and the loop ends. The last line printed is JSON: ``{"deferred": <deferred saves>}``.
"""

from __future__ import annotations

import argparse
import json
import threading
from typing import Any

import torch

import sdk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    entered, release = threading.Event(), threading.Event()
    with sdk.init(checkpoint_every_steps=args.every) as run:
        if args.hold:
            write = run.checkpointer.write

            def held(*a: Any, **k: Any) -> Any:
                entered.set()
                if not release.wait(60):
                    raise RuntimeError("the gate never opened")
                return write(*a, **k)

            run.checkpointer.write = held  # type: ignore[method-assign]
        for step in range(1, args.steps + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            run.checkpoint(step, {"model": model})
            if args.hold and step == args.every and not entered.wait(60):
                raise RuntimeError("the first save never started")
            if args.hold and run.deferred_saves:
                release.set()
        release.set()
    print(json.dumps({"deferred": run.deferred_saves}), flush=True)


if __name__ == "__main__":
    main()
