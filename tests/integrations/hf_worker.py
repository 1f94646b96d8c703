"""A tiny Hugging Face Trainer run for the tests of sdk.integrations.transformers: the subject of test_transformers.

    python hf_worker.py --out DIR [--steps 60] [--save-steps 5] [--sleep 0.05] [--plain]
    torchrun --standalone --nproc_per_node=2 hf_worker.py --out DIR ...

A 2-layer GPT-2 built from a config (nothing downloaded; dropout on, so the RNG matters), a cosine LR schedule
with warm-up, 96 fixed sequences in batches of 4 (24 steps an epoch: a run of 60 crosses two epoch ends). With
``--plain`` the user's Trainer runs as Transformers alone runs it, no podtrain: the uninterrupted reference. Else
it runs through ``podtrain_hf.train`` inside ``sdk.init()``; each rank writes ``DIR/rank-<r>.json`` (the step it
resumed from, the step it ended at, whether it stopped on request) before leaving the block. Final weights: the
export (``PODTRAIN_OUTPUT_DIR/export/model.safetensors``), or ``DIR/final.pt`` with ``--plain``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from tests.integrations import _worker

SEQUENCES, LENGTH, VOCAB = 96, 16, 64


class Sequences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Fixed token sequences; the labels are the inputs (the model shifts them)."""

    def __init__(self, count: int = SEQUENCES) -> None:
        self.tokens = torch.randint(0, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class Slow(TrainerCallback):
    """Sleeps after each step, so that a signal sent from a test lands mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        return control


def build(
    out: Path,
    *,
    steps: int = 60,
    save_steps: int = 5,
    eval_steps: int = 0,
    sleep: float = 0.0,
    callbacks: tuple[TrainerCallback, ...] = (),
    **options: Any,
) -> Trainer:
    """The user's Trainer: ``save_steps`` 0 is ``save_strategy="no"``, ``eval_steps`` 0 no evaluation; ``options``
    override TrainingArguments."""
    torch.set_num_threads(1)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        **{
            "output_dir": str(out / "hf"),
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 5,
            "save_strategy": "steps" if save_steps else "no",
            "save_steps": save_steps or 500,
            "logging_steps": 5,
            "eval_strategy": "steps" if eval_steps else "no",
            "eval_steps": eval_steps or None,
            "per_device_eval_batch_size": 8,
            "report_to": [],
            "disable_tqdm": True,
            "use_cpu": True,
            "seed": 0,
            **options,
        }
    )
    return Trainer(
        model=model,
        args=training,
        train_dataset=Sequences(),
        eval_dataset=Sequences(16) if eval_steps else None,
        callbacks=[*([Slow(sleep)] if sleep else []), *callbacks],
    )


def main() -> None:
    parser = _worker.parser("Transformers", "save_strategy='no'")
    parser.add_argument("--eval-steps", type=int, default=0, help="0: no evaluation")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = build(
        args.out, steps=args.steps, save_steps=args.save_steps, eval_steps=args.eval_steps, sleep=args.sleep
    )
    if args.plain:
        trainer.train()
        _worker.save_final(args.out, trainer.model.state_dict(), trainer.args.process_index)
        return

    import sdk
    from sdk.integrations import transformers as podtrain_hf

    with sdk.init() as run:
        podtrain_hf.train(run, trainer)
        done = trainer.state.global_step
        report = {"start": run.checkpointer.resumed_from or 0, "done": done, "stopped": done < args.steps}
        _worker.write_report(args.out, run.config.rank, report)


if __name__ == "__main__":
    main()
