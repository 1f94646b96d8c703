"""What a podtrain checkpoint of a Hugging Face ``Trainer`` holds, and how a resume hands it back to the Trainer.

The entries given to ``run.checkpoint()``/``run.resume()`` are the model itself and four adapters. The optimizer
and the LR scheduler exist only once ``trainer.train()`` has built them (around ``accelerator.prepare``), so a
resume — which happens before — keeps their states, and the grad scaler's, until the Trainer calls
``on_train_begin`` (:meth:`Entries.apply`); the ``TrainerState`` is saved as the JSON the Trainer itself writes.

The data position and the RNG are the Trainer's own business: it skips the consumed batches of the current epoch
(``global_step`` of the ``TrainerState``) and puts the RNG states back at the first batch after them, reading
``trainer_state.json`` and ``rng_state.pth`` from the folder given as ``resume_from_checkpoint``.
:func:`resume_folder` writes exactly those two files, from the checkpoint podtrain verified and loaded, into a
private temporary folder: what the Trainer resumes from is podtrain's checkpoint, never a ``checkpoint-N``
folder it chose.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdk.errors import StateMismatchError

__all__ = ["Entries", "Later", "TrainerStateEntry", "resume_folder", "rng_file_name"]


class Later:
    """A state entry whose object the Trainer builds inside ``train()``: saved from it, loaded into it later.

    ``load_state_dict`` only keeps the value (the object does not exist yet); :meth:`apply` puts it in once it does.
    An empty value stands for "no such object" (a run without a grad scaler), both ways.
    """

    def __init__(self, name: str, get: Callable[[], Any]) -> None:
        self.name, self._get = name, get
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        obj = self._get()
        return dict(obj.state_dict()) if obj is not None else {}

    def load_state_dict(self, value: dict[str, Any]) -> None:
        self.pending = value

    def apply(self) -> None:
        """Load the kept value into the object the Trainer has now built (nothing kept: nothing to do)."""
        value, self.pending = self.pending, None
        if not value:
            return
        obj = self._get()
        if obj is None:  # e.g. an fp16 GPU checkpoint resumed on a CPU: the scaler's state has nowhere to go
            warnings.warn(
                f"the checkpoint holds a {self.name} state but this Trainer has no {self.name}; it is not restored",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        try:
            obj.load_state_dict(value)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise StateMismatchError(
                f"the checkpoint's {self.name} state does not fit this Trainer's {type(obj).__name__}: {exc}; "
                "resume with the optimizer and scheduler settings the run was started with"
            ) from exc


class TrainerStateEntry:
    """The ``TrainerState`` (global step, epoch, log history, best metric, stateful callbacks) as the Trainer's
    own ``trainer_state.json`` text. Saving first does what the Trainer does before writing it: total the FLOPs
    and record the state of callbacks that export one (``EarlyStoppingCallback``…)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.loaded: str | None = None  # the JSON text of the checkpoint resumed from

    def state_dict(self) -> dict[str, Any]:
        trainer, state = self.trainer, self.trainer.state
        trainer.store_flos()
        from transformers.trainer_callback import ExportableState

        for cb in [*trainer.callback_handler.callbacks, trainer.control]:
            if isinstance(cb, ExportableState):
                name = type(cb).__name__
                if isinstance(state.stateful_callbacks.get(name), list):
                    state.stateful_callbacks[name].append(cb.state())
                else:
                    state.stateful_callbacks[name] = cb.state()
        return {"json": json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"}

    def load_state_dict(self, value: dict[str, Any]) -> None:
        text = value.get("json")
        try:
            doc = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("global_step"), int):
            raise StateMismatchError("the checkpoint's trainer state is not a Transformers TrainerState")
        self.loaded = text

    def reshard_state_dict(self, states: list[dict[str, Any]], *, rank: int, world_size: int) -> dict[str, Any]:
        """Refused: a checkpoint of N ranks resumed on another number. The Trainer counts the data already consumed
        in optimizer steps of ``WORLD_SIZE`` x batch, so on another ``WORLD_SIZE`` it would skip other samples."""
        raise ValueError(
            f"the Trainer's data position counts steps of {len(states)} ranks' batches; resume with "
            f"WORLD_SIZE={len(states)} for an exact continuation"
        )


@dataclasses.dataclass
class Entries:
    """The state given to podtrain for one Trainer: names are what the checkpoint's files are called."""

    trainer: Any
    optimizer: Later
    scheduler: Later
    scaler: Later
    trainer_state: TrainerStateEntry

    @classmethod
    def of(cls, trainer: Any) -> Entries:
        return cls(
            trainer,
            Later("optimizer", lambda: trainer.optimizer),
            Later("LR scheduler", lambda: trainer.lr_scheduler),
            Later("grad scaler", lambda: getattr(trainer.accelerator, "scaler", None)),
            TrainerStateEntry(trainer),
        )

    def state(self) -> dict[str, Any]:
        """What ``run.resume()`` and ``run.checkpoint()`` get: the model (unwrapped) and the adapters."""
        return {
            "model": self.trainer.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "trainer": self.trainer_state,
        }

    def apply(self) -> None:
        """At ``on_train_begin``: the optimizer, scheduler and scaler now exist; put the resumed states in."""
        for later in (self.optimizer, self.scheduler, self.scaler):
            later.apply()


def rng_file_name(world_size: int, process_index: int) -> str:
    """The name the Trainer reads this process's RNG states from (``Trainer._load_rng_state``)."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"


def resume_folder(trainer_state_json: str, *, world_size: int, process_index: int, distributed: bool) -> Path:
    """A new private folder with ``trainer_state.json`` and this process's RNG file, for ``resume_from_checkpoint``.

    Call it right after ``run.resume()``: the RNG states it writes are the ones podtrain just restored from the
    checkpoint, in the layout ``Trainer._save_rng_state`` writes (the Trainer reads them with ``weights_only``).
    The caller removes the folder when ``train()`` returns.
    """
    folder = Path(tempfile.mkdtemp(prefix="podtrain-hf-resume-"))
    (folder / "trainer_state.json").write_text(trainer_state_json, encoding="utf-8")
    rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all() if distributed else torch.cuda.get_rng_state()
    torch.save(rng, folder / rng_file_name(world_size, process_index))
    return folder
