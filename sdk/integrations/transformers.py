"""Hugging Face Transformers' ``Trainer`` under podtrain: verified checkpoints, exact resume, agreed preemption.

    import sdk
    from sdk.integrations import transformers as podtrain_hf

    with sdk.init() as run:
        trainer = Trainer(model=model, args=args, train_dataset=ds)     # the user's own Trainer
        podtrain_hf.train(run, trainer)    # resumes from the newest verified checkpoint, trains, stops on SIGTERM

What :func:`train` changes in the Trainer, for the duration of the call only:

* **Where checkpoints go.** The Trainer's own save point (after the step's logging and evaluation, where it would
  write ``checkpoint-N``) saves through ``run.checkpoint()`` instead: committed manifest, CRC32C, fencing,
  retention, asynchronous. Nothing is written to ``args.output_dir``. *When*: the Trainer's ``save_strategy`` /
  ``save_steps``; with ``PODTRAIN_CHECKPOINT_EVERY_STEPS``/``_SECONDS`` set, podtrain's policy too (either one
  due saves). The save point is the Trainer's because that is where the Trainer's own resume expects the RNG to
  have been captured: an evaluation draws from torch's global RNG (its DataLoader's seed), so a capture before
  it would resume a different random stream.
* **Where a resume comes from.** ``run.resume()`` loads the newest *verified* podtrain checkpoint (damaged or
  uncommitted ones skipped) into the model, then the Trainer's own resume path runs from a private folder holding
  only that checkpoint's ``trainer_state.json`` and RNG states (:mod:`sdk.integrations._hfstate`): the Trainer
  skips the consumed batches and restores the RNG where it always does. The optimizer, LR scheduler and grad
  scaler get their states at ``on_train_begin``, once the Trainer has built them. ``get_last_checkpoint()`` and
  ``checkpoint-N`` folders are never consulted.
* **How it stops.** A callback asks ``run.should_stop()`` at every optimizer step (agreed across ranks, so every
  rank stops at the same step; ``sdk.testing.init(preempt_at=N)`` works as with a hand-written loop); on a stop
  it makes that step a save point and sets
  ``control.should_training_stop``: the Trainer finishes the step, the step's checkpoint is taken, the loop ends
  the Trainer's way. Leaving ``with sdk.init()`` then waits for that commit (within the grace period) and exits 75.

The two Trainer methods replaced on this one Trainer object (``_save_checkpoint``, and ``_load_from_checkpoint``
as a no-op since the model is already loaded) are put back when :func:`train` returns. When training completes,
rank 0 exports the model: ``PODTRAIN_OUTPUT_DIR/export/model.safetensors`` with its ``config.json``, pushed and
verified (``run.export``); ``from_pretrained`` loads that folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import transformers
from transformers import Trainer, TrainerCallback

from sdk.errors import ConfigError
from sdk.integrations._hfstate import Entries, resume_folder
from sdk.run import Run

__all__ = ["train"]

_SEAMS = ("_save_checkpoint", "_load_from_checkpoint")  # the Trainer's save and model-load points


def train(
    run: Run,
    trainer: Trainer,
    *,
    ignore_keys_for_eval: list[str] | None = None,
    export: bool = True,
    resume_from_checkpoint: Any = None,
    trial: Any = None,
) -> Any:
    """Resume ``trainer`` from the newest verified checkpoint of ``run``, train it, and return its ``TrainOutput``.

    On a stop signal the Trainer stops after the step every rank agreed on, that step is checkpointed, and this
    returns; leaving ``with sdk.init()`` then exits 75. When training completes and ``export`` is true, rank 0
    exports the model with its config. ``resume_from_checkpoint`` and ``trial`` exist only to be refused with the
    reason: podtrain decides what to resume from, and one run is one trial.
    """
    _refuse(run, trainer, resume_from_checkpoint=resume_from_checkpoint, trial=trial)
    entries = Entries.of(trainer)
    state = entries.state()
    start = run.resume(state)
    folder = None
    if start:
        assert entries.trainer_state.loaded is not None  # a resume loads every entry of `state`
        args = trainer.args
        folder = resume_folder(
            entries.trainer_state.loaded,
            world_size=args.world_size,
            process_index=args.process_index,
            distributed=run.config.world_size > 1,
        )
    callback = _Callback(run, entries, state)
    try:
        with _routed(trainer, callback):
            output = trainer.train(
                resume_from_checkpoint=str(folder) if folder else None, ignore_keys_for_eval=ignore_keys_for_eval
            )
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    step = trainer.state.global_step
    if step > start and callback.given != step:
        # The Trainer ended at a step that was no save point (an early stop between saves; a stop whose save the
        # Trainer's own verdict cancelled, as save_strategy="best" does): give it to podtrain now, so the end of
        # the block commits this step and never the live state under an older step's number.
        run.checkpoint(step, state, force=callback.stopping)
    if callback.stopping:
        return output
    if export and run.config.rank == 0:
        _export(run, trainer.model, step=step)
    return output


class _Callback(TrainerCallback):
    """Decides, at each optimizer step, whether this step is a save point and whether training stops here.

    ``on_step_end`` runs after the Trainer's ``DefaultFlowCallback`` has set ``control.should_save`` by its own
    cadence. It asks ``run.should_checkpoint(step)`` (podtrain's policy, when one is set; the call is also how
    ``sdk.testing.init(preempt_at=N)`` learns the step) and ``run.should_stop()`` (every rank, every step: the
    agreement counts calls), and makes the step a save point for a stop or a policy save. The save itself
    (:meth:`save`) runs where the Trainer saves.
    """

    def __init__(self, run: Run, entries: Entries, state: dict[str, Any]) -> None:
        self.run, self.entries, self.state = run, entries, state
        config = run.config
        self.policy = config.checkpoint_every_steps is not None or config.checkpoint_every_seconds is not None
        self.policy_due = False  # podtrain's policy asks for a save at this step
        self.stopping = False
        self.given: int | None = None  # the last step given to run.checkpoint()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.entries.apply()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.policy_due = self.run.should_checkpoint(state.global_step) and self.policy
        if self.run.should_stop():
            self.stopping = True
            control.should_training_stop = True
        if self.stopping or self.policy_due:
            control.should_save = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.stopping:  # stopped mid-epoch: no epoch-end evaluation or save inside the grace period
            control.should_evaluate = control.should_save = False
        return control

    def save(self, model: Any = None, trial: Any = None) -> None:
        """In place of ``Trainer._save_checkpoint``: give this step to podtrain (a step already given is skipped:
        an epoch's end right after its last step's save).

        Called for a stop, a policy save, or the Trainer's own cadence (``save_steps``, an epoch's end, a new best
        metric). A stop waits for a save in flight and saves; so does the Trainer's cadence when podtrain's policy
        would not save this step; otherwise ``run.checkpoint`` saves, or defers behind a save still in flight.
        """
        step = self.entries.trainer.state.global_step
        if step == self.given:
            return
        self.given = step
        force = self.stopping or (self.policy and not self.policy_due)
        self.run.checkpoint(step, self.state, force=force, meta={"emergency": True} if self.stopping else None)
        self.policy_due = False


def _export(run: Run, model: Any, *, step: int) -> None:
    """``PODTRAIN_OUTPUT_DIR/export/``: ``model.safetensors`` and ``config.json`` (a folder ``from_pretrained``
    loads), and podtrain's ``model.json`` sidecar; pushed to ``PODTRAIN_ARTIFACT_URI/<run_id>/export``."""
    config = getattr(model, "config", None)
    if config is not None:
        folder = Path(run.config.output_dir) / "export"
        folder.mkdir(parents=True, exist_ok=True)
        config.to_json_file(str(folder / "config.json"))
    run.export(model, step=step, framework=f"transformers {transformers.__version__}", model_class=type(model).__name__)


