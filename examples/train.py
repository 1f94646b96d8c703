"""Train a tiny character-level transformer with podtrain: pull the data, resume, checkpoint, stop when asked, export.

This is the file to copy. Everything podtrain-specific goes through ``import sdk``; the rest is plain PyTorch.

    python examples/dataset.py --out /tmp/bucket/data                 # make a small corpus ("the bucket")
    export PODTRAIN_DATA_URI=file:///tmp/bucket/data PODTRAIN_CHECKPOINT_URI=file:///tmp/bucket/ckpt
    podtrain run -- python examples/train.py                          # pulls, trains, exports; ~1 min on 2 cores
    podtrain run -- torchrun --nproc_per_node=2 examples/train.py     # data-parallel (gloo on CPU, NCCL on GPU)
    python examples/train.py --data /tmp/bucket/data --steps 100      # read a local folder, no pull

The data is every ``shard-*.txt`` file of the dataset, read as bytes (one token per byte). With
``PODTRAIN_DATA_URI`` set, ``run.pull_data()`` fetches it into ``PODTRAIN_DATA_DIR`` (under ``podtrain run``
the supervisor already did, so nothing is fetched again); ``--data DIR`` reads a local folder instead.

On a stop signal (SIGTERM from the kubelet) the loop breaks; leaving the ``with sdk.init()`` block commits the
current step and exits with 75, and the next attempt resumes from it. On CPU the same seed gives bitwise the same
weights whether or not the run was interrupted (keep ``--threads`` and the number of processes the same). The
final weights go to ``PODTRAIN_OUTPUT_DIR/export/model.safetensors``. Rank 0 prints the loss every
``--log-every`` steps and, last, one line of JSON: ``{"event": "train.done", ...}`` (``train.stopped`` when
preempted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import sdk

VOCAB = 256  # one token per byte: no tokenizer to ship or to version


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="optimizer steps in the whole run (default 500)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step and process (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints (default: PODTRAIN_CHECKPOINT_EVERY_STEPS/_SECONDS when set, else 50)",
    )
    p.add_argument("--log-every", type=int, default=50, help="steps between loss lines and metrics (default 50)")
    p.add_argument("--context", type=int, default=64, help="characters of context (default 64)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--data", type=Path, default=None, help="read shards from this local folder, pull nothing")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: cores / processes)")
    return p.parse_args(argv)


# -- data ------------------------------------------------------------------------------------------------------
def read_tokens(folder: Path) -> torch.Tensor:
    """All ``shard-*.txt`` files of ``folder``, in name order, as one tensor of bytes."""
    shards = sorted(folder.glob("shard-*.txt"))
    if not shards:
        raise sdk.errors.ConfigError(
            f"no shard-*.txt files in {folder}: point PODTRAIN_DATA_URI (or --data) at a folder that "
            "examples/dataset.py wrote"
        )
    return torch.frombuffer(bytearray(b"".join(s.read_bytes() for s in shards)), dtype=torch.uint8)


class Windows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style dataset: window ``i`` is ``context + 1`` bytes; the input is the first ``context``, the target
    the same shifted by one. Windows start every ``context`` bytes, so each byte is a target once per epoch."""

    def __init__(self, tokens: torch.Tensor, context: int) -> None:
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[i * self.context : (i + 1) * self.context + 1].long()
        return chunk[:-1], chunk[1:]


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Nats per byte of a model that knows only letter frequencies: the loss to beat."""
    p = torch.bincount(tokens.long(), minlength=VOCAB).double() / len(tokens)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


# -- model -----------------------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    """A GPT-style decoder: byte and position embeddings, pre-norm transformer layers with a causal mask."""

    mask: torch.Tensor

    def __init__(self, context: int, d_model: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        # -inf above the diagonal: position t sees only positions <= t. Not saved with the weights.
        mask = nn.Transformer.generate_square_subsequent_mask(context)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.position(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def warmup_cosine(steps: int, warmup: int) -> Any:
    """LR factor: linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- training --------------------------------------------------------------------------------------------------
