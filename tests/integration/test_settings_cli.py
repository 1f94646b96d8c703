"""`podtrain run` with absurd settings: each is refused before the child starts — exit 2, one line on stderr
naming the variable, no traceback, and a termination message saying the same.

Runs the installed console script in a real subprocess; the child would create ``ran`` in the working folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
CHILD = [sys.executable, "-c", "open('ran', 'w')"]


def _run(
    tmp: Path, env: dict[str, str | bytes], *, args: tuple[str, ...] = (), cmd: list[str | bytes] | None = None
) -> tuple[int, str, dict[str, object]]:
    termlog = tmp / "termination-log"
    base: dict[str, str | bytes] = {
        **os.environ,
        "PODTRAIN_RUN_ID": "settings",
        "PODTRAIN_ATTEMPT": "1",
        "PODTRAIN_CHECKPOINT_URI": f"file://{tmp}/ckpt",
        "PODTRAIN_TERMINATION_LOG": str(termlog),
        "PODTRAIN_GRACE_SECONDS": "10",
    }
    proc = subprocess.run(
        [PODTRAIN, "run", *args, "--", *(cmd or CHILD)],
        env={**base, **env},
        cwd=tmp,
        capture_output=True,
        timeout=120,
    )
    stderr = proc.stderr.decode("utf-8", "backslashreplace")
    text = termlog.read_text(encoding="utf-8") if termlog.exists() else ""
    message = json.loads(text) if text else {}
    return proc.returncode, stderr, message


def _refused(tmp: Path, env: dict[str, str | bytes], variable: str, **kwargs: object) -> dict[str, object]:
    """Run with ``env``: checks the refusal (exit 2, one line naming ``variable``, the child never ran) and returns
    the termination message."""
    code, stderr, message = _run(tmp, env, **kwargs)  # type: ignore[arg-type]
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    said = [line for line in stderr.splitlines() if line.startswith("podtrain: ")]
    assert len(said) == 1 and variable in said[0], stderr
    assert message.get("exit_code") == 2 and variable in str(message.get("message")), message
    assert not (tmp / "ran").exists(), "the child ran"
    return message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PODTRAIN_GRACE_SECONDS", "inf"),
        ("PODTRAIN_GRACE_SECONDS", "1e300"),
        ("PODTRAIN_STALL_SECONDS", "inf"),
        ("PODTRAIN_CHECKPOINT_EVERY_SECONDS", "inf"),
        ("PODTRAIN_KEEP_LAST", "10000000000000000000000"),
        ("PODTRAIN_STOP_SIGNALS", "SIGTERM,SIGKILL"),
        ("PODTRAIN_STOP_SIGNALS", "SIGSTOP"),
        ("PODTRAIN_CHECKPOINT_URI", "ftp://x"),
        ("PODTRAIN_CHECKPOINT_URI", "s3://"),
        ("PODTRAIN_DATA_URI", "gs://"),
        ("PODTRAIN_ARTIFACT_URI", "s3:///prefix"),
    ],
)
def test_an_absurd_setting_is_refused_before_the_child_starts(tmp_path: Path, variable: str, value: str) -> None:
    assert _refused(tmp_path, {variable: value}, variable)["outcome"] == "config_error"


def test_a_run_id_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    assert _refused(tmp_path, {}, "PODTRAIN_RUN_ID", args=("--run-id", "r1\n"))["outcome"] == "config_error"


@pytest.mark.parametrize("variable", ["PODTRAIN_RUN_ID", "PODTRAIN_OUTPUT_DIR", "PODTRAIN_NODE_NAME"])
def test_non_utf8_bytes_in_a_variable_are_refused_with_a_termination_message(tmp_path: Path, variable: str) -> None:
    assert (
        _refused(tmp_path, {variable: os.fsencode(str(tmp_path)) + b"/r\xff\xfe"}, variable)["outcome"]
        == "config_error"
    )


def test_non_utf8_bytes_in_the_command_are_refused_with_a_termination_message(tmp_path: Path) -> None:
    assert _refused(tmp_path, {}, "command", cmd=[*CHILD, b"arg-\xff"])["outcome"] == "config_error"


@pytest.mark.parametrize("variable", ["PODTRAIN_DATA_DIR", "PODTRAIN_OUTPUT_DIR", "PODTRAIN_CHECKPOINT_URI"])
@pytest.mark.parametrize("shape", ["one long name", "a long path"])
def test_a_path_too_long_for_the_file_system_is_refused(tmp_path: Path, variable: str, shape: str) -> None:
    tail = "a" * 5000 if shape == "one long name" else "/".join(["d" * 200] * 25)
    assert _refused(tmp_path, {variable: f"{tmp_path}/{tail}"}, variable)["outcome"] == "config_error"


def test_an_output_dir_naming_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    assert (
        _refused(tmp_path, {"PODTRAIN_OUTPUT_DIR": str(tmp_path / "a-file")}, "PODTRAIN_OUTPUT_DIR")["outcome"]
        == "config_error"
    )


def test_sane_settings_still_run_the_child(tmp_path: Path) -> None:
    """The control: with none of the above, the same command runs and exits 0."""
    code, stderr, message = _run(tmp_path, {"PODTRAIN_GRACE_SECONDS": "86400", "PODTRAIN_STOP_SIGNALS": "TERM,USR1"})
    assert code == 0, stderr
    assert (tmp_path / "ran").exists()
    assert message["exit_code"] == 0


@pytest.mark.parametrize("url", ["ftp://x", "s3://", "gs://", "s3:///prefix"])
@pytest.mark.parametrize(
    "command",
    [
        ("pull", "{url}", "--dest", "d"),
        ("push", "src", "{url}"),
        ("checkpoints", "list", "{url}"),
        ("checkpoints", "verify", "{url}"),
        ("record", "{url}"),
    ],
    ids=["pull", "push", "checkpoints list", "checkpoints verify", "record"],
)
def test_an_unknown_scheme_or_a_url_without_a_bucket_is_exit_2_in_every_command(
    tmp_path: Path, url: str, command: tuple[str, ...]
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    argv = [PODTRAIN, *(part.format(url=url) for part in command)]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("podtrain: ")]
    assert len(said) == 1 and url in said[0], proc.stderr


@pytest.mark.parametrize(
    ("variable", "value"), [("PODTRAIN_STALL_SECONDS", "inf"), ("PODTRAIN_GRACE_SECONDS", "1e300")]
)
def test_the_standalone_commands_refuse_the_same_settings(tmp_path: Path, variable: str, value: str) -> None:
    """`podtrain pull` reads the same config: an infinite stall limit is exit 2 there too, before any transfer."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    proc = subprocess.run(
        [PODTRAIN, "pull", f"file://{tmp_path}/src", "--dest", "d"],
        env={**os.environ, variable: value},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("podtrain: ")]
    assert len(said) == 1 and variable in said[0], proc.stderr
    assert not (tmp_path / "d" / "f").exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("pull", "{src}", "--dest", "d", "--stall-seconds", "inf"), "PODTRAIN_STALL_SECONDS"),
        (("push", "src", "{src}-out", "--stall-seconds", "nan"), "PODTRAIN_STALL_SECONDS"),
        (("pull", "{src}", "--dest", "d", "--workers", "100000"), "--workers"),
        (("pull", "{src}", "--dest", "d", "--piece-mib", "99999"), "--piece-mib"),
        (("push", "src", "{src}-out", "--workers", "0"), "--workers"),
    ],
    ids=["pull-stall-inf", "push-stall-nan", "pull-workers", "pull-piece", "push-workers"],
)
def test_the_commands_flags_get_the_same_ranges(tmp_path: Path, args: tuple[str, ...], named: str) -> None:
    """A flag is checked like its variable: exit 2, one line naming it, nothing transferred."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    argv = [PODTRAIN, *(part.format(src=f"file://{tmp_path}/src") for part in args)]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("podtrain: ")]
    assert len(said) == 1 and named in said[0], proc.stderr
    assert not (tmp_path / "d" / "f").exists() and not (tmp_path / "src-out").exists()
