"""podtrain_hf.train in one process: exact resume at every kind of stop, damage, cadence, export, refusals.

Each run is the real Transformers Trainer (a 2-layer GPT-2 built from a config, dropout on, cosine schedule with
warm-up, 24 steps an epoch) on the real Checkpointer with a local store, opened with ``sdk.testing.init``: a stop is
requested at a chosen step (``preempt_at``), the block ends with ``SystemExit(75)`` as after a SIGTERM, and a new
Trainer resumes from the store. The reference is the same Trainer run by Transformers alone, uninterrupted.
The real signal, ``podtrain run`` and two ranks are in test_transformers_processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, TrainerCallback

from sdk import testing
from sdk.integrations import transformers as podtrain_hf
from tests.integrations import hf_worker

REPO = Path(__file__).resolve().parents[2]


def weights(trainer_or_model: Any) -> dict[str, torch.Tensor]:
    model = getattr(trainer_or_model, "model", trainer_or_model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain(tmp: Path, **options: Any) -> dict[str, torch.Tensor]:
    """The uninterrupted reference: the same Trainer, Transformers alone."""
    trainer = hf_worker.build(tmp, **options)
    trainer.train()
    return weights(trainer)


def attempt(
    root: Path, *, stop_at: int | None = None, sync: bool = False, **options: Any
) -> tuple[int | None, Any, Any]:
    """One attempt through podtrain_hf.train, stopped as by a SIGTERM during step ``stop_at`` (sdk.testing learns
    the step from the run.should_checkpoint() the integration asks every step): (exit code or None, Trainer, run).

    ``sync``: saves in the loop. Asynchronous saves (the default) are *deferred* to the next save point when the
    previous one is still being written — by design, the loop never waits on storage — so on a loaded machine
    which steps get committed depends on timing; the tests of the cadence itself save synchronously."""
    trainer = hf_worker.build(root / "user", **options)
    code = None
    mode = "sync" if sync else "async"
    try:
        with testing.init(root, keep_last=100, preempt_at=stop_at, checkpoint_mode=mode) as run:
            podtrain_hf.train(run, trainer)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, trainer, run


def assert_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    diverged = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diverged, f"{len(diverged)} tensors differ from the uninterrupted run, e.g. {diverged[0]}"


VARIANTS: dict[str, dict[str, Any]] = {
    "steps": {},
    "eval": {"eval_steps": 7},
    "accumulate": {"gradient_accumulation_steps": 2},  # 12 optimizer steps an epoch
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("reference")
    return {variant: plain(tmp / variant, **options) for variant, options in VARIANTS.items()}


@pytest.mark.parametrize(
    ("stop", "variant"),
    [(31, "steps"), (48, "steps"), (35, "steps"), (21, "eval"), (31, "accumulate")],
    ids=["mid-epoch", "epoch-end", "on-a-save-step", "after-an-evaluation", "gradient-accumulation"],
)
def test_a_stopped_run_resumed_in_a_new_trainer_ends_bitwise_equal_to_an_uninterrupted_one(
    tmp_path: Path, reference: dict[str, dict[str, torch.Tensor]], stop: int, variant: str
) -> None:
    """Stop requested during step ``stop``: that step is committed, the block exits 75, and a new Trainer resumes
    there — model, AdamW, cosine schedule, TrainerState, RNG (dropout) and the data position (the batches of the
    epoch already consumed are skipped) — and ends with the uninterrupted run's weights, bit for bit. The stop at
    step 21 falls right after an evaluation (eval_steps 7), whose DataLoader draws from torch's RNG: the capture
    must be where the Trainer saves, after it. With gradient accumulation the skip counts micro-batches."""
    options = VARIANTS[variant]
    code, stopped, run = attempt(tmp_path, stop_at=stop, **options)
    assert code == testing.EXIT_PREEMPTED
    assert stopped.state.global_step == stop, "the Trainer ran past the step the stop was agreed on"
    assert testing.committed_steps(run)[-1] == stop
    newest = run.checkpointer.list()[0]
    assert {n.rsplit("/", 1)[-1].split(".")[0] for n in newest.manifest.files} >= {
        "model",
        "optimizer",
        "scheduler",
        "trainer",
        "rng",
    }

    code, resumed, run = attempt(tmp_path, **options)
    assert code is None
    assert run.checkpointer.resumed_from == stop
    assert resumed.state.global_step == 60
    assert_equal(weights(resumed), reference[variant])


def test_the_trainer_s_cadence_decides_when_and_no_checkpoint_folder_is_written(tmp_path: Path) -> None:
    """save_steps 5: podtrain commits steps 5, 10, … 60 and nothing else; args.output_dir gets no checkpoint-N."""
    code, trainer, run = attempt(tmp_path, steps=30, sync=True)
    assert code is None
    assert testing.committed_steps(run) == [5, 10, 15, 20, 25, 30]
    assert not list(Path(trainer.args.output_dir).glob("checkpoint-*"))


def test_podtrain_s_policy_saves_when_the_trainer_saves_nothing(tmp_path: Path) -> None:
    """save_strategy "no" and PODTRAIN_CHECKPOINT_EVERY_STEPS=7: steps 7, 14, 21, and the last (26) at the end."""
    trainer = hf_worker.build(tmp_path / "user", steps=26, save_steps=0)
    with testing.init(tmp_path, keep_last=100, checkpoint_every_steps=7, checkpoint_mode="sync") as run:
        podtrain_hf.train(run, trainer)
    assert testing.committed_steps(run) == [7, 14, 21, 26]


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one_and_checkpoint_folders_never_decide(
    tmp_path: Path, reference: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Stopped at 33 (committed), one payload byte of step 33's model flipped: the next attempt skips it for the
    previous commit (step 30 unless a loaded machine deferred that save) and still ends bitwise equal. A
    complete-looking Transformers ``checkpoint-59`` folder (the reference's own, the one ``get_last_checkpoint()``
    would pick) sits in the Trainer's output_dir and changes nothing."""
    code, _, run = attempt(tmp_path, stop_at=33)
    assert code == testing.EXIT_PREEMPTED
    *_, previous, newest = testing.committed_steps(run)
    assert newest == 33 and previous < newest
    payload = next((tmp_path / "checkpoints" / "step-0000000033").rglob("model.safetensors"))
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))

    decoy = hf_worker.build(tmp_path / "decoy", steps=59, save_steps=59)
    decoy.train()
    shutil.copytree(tmp_path / "decoy" / "hf" / "checkpoint-59", tmp_path / "user" / "hf" / "checkpoint-59")

    with testing.capture_logs() as logs:
        code, resumed, run = attempt(tmp_path)
    assert code is None
    assert run.checkpointer.resumed_from == previous
    skipped = [e for e in logs if e["event"] == "checkpoint.skipped"]
    assert skipped and "step-0000000033" in skipped[0]["url"] and "CRC32C" in skipped[0]["reason"], skipped
    assert_equal(weights(resumed), reference["steps"])


