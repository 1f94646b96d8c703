"""The README cannot rot: every shell command in it is run (or, for make and docker, checked), and its API
sketch, environment table and exit codes are held against the code."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sdk.config import Config, variable_of
from sdk.outcomes import SUPERVISOR_OUTCOMES
from tests.servers import MotoS3Server

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)


def _commands(block: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_quick_start_is_make_demo_then_make_test_and_both_targets_exist() -> None:
    """The first block of the README is exactly `make demo` and `make test`, and make knows both targets."""
    assert _commands(_blocks("sh")[0]) == ["make demo", "make test"]
    for target in ("demo", "test"):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=False)
        assert dry.returncode == 0, dry.stderr


def test_the_docker_commands_name_the_dockerfiles_and_the_tags_they_use() -> None:
    """No Docker engine here: the README's build commands name files that exist, and the example image's
    default base is the tag the first command builds (hadolint and the rest: tests/unit/test_docker.py)."""
    (block,) = [b for b in _blocks("sh") if "docker build" in b]
    builds = [c.split() for c in _commands(block)]
    assert [b[3] for b in builds] == ["docker/Dockerfile", "docker/Dockerfile.example"]
    assert all(b[:3] == ["docker", "build", "-f"] for b in builds)
    for build in builds:
        assert (ROOT / build[3]).is_file() and build[-1] == "."
    base_tag = builds[0][builds[0].index("-t") + 1]
    assert f"ARG BASE_IMAGE={base_tag}\n" in (ROOT / "docker" / "Dockerfile.example").read_text()


@pytest.mark.timeout(600)
def test_the_shell_walkthrough_runs_as_written_against_an_s3_server(tmp_path: Path) -> None:
    """The "From a shell" block, run line by line by bash against moto on 127.0.0.1 with a bucket named as in
    the README: the dataset, two pulls, a training run, the listing, the verify, the record and the push.

    It runs as a new user would after the quick start built ``.venv``: in a copy of the clone's top level (its
    ``.venv`` and ``examples``), with no virtual environment on the PATH, so the block itself must say how
    ``podtrain`` gets there. What it leaves behind is ignored by the clone's .gitignore."""
    (block,) = [b for b in _blocks("sh") if "podtrain pull" in b]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    with MotoS3Server() as server:
        server.create_bucket("my-bucket")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PODTRAIN_", "AWS_"))}
        env.pop("VIRTUAL_ENV", None)
        env.update(server.env())
        env.update(
            PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not _a_venv_s_bin(p)),
            AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
            PODTRAIN_LOG_LEVEL="warning",
        )
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
            check=False,
        )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"fetched": 0' in out.stdout, "the second pull fetched nothing"
    assert '"outcome": "succeeded", "exit_code": 0' in out.stdout
    assert "step-0000000060" in out.stdout and "verified" in out.stdout
    assert "total: 1 attempt," in out.stdout
    assert (tmp_path / "output" / "export" / "model.safetensors").is_file()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("examples", ".venv", ".gitignore"))
    assert left, "the walkthrough leaves its data, outputs and termination log in the working directory"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    left = [name + "/" if (tmp_path / name).is_dir() else name for name in left]
    ignored = subprocess.run(["git", "check-ignore", *left], cwd=tmp_path, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == left, f"left behind and not ignored by git: {left}"


def _a_venv_s_bin(folder: str) -> bool:
    """A virtual environment's scripts folder (where an activated or test venv puts podtrain on the PATH)."""
    return bool(folder) and (Path(folder).parent / "pyvenv.cfg").is_file()


def test_the_quick_start_states_what_the_first_run_costs() -> None:
    """The time claims are the measured ones on a loaded 2-core machine: each environment ~5.5 min to build,
    `make test` ~25 min, `make demo` ~10.5 min with its environment."""
    start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    text = " ".join(start.split())
    for claim in ("5.5 minutes", "25 minutes", "10.5 minutes", "loaded 2-core machine"):
        assert claim in text, f"the quick start does not say {claim!r}:\n{text}"


def test_every_sh_block_is_one_of_the_checked_kinds() -> None:
    """A new shell block in the README must be run or checked by this file: make (the quick start, and the image
    built without Docker: ``make image-test`` runs in CI after ``make test``), docker build, or the walkthrough;
    nothing else slips in unrun."""
    kinds = []
    for block in _blocks("sh"):
        commands = _commands(block)
        if all(c.startswith("make ") for c in commands):
            kinds.append("make")
            for command in commands:  # make knows every target the block names (a dry run)
                dry = subprocess.run([*command.split(), "-n"], cwd=ROOT, capture_output=True, text=True, check=False)
                assert dry.returncode == 0, f"{command}: {dry.stderr}"
        elif all(c.startswith("docker build") for c in commands):
            kinds.append("docker")
        elif "podtrain pull" in block:
            kinds.append("walkthrough")
        else:
            pytest.fail(f"a README shell block no test runs:\n{block}")
    assert sorted(kinds) == ["docker", "make", "make", "walkthrough"]


def test_the_testing_sketch_uses_only_sdk_testing_public_names() -> None:
    """The README's sketch of a user's preemption test parses and names only what ``sdk.testing`` exports."""
    from sdk import testing

    _sketch, block = _blocks("python")
    tree = ast.parse(block)
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "testing"}
    assert {"init", "committed_steps", "EXIT_PREEMPTED"} <= used
    missing = used - set(testing.__all__)
    assert not missing, f"the README uses sdk.testing names it does not export: {sorted(missing)}"


def test_the_train_py_sketch_calls_only_the_public_api() -> None:
    """The README's train.py sketch parses, and every ``sdk.X`` and ``run.X`` it uses exists in the SDK."""
    import sdk
    from sdk.run import Run

    sketch, _testing = _blocks("python")
    tree = ast.parse(sketch)
    used = {
        (n.value.id, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
    }
    for owner, name in used:
        if owner == "sdk":
            assert name in sdk.__all__, f"sdk.{name} is not public"
        if owner == "run":
            assert hasattr(Run, name), f"run.{name} does not exist"
    assert {("run", "resume"), ("run", "checkpoint"), ("run", "should_stop"), ("run", "export")} <= used
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "init")
    fields = {f.name for f in dataclasses.fields(Config)}
    assert all(k.arg in fields for k in init.keywords), "sdk.init() keywords are Config fields"


def test_the_environment_table_lists_every_setting_with_its_default() -> None:
    """Each Config field has its variable in the README's table, and every plain default it states is the code's."""
    rows = {}
    for line in README.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`([A-Z_]+)`", cells[0]):
                rows[name] = cells[1]
    defaults = Config()
    for field in dataclasses.fields(Config):
        name = variable_of(field.name)
        assert name in rows, f"{name} is missing from the README's environment table"
        value = getattr(defaults, field.name)
        if value in (None, "") or ".podtrain" in str(value):
            continue  # derived, unset, or a path under the working directory
        shown = f"{value:g}" if isinstance(value, float) else str(int(value)) if isinstance(value, bool) else str(value)
        assert f"`{shown}`" in rows[name], f"{name}: the README says {rows[name]}, the code {shown}"


def test_the_exit_code_table_is_the_supervisor_s() -> None:
    """Codes and outcome names in the README are the ones podtrain run writes."""
    table = re.findall(r"^\| (\d+) \| `(\w+)`", README, flags=re.MULTILINE)
    assert {int(code): outcome for code, outcome in table} == SUPERVISOR_OUTCOMES
