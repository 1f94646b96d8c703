"""A new user's first hour with the installed `podtrain` command: help, examples, readable output, a resume said.

Every test runs the console script installed beside this Python (``.venv/bin/podtrain``) or ``examples/train.py``
as real subprocesses, with no ``PODTRAIN_*`` variable from the caller's environment.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PODTRAIN = str(Path(sys.executable).with_name("podtrain"))  # the console script installed beside this python
TRAIN = str(ROOT / "examples" / "train.py")
DATASET = str(ROOT / "examples" / "dataset.py")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Every command a user can ask --help of, and the words its own examples must start with.
COMMANDS = [
    ("run",),
    ("pull",),
    ("push",),
    ("record",),
    ("smoke",),
    ("checkpoints",),
    ("checkpoints", "list"),
    ("checkpoints", "verify"),
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTRAIN_")}
    return {**env, **extra}


def _podtrain(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PODTRAIN, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=_env(**env))


def _examples(text: str) -> list[str]:
    """The command lines under a help text's ``examples:`` heading (up to the first blank line)."""
    lines = text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.strip()]


def test_podtrain_with_no_arguments_prints_the_help_and_exits_2() -> None:
    """`podtrain` alone prints the whole help (commands and examples) on stdout, not argparse's one-line error;
    exit 2, as for any usage error, so a script that lost its arguments does not pass."""
    out = _podtrain()
    assert out.returncode == 2, out
    assert out.stdout == _podtrain("--help").stdout, out
    assert "examples:" in out.stdout and "checkpoints" in out.stdout
    assert "error:" not in out.stderr, out.stderr


def test_a_command_group_with_no_action_prints_its_help() -> None:
    """`podtrain checkpoints` alone prints its help (list and verify, with examples), exit 2."""
    out = _podtrain("checkpoints")
    assert out.returncode == 2, out
    assert out.stdout == _podtrain("checkpoints", "--help").stdout
    assert "verify" in out.stdout and "examples:" in out.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_s_help_has_examples_of_that_command(command: tuple[str, ...]) -> None:
    """Each --help ends with examples, and every example runs the command asked about, not another one."""
    out = _podtrain(*command, "--help")
    assert out.returncode == 0, out.stderr
    examples = _examples(out.stdout)
    assert examples, out.stdout
    wanted = "podtrain " + " ".join(command)
    for example in examples:
        line = re.sub(r"^([A-Z_]+=\S+\s+)+", "", example)  # VAR=value podtrain ...
        assert line == wanted or line.startswith(wanted + " "), f"{' '.join(command)} --help shows: {example}"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_no_help_text_is_cut_off_mid_sentence(command: tuple[str, ...]) -> None:
    """The description above the options ends a sentence (smoke's stopped at "…with the likely cause:")."""
    text = _podtrain(*command, "--help").stdout
    description = text.split("\n\n", 1)[1].split("\noptions:\n", 1)[0].strip()
    assert not description.endswith(":"), f"{' '.join(command)} --help:\n{text}"


def test_run_help_says_it_pulls_the_data_first_and_pushes_the_outputs_last() -> None:
    """`podtrain run --help` tells what happens around CMD: the pull of PODTRAIN_DATA_URI before it starts, the
    push of PODTRAIN_OUTPUT_DIR after it ends."""
    text = " ".join(_podtrain("run", "--help").stdout.split())
    assert "PODTRAIN_DATA_URI" in text and "PODTRAIN_OUTPUT_DIR" in text, text
    pull, push = text.find("PODTRAIN_DATA_URI"), text.find("PODTRAIN_OUTPUT_DIR")
    assert pull < push, text
    assert re.search(r"before CMD starts", text) and re.search(r"after CMD (ends|exits)", text), text


def _on_a_terminal(argv: list[str], cwd: Path) -> str:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; what it printed, colours stripped."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=60) == 0, b"".join(chunks)
    return ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def test_a_standalone_command_on_a_terminal_prints_no_empty_run_fields(tmp_path: Path) -> None:
    """`podtrain pull` and `push` outside a run, on a terminal: readable log lines without ``run_id=None`` or
    ``attempt=None`` (no run, no attempt: nothing to say)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello\n")
    pulled = _on_a_terminal([PODTRAIN, "pull", (tmp_path / "src").as_uri(), "--dest", str(tmp_path / "dst")], tmp_path)
    pushed = _on_a_terminal([PODTRAIN, "push", str(tmp_path / "dst"), (tmp_path / "out").as_uri()], tmp_path)
    for text in (pulled, pushed):
        assert "pull.done" in text or "push.done" in text, text
        assert "=None" not in text, text


def test_running_train_py_twice_without_a_run_id_says_it_resumes(tmp_path: Path) -> None:
    """The second `python train.py` without PODTRAIN_RUN_ID resumes run 'local': one line at its start says so,
    from which step and checkpoint, and how to start a new run instead. The first run says nothing of the kind."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, DATASET, "--out", str(data), "--shards", "1", "--mib", "0.0625"], check=True)
    cmd = [sys.executable, TRAIN, "--steps", "10", "--checkpoint-every", "10", "--data", str(data), "--threads", "1"]
    cmd += ["--batch-size", "4", "--layers", "1", "--d-model", "16", "--heads", "2", "--context", "16"]
    first = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr
    assert "resuming run" not in first.stderr
    second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr
    lines = [line for line in second.stderr.splitlines() if "resuming run" in line]
    assert len(lines) == 1, second.stderr
    step = (tmp_path / ".podtrain" / "local" / "checkpoints" / "step-0000000010").as_uri()
    assert f"resuming run 'local' from step 10 at {step}; set PODTRAIN_RUN_ID for a new run" in lines[0], lines


def test_the_walkthrough_s_leftovers_are_ignored_by_git(tmp_path: Path) -> None:
    """What the README's walkthrough and a local train.py leave in the clone is ignored by git."""
    left = [".podtrain/local/checkpoints/step-0000000010/x", "data/shard-000.txt", "output/model.pt", "termination-log"]
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", *left], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == left, out


def test_the_record_of_a_run_that_failed_at_once_reads_as_words(tmp_path: Path) -> None:
    """`podtrain record` after a child that failed before any step: no "None->None", "1 attempt" not "attempts"."""
    env = {
        "PODTRAIN_RUN_ID": "r1",
        "PODTRAIN_CHECKPOINT_URI": (tmp_path / "ckpt").as_uri(),
        "PODTRAIN_ARTIFACT_URI": (tmp_path / "artifacts").as_uri(),
        "PODTRAIN_OUTPUT_DIR": str(tmp_path / "output"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }
    assert _podtrain("run", "--", "false", cwd=tmp_path, **env).returncode == 1
    out = _podtrain("record", cwd=tmp_path, **env)
    assert out.returncode == 0, out.stderr
    assert "None" not in out.stdout and "1 attempts" not in out.stdout, out.stdout
    assert "total: 1 attempt, " in out.stdout, out.stdout