def test_the_export_is_a_folder_from_pretrained_loads(tmp_path: Path) -> None:
    """model.safetensors and config.json under PODTRAIN_OUTPUT_DIR/export, pushed beside the run's artifacts."""
    code, trainer, _ = attempt(tmp_path, steps=10)
    assert code is None
    folder = tmp_path / "output" / "export"
    loaded = GPT2LMHeadModel.from_pretrained(folder)
    assert_equal(weights(loaded), weights(trainer))
    sidecar = json.loads((folder / "model.json").read_text())
    assert sidecar["step"] == 10 and sidecar["model_class"] == "GPT2LMHeadModel"
    pushed = tmp_path / "artifacts" / "test" / "export"
    assert {"model.safetensors", "config.json", "model.json"} <= {p.name for p in pushed.iterdir()}
    assert load_file(pushed / "model.safetensors").keys() == weights(trainer).keys()


@pytest.mark.parametrize(
    ("options", "call", "fix"),
    [
        ({}, {"resume_from_checkpoint": True}, "drop resume_from_checkpoint"),
        ({"load_best_model_at_end": True, "eval_steps": 5, "save_steps": 5}, {}, "unset load_best_model_at_end"),
        ({"save_only_model": True}, {}, "unset save_only_model"),
    ],
    ids=["resume_from_checkpoint", "load_best_model_at_end", "save_only_model"],
)
def test_what_would_bypass_podtrain_or_break_exact_resume_is_refused_with_exit_2_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: dict[str, Any], call: dict[str, Any], fix: str
) -> None:
    trainer = hf_worker.build(tmp_path / "user", **options)
    with pytest.raises(SystemExit) as exited, testing.init(tmp_path) as run:
        podtrain_hf.train(run, trainer, **call)
    assert exited.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("podtrain: " + fix), line
    assert not list((tmp_path / "checkpoints").glob("step-*")), "nothing may be trained or saved before the refusal"


def test_import_sdk_and_sdk_integrations_never_import_transformers() -> None:
    """The framework is an optional extra: only importing the integration's module loads it."""
    code = (
        "import sys, sdk, sdk.integrations; sdk.Run; sdk.init; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "from sdk.integrations import transformers; assert 'transformers' in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


class StopEarly(TrainerCallback):
    """A user's own early stop (as EarlyStoppingCallback does), at a step that is no save point."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_training_stop = state.global_step == 13 or control.should_training_stop
        return control


def test_an_early_stop_between_save_points_commits_the_step_it_ended_at(tmp_path: Path) -> None:
    """The Trainer's own stop at step 13 (save_steps 5): the run completes, step 13 is committed and exported."""
    trainer = hf_worker.build(tmp_path / "user", callbacks=(StopEarly(),))
    with testing.init(tmp_path, keep_last=100, checkpoint_mode="sync") as run:
        podtrain_hf.train(run, trainer)
    assert testing.committed_steps(run) == [5, 10, 13]
    assert json.loads((tmp_path / "output" / "export" / "model.json").read_text())["step"] == 13