@contextmanager
def _routed(trainer: Trainer, callback: _Callback) -> Iterator[None]:
    """The Trainer's save point to podtrain, its model load a no-op (podtrain loaded it), the callback in; undone
    on the way out."""
    trainer._save_checkpoint = callback.save  # type: ignore[method-assign]
    trainer._load_from_checkpoint = _model_already_loaded  # type: ignore[method-assign]
    trainer.add_callback(callback)
    try:
        yield
    finally:
        trainer.remove_callback(callback)
        for name in _SEAMS:
            trainer.__dict__.pop(name, None)


def _model_already_loaded(resume_from_checkpoint: str, model: Any = None) -> None:
    """In place of ``Trainer._load_from_checkpoint``: ``run.resume()`` has put the weights in already."""


def _refuse(run: Run, trainer: Trainer, *, resume_from_checkpoint: Any, trial: Any) -> None:
    """One line, what to change, for what cannot be resumed exactly or would bypass podtrain."""
    args = trainer.args
    problem = None
    missing = [name for name in _SEAMS if not callable(getattr(trainer, name, None))]
    if missing:
        problem = (
            f"transformers {transformers.__version__} has no Trainer.{missing[0]}: install the version "
            "podtrain[transformers] pins"
        )
    elif resume_from_checkpoint not in (None, False):
        problem = (
            "drop resume_from_checkpoint: podtrain_hf.train() resumes from the newest verified podtrain checkpoint "
            "itself (Transformers' checkpoint-N folders are not checked for completeness)"
        )
    elif trial is not None:
        problem = "hyperparameter search is not supported under podtrain: run one trial per podtrain run"
    elif args.save_only_model:
        problem = (
            "unset save_only_model: a checkpoint without optimizer, scheduler and RNG states cannot resume exactly"
        )
    elif args.load_best_model_at_end:
        problem = (
            "unset load_best_model_at_end: it reloads Transformers' checkpoint-N folders, which podtrain replaces "
            "with its own checkpoints"
        )
    elif getattr(args, "enable_jit_checkpoint", False):
        problem = "unset enable_jit_checkpoint: podtrain handles SIGTERM (agreed across ranks, committed in time)"
    elif trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        problem = (
            "DeepSpeed and FSDP through accelerate are not supported by podtrain_hf yet (their optimizer state is "
            "sharded outside optimizer.state_dict()): train with DDP, or with your own loop and sdk.Run"
        )
    elif args.world_size != run.config.world_size:
        problem = (
            f"TrainingArguments sees {args.world_size} processes but WORLD_SIZE={run.config.world_size}: start "
            "every rank the same way (torchrun under podtrain run)"
        )
    if problem:
        raise ConfigError(problem)