class Where(NamedTuple):
    """This process's place: its device and, under torchrun, its ranks (one process: 0, 0, 1)."""

    device: torch.device
    rank: int
    local_rank: int
    world: int

    def say(self, text: str) -> None:
        """Print on rank 0 only (every rank computes the same numbers)."""
        if self.rank == 0:
            print(text, flush=True)


def setup(args: argparse.Namespace) -> Where:
    """Pick the device, set CPU threads and determinism, join the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # RANK, WORLD_SIZE, LOCAL_RANK…: set by torchrun
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # The machine's cores shared among its processes. Bitwise reproducibility across machines needs the
        # same thread count on each: pass --threads then.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // local_world))
        torch.use_deterministic_algorithms(True)  # raises on an op with no deterministic CPU kernel
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # address and port: from torchrun
    return Where(device, rank, local_rank, world)


def load_data(run: sdk.Run, args: argparse.Namespace, where: Where) -> torch.Tensor:
    """The dataset's bytes: pulled through the SDK from PODTRAIN_DATA_URI into PODTRAIN_DATA_DIR (verified,
    cached: under `podtrain run` the supervisor pulled it already and nothing is fetched), or read from --data."""
    if args.data is not None:
        return read_tokens(args.data)
    if not run.config.data_uri:
        raise sdk.errors.ConfigError(  # leaving sdk.init() with a ConfigError exits 2: "fix me, don't retry"
            "PODTRAIN_DATA_URI is unset: set it to the dataset's URL (e.g. file:///tmp/bucket/data, written by "
            "examples/dataset.py), or pass --data DIR to read a local folder"
        )
    if where.local_rank == 0:  # one pull per machine; its other ranks wait for it
        pulled = run.pull_data()
        where.say(
            f"data: {pulled.files} files in {run.config.data_dir} ({pulled.fetched} fetched now, {pulled.skipped} "
            "already there: under `podtrain run` the supervisor pulled them before starting this script)"
        )
    if where.world > 1:
        dist.barrier()
    return read_tokens(Path(run.config.data_dir))


def make_loader(dataset: Windows, args: argparse.Namespace, where: Where) -> sdk.ResumableLoader:
    """Shuffled by a seeded DistributedSampler (one process is rank 0 of 1), so an epoch's order can be replayed and
    each rank reads its own part.

    ResumableLoader keeps the position (epoch, batch, generator states) in the checkpoint, so a resume continues
    mid-epoch with exactly the batches the interrupted run would have seen — and, since the sampler is a
    DistributedSampler even on one process, a retry on another number of GPUs finishes the epoch with every window
    seen once.
    """
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, where.world, where.rank, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
        pin_memory=where.device.type == "cuda",
    )
    return sdk.ResumableLoader(loader)


def build(args: argparse.Namespace, where: Where) -> tuple[nn.Module, nn.Module, Any, Any, torch.amp.GradScaler]:
    """The model (and its DDP wrapper under torchrun), AdamW, the LR schedule, and a GradScaler for fp16 on CUDA
    (disabled on CPU, where it then does nothing)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = TinyTransformer(args.context, args.d_model, args.heads, args.layers, args.dropout).to(where.device)
    net: nn.Module = model
    if where.world > 1:
        net = DistributedDataParallel(model, device_ids=[where.local_rank] if where.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps, max(1, args.steps // 10)))
    return model, net, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=where.device.type == "cuda")


class LossWindow:
    """The mean loss since the last report, summed on the device (no sync per step), averaged over ranks."""

    def __init__(self, where: Where) -> None:
        self.where, self.total, self.steps = where, torch.zeros((), device=where.device), 0
        self.since = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.steps += 1

    def mean(self) -> tuple[float, float]:
        """(mean loss, ms per step) of the window, then start a new one. Every rank must call it at once."""
        if self.where.world > 1:
            dist.all_reduce(self.total)
        now = time.perf_counter()
        mean = self.total.item() / self.steps / self.where.world
        ms = 1000 * (now - self.since) / self.steps
        self.total.zero_()
        self.steps, self.since = 0, now
        return mean, ms


class ScalerState:
    """The GradScaler's state in checkpoints on any device: empty on CPU (the scaler is off there), and a CUDA
    run resuming a CPU checkpoint (or the reverse) starts its scaler fresh instead of failing."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def checkpoint_every(args: argparse.Namespace) -> int | None:
    """--checkpoint-every; else the PODTRAIN_CHECKPOINT_EVERY_* policy when one is set; else 50 steps."""
    if args.checkpoint_every is not None:
        return int(args.checkpoint_every)
    policy_set = any(os.environ.get(f"PODTRAIN_CHECKPOINT_EVERY_{unit}") for unit in ("STEPS", "SECONDS"))
    return None if policy_set else 50


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = setup(args)
    try:
        # Config from PODTRAIN_* (arguments win), logs, stop-signal handlers. Leaving the block after a stop
        # signal commits the newest step given to run.checkpoint() and exits with 75: "retry me".
        with sdk.init(checkpoint_every_steps=checkpoint_every(args)) as run:
            train(run, args, where)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def train(run: sdk.Run, args: argparse.Namespace, where: Where) -> None:
    tokens = load_data(run, args, where)
    dataset, entropy = Windows(tokens, args.context), unigram_entropy(tokens)
    where.say(
        f"data: {len(tokens):,} bytes, {len(dataset):,} windows of {args.context + 1}; unigram entropy "
        f"{entropy:.3f} nats/char (the loss of a model that knows only letter frequencies)"
    )
    loader = make_loader(dataset, args, where)

    model, net, optimizer, scheduler, scaler = build(args, where)
    amp = scaler.is_enabled()

    # Resume: everything with state_dict()/load_state_dict() goes in (the unwrapped model, not DDP's wrapper);
    # RNG states are saved without asking. 0: nothing to resume, a fresh start.
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "loader": loader,
        "scaler": ScalerState(scaler),
    }
    start = run.resume(state)
    where.say(
        f"{f'resumed at step {start}' if start else 'fresh start'}; training to step {args.steps} on "
        f"{where.device.type} x{where.world}, {sum(p.numel() for p in model.parameters()):,} parameters"
    )

    batches = loader.batches()  # batches without end, epoch after epoch, from the restored position
    window = LossWindow(where)
    first_loss = final_loss = None
    began = time.perf_counter()
    done, stopped = start, False  # steps completed
    model.train()
    for step in range(start, args.steps):
        x, y = (t.to(where.device, non_blocking=True) for t in next(batches))
        with torch.autocast(where.device.type, dtype=torch.float16, enabled=amp):
            logits = net(x)
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        window.add(loss)
        first_loss = loss.item() if first_loss is None else first_loss
        done = step + 1

        # By policy (every --checkpoint-every steps). Asynchronous: a copy into reused CPU buffers, then the
        # write and commit in the background. Every call also records what an emergency save would commit.
        run.checkpoint(done, state)

        if done % args.log_every == 0 or done == args.steps:
            final_loss, ms = window.mean()
            lr = scheduler.get_last_lr()[0]
            where.say(f"step {done:>5}/{args.steps}  loss {final_loss:.4f}  lr {lr:.2e}  {ms:.1f} ms/step")
            if where.rank == 0:
                run.log_metrics(done, loss=final_loss, lr=lr, ms_per_step=ms)  # PODTRAIN_OUTPUT_DIR/metrics.jsonl

        if run.should_stop():  # a stop signal (agreed: every rank stops at the same step)
            stopped = True
            break

    summary: dict[str, Any] = {
        "event": "train.stopped" if stopped else "train.done",
        "start_step": start,
        "end_step": done,
        "steps": args.steps,
        "first_loss": first_loss,
        "final_loss": final_loss,
        "unigram_entropy": entropy,
        "seconds": round(time.perf_counter() - began, 3),
        "device": where.device.type,
        "world_size": where.world,
    }
    if not stopped and where.rank == 0:
        # The final weights as PODTRAIN_OUTPUT_DIR/export/model.safetensors with a JSON sidecar, pushed to and
        # verified under PODTRAIN_ARTIFACT_URI/<run_id>/export. One rank is enough: the weights are the same.
        run.export(model, step=done, final_loss=final_loss, seed=args.seed)
        summary["export"] = str(Path(run.config.output_dir) / "export" / "model.safetensors")
    where.say(json.dumps(summary))


if __name__ == "__main__":
    raise SystemExit(main())
