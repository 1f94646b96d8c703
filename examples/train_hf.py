"""Train a small GPT-2 with the Hugging Face ``Trainer`` under podtrain: resume, checkpoint, stop when asked, export.

The Trainer is the user's own, unchanged; podtrain enters through one call, ``podtrain_hf.train(run, trainer)``:

    python examples/dataset.py --out /tmp/bucket/data                 # make a small corpus ("the bucket")
    export PODTRAIN_DATA_URI=file:///tmp/bucket/data PODTRAIN_CHECKPOINT_URI=file:///tmp/bucket/ckpt-hf
    podtrain run -- python examples/train_hf.py                       # pulls, trains, exports
    podtrain run -- torchrun --nproc_per_node=2 examples/train_hf.py  # data-parallel (gloo on CPU, NCCL on GPU)
    python examples/train_hf.py --data /tmp/bucket/data --steps 100   # read a local folder, no pull

Needs ``pip install 'podtrain[transformers]'``. The model is built from a config (nothing is downloaded): a
GPT-2 over bytes (one token per byte, as examples/train.py). Checkpoints are taken at the Trainer's own cadence
(``--save-steps``) and, when ``PODTRAIN_CHECKPOINT_EVERY_STEPS``/``_SECONDS`` is set, by podtrain's policy too;
they go to ``PODTRAIN_CHECKPOINT_URI`` through podtrain (verified, committed, fenced) and never to
``checkpoint-N`` folders. A SIGTERM stops the Trainer after the step every rank agreed on, commits that step and
exits 75; the next attempt resumes from the newest verified checkpoint, the consumed batches skipped. When the
run completes, ``PODTRAIN_OUTPUT_DIR/export/`` holds ``model.safetensors`` and ``config.json``:
``GPT2LMHeadModel.from_pretrained`` loads that folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import sdk
from sdk.integrations import transformers as podtrain_hf

VOCAB = 256  # one token per byte


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in the whole run (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step and process (default 16)")
    p.add_argument("--save-steps", type=int, default=50, help="the Trainer's save cadence (default 50)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, default=64, help="bytes per sequence (default 64)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--data", type=Path, default=None, help="read shards from this local folder, pull nothing")
    return p.parse_args(argv)


class Windows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequence ``i``: ``context`` bytes from ``i * context``; the labels are the inputs (GPT-2 shifts them)."""

    def __init__(self, tokens: torch.Tensor, context: int) -> None:
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return len(self.tokens) // self.context

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = self.tokens[i * self.context : (i + 1) * self.context].long()
        return {"input_ids": chunk, "labels": chunk}


def read_tokens(run: sdk.Run, args: argparse.Namespace) -> torch.Tensor:
    """The corpus's bytes: ``--data``, or PODTRAIN_DATA_URI pulled into PODTRAIN_DATA_DIR (under ``podtrain run``
    the supervisor pulled it already, and nothing is fetched again)."""
    folder = args.data
    if folder is None:
        if not run.config.data_uri:
            raise sdk.errors.ConfigError(
                "PODTRAIN_DATA_URI is unset: set it to the dataset's URL (e.g. file:///tmp/bucket/data, written by "
                "examples/dataset.py), or pass --data DIR"
            )
        run.pull_data()
        folder = Path(run.config.data_dir)
    shards = sorted(Path(folder).glob("shard-*.txt"))
    if not shards:
        raise sdk.errors.ConfigError(f"no shard-*.txt files in {folder}: write them with examples/dataset.py")
    return torch.frombuffer(bytearray(b"".join(s.read_bytes() for s in shards)), dtype=torch.uint8)


def build(run: sdk.Run, args: argparse.Namespace) -> Trainer:
    """The user's Trainer, as it would be without podtrain (only output_dir points into podtrain's output)."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=args.context,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    cuda = torch.cuda.is_available()
    training = TrainingArguments(
        output_dir=str(Path(run.config.output_dir) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=max(1, args.save_steps // 2),
        fp16=cuda,  # on a GPU the grad scaler's state is checkpointed too
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    with training.main_process_first(local=True):  # one pull per machine under torchrun; the other ranks wait
        tokens = read_tokens(run, args)
    return Trainer(model=model, args=training, train_dataset=Windows(tokens, args.context))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with sdk.init() as run:  # leaving the block after a stop signal commits the step and exits 75
        trainer = build(run, args)
        output = podtrain_hf.train(run, trainer)  # resume, train, checkpoint, stop on SIGTERM, export
        if run.config.rank == 0:
            state = trainer.state
            print(json.dumps({"event": "train.end", "step": state.global_step, "of": args.steps, **output.metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
