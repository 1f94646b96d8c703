"""podtrain_hf.train as a pod runs it: `podtrain run`, a real SIGTERM, fresh processes, and two ranks under torchrun.

Every attempt is a new process tree started the way the pod starts it (``python -m entrypoint run -- …``) on a
file:// store, in its own session so the signal never reaches pytest. The worker (hf_worker.py) is a user's
script: their Trainer, ``podtrain_hf.train(run, trainer)`` inside ``sdk.init()``, one sleep per step so that the
signal lands mid-run. The references are the same Trainer run by Transformers alone (``--plain``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.integrations._processes import ProcessContract, Worker


class TestTransformersProcesses(ProcessContract):
    """The contract (``_processes.ProcessContract``) for ``podtrain_hf.train``: the Trainer's own state, optimizer
    and RNG per rank; one process is refused a 2-rank checkpoint because the Trainer counts consumed data in steps
    of both ranks' batches; the example's export is a folder ``from_pretrained`` loads."""

    worker = Worker("hf_worker.py", run_id="hf", framework="Transformers")
    rank_files = ("trainer", "optimizer", "rng")
    example = "train_hf.py"

    def check_export(self, export: Path) -> None:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(export)
        assert model.config.n_positions == 32
