"""Config.from_env: explicit values beat PODTRAIN_* variables, and every bad value names its variable."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from sdk.config import Config
from sdk.errors import ConfigError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default locations are relative to the working directory: keep them in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_put_everything_under_dot_podtrain(tmp_path: Path) -> None:
    """With nothing set, the run is 'local' and every location is a directory under ./.podtrain/local."""
    config = Config.from_env({})
    home = tmp_path / ".podtrain" / "local"
    assert config.run_id == "local"
    assert config.attempt is None
    assert (config.rank, config.world_size) == (0, 1)
    assert config.checkpoint_uri == str(home / "checkpoints")
    assert config.artifact_uri == str(home / "artifacts")
    assert config.data_dir == str(home / "data")
    assert config.output_dir == str(home / "output")


def test_variables_fill_fields_with_their_types() -> None:
    """PODTRAIN_* variables set fields, parsed as int or float as the field needs."""
    config = Config.from_env(
        {
            "PODTRAIN_RUN_ID": "exp-7",
            "PODTRAIN_ATTEMPT": "3",
            "PODTRAIN_CHECKPOINT_URI": "s3://bucket/exp-7",
            "PODTRAIN_KEEP_LAST": "5",
            "PODTRAIN_KEEP_EVERY": "1000",
            "PODTRAIN_GRACE_SECONDS": "12.5",
            "PODTRAIN_LOG_FORMAT": "json",
        }
    )
    assert config.run_id == "exp-7"
    assert config.attempt == 3
    assert config.checkpoint_uri == "s3://bucket/exp-7"
    assert config.keep_last == 5
    assert config.keep_every == 1000
    assert config.grace_seconds == 12.5
    assert config.log_format == "json"


def test_rank_and_world_size_come_from_torchrun_variables() -> None:
    """RANK and WORLD_SIZE are read as torchrun sets them; PODTRAIN_RANK is not a thing."""
    config = Config.from_env({"RANK": "2", "WORLD_SIZE": "4", "PODTRAIN_RANK": "3"})
    assert (config.rank, config.world_size) == (2, 4)


def test_explicit_values_beat_the_environment() -> None:
    """An argument wins over its variable; other fields still come from the environment."""
    env = {"PODTRAIN_RUN_ID": "from-env", "PODTRAIN_KEEP_LAST": "9", "WORLD_SIZE": "2"}
    config = Config.from_env(env, run_id="explicit", keep_last=2)
    assert config.run_id == "explicit"
    assert config.keep_last == 2
    assert config.world_size == 2


def test_an_explicit_none_falls_back_to_the_environment() -> None:
    """Passing None for a field means 'not given here', so the variable still applies."""
    config = Config.from_env({"PODTRAIN_RUN_ID": "from-env"}, run_id=None)
    assert config.run_id == "from-env"


def test_empty_and_blank_variables_count_as_unset() -> None:
    """An exported-but-empty variable leaves the default; surrounding spaces are ignored."""
    config = Config.from_env({"PODTRAIN_RUN_ID": "  ", "PODTRAIN_KEEP_LAST": " 4 ", "PODTRAIN_ATTEMPT": ""})
    assert config.run_id == "local"
    assert config.keep_last == 4
    assert config.attempt is None


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, the process environment is used."""
    monkeypatch.setenv("PODTRAIN_RUN_ID", "from-os-environ")
    assert Config.from_env().run_id == "from-os-environ"


def test_unknown_explicit_field_is_an_error_naming_it() -> None:
    """A misspelt keyword fails instead of being silently ignored."""
    with pytest.raises(ConfigError, match="keep_lsat"):
        Config.from_env({}, keep_lsat=3)


@pytest.mark.parametrize(
    ("variable", "raw", "kind"),
    [
        ("PODTRAIN_KEEP_LAST", "three", "an integer"),
        ("PODTRAIN_ATTEMPT", "1.5", "an integer"),
        ("RANK", "first", "an integer"),
        ("WORLD_SIZE", "0x4", "an integer"),
        ("PODTRAIN_GRACE_SECONDS", "30s", "a number"),
        ("PODTRAIN_CHECKPOINT_EVERY_STEPS", "every 10", "an integer"),
    ],
)
def test_unparsable_numbers_name_the_variable_and_the_value(variable: str, raw: str, kind: str) -> None:
    """A number that does not parse is a ConfigError quoting VARIABLE='value' and the expected kind."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: raw})
    assert f"{variable}={raw!r}" in str(caught.value)
    assert f"is not {kind}" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "value"), [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("off", False)]
)
def test_yes_no_settings_read_the_usual_spellings(raw: str, value: bool) -> None:
    """PODTRAIN_REQUIRE_CHECKSUMS (a yes/no setting) takes 1/0, true/false, yes/no, on/off in any case."""
    assert Config.from_env({"PODTRAIN_REQUIRE_CHECKSUMS": raw}).require_checksums is value


def test_an_unreadable_yes_no_setting_names_the_variable_and_the_spellings() -> None:
    """Anything else is a ConfigError quoting the variable and what it takes, never a silent False."""
    with pytest.raises(ConfigError, match=r"PODTRAIN_REQUIRE_CHECKSUMS='sure' is not a yes/no value: use 1/0"):
        Config.from_env({"PODTRAIN_REQUIRE_CHECKSUMS": "sure"})


INVALID: list[Any] = [
    ("run_id", "has space", "PODTRAIN_RUN_ID"),
    ("run_id", "-leading-dash", "PODTRAIN_RUN_ID"),
    ("run_id", "x" * 129, "PODTRAIN_RUN_ID"),
    ("attempt", 0, "PODTRAIN_ATTEMPT"),
    ("world_size", 0, "WORLD_SIZE"),
    ("rank", -1, "RANK"),
    ("rank", 1, "RANK"),  # world_size is 1
    ("keep_last", 0, "PODTRAIN_KEEP_LAST"),
    ("keep_every", 0, "PODTRAIN_KEEP_EVERY"),
    ("checkpoint_every_steps", -5, "PODTRAIN_CHECKPOINT_EVERY_STEPS"),
    ("grace_seconds", 0.0, "PODTRAIN_GRACE_SECONDS"),
    ("grace_seconds", float("nan"), "PODTRAIN_GRACE_SECONDS"),
    ("grace_seconds", float("inf"), "PODTRAIN_GRACE_SECONDS"),
    ("grace_seconds", 1e300, "PODTRAIN_GRACE_SECONDS"),
    ("stall_seconds", float("inf"), "PODTRAIN_STALL_SECONDS"),
    ("stall_seconds", float("nan"), "PODTRAIN_STALL_SECONDS"),
    ("throttle_seconds", float("inf"), "PODTRAIN_THROTTLE_SECONDS"),
    ("checkpoint_every_seconds", float("inf"), "PODTRAIN_CHECKPOINT_EVERY_SECONDS"),
    ("checkpoint_every_seconds", float("nan"), "PODTRAIN_CHECKPOINT_EVERY_SECONDS"),
    ("checkpoint_every_steps", 10**30, "PODTRAIN_CHECKPOINT_EVERY_STEPS"),
    ("keep_last", 10**30, "PODTRAIN_KEEP_LAST"),
    ("keep_every", 10**30, "PODTRAIN_KEEP_EVERY"),
    ("attempt", 10**30, "PODTRAIN_ATTEMPT"),
    ("world_size", 10**30, "WORLD_SIZE"),
    ("stop_signals", "SIGTERM,SIGKILL", "PODTRAIN_STOP_SIGNALS"),
    ("stop_signals", "STOP", "PODTRAIN_STOP_SIGNALS"),
    ("stop_signals", "SIGTERM,SIGNOPE", "PODTRAIN_STOP_SIGNALS"),
    ("run_id", "r1\n", "PODTRAIN_RUN_ID"),
    ("log_format", "xml", "PODTRAIN_LOG_FORMAT"),
    ("log_level", "loud", "PODTRAIN_LOG_LEVEL"),
]


@pytest.mark.parametrize(("field", "value", "variable"), INVALID)
def test_every_invalid_value_names_its_variable_and_the_fix(field: str, value: Any, variable: str) -> None:
    """Validation errors say which variable, its value, and what is allowed."""
    with pytest.raises(ConfigError) as caught:
        Config(**{field: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}=")
    assert "is invalid: " in message
    assert len(message.split("is invalid: ", 1)[1]) > 5  # a fix follows


@pytest.mark.parametrize(("field", "value", "variable"), [case for case in INVALID if case[1] != "r1\n"])
def test_invalid_values_from_the_environment_fail_the_same_way(field: str, value: Any, variable: str) -> None:
    """A bad value given as a variable is rejected with the same variable name (blank space around a variable's
    value is stripped, so the trailing newline is tested as an explicit value only)."""
    with pytest.raises(ConfigError, match=f"^{variable}="):
        Config.from_env({variable: str(value)})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PODTRAIN_GRACE_SECONDS", "86400"),
        ("PODTRAIN_STALL_SECONDS", "0.5"),
        ("PODTRAIN_KEEP_LAST", "1000000"),
        ("PODTRAIN_CHECKPOINT_EVERY_STEPS", "1000000000000"),
        ("PODTRAIN_STOP_SIGNALS", "TERM,USR2,SIGHUP"),
    ],
)
def test_the_ends_of_each_documented_range_are_accepted(variable: str, value: str) -> None:
    field = variable.removeprefix("PODTRAIN_").lower()
    taken = getattr(Config.from_env({variable: value}), field)
    assert str(taken) == value or taken == float(value) if field != "stop_signals" else taken == value


def test_a_number_out_of_range_names_the_range() -> None:
    with pytest.raises(ConfigError, match=r"^PODTRAIN_GRACE_SECONDS=inf is invalid: .*in \(0, 86400\]$"):
        Config.from_env({"PODTRAIN_GRACE_SECONDS": "inf"})


def test_a_stop_signal_that_cannot_be_caught_is_named() -> None:
    with pytest.raises(ConfigError, match="SIGKILL cannot be caught"):
        Config.from_env({"PODTRAIN_STOP_SIGNALS": "SIGTERM,SIGKILL"})


@pytest.mark.parametrize("variable", ["PODTRAIN_OUTPUT_DIR", "PODTRAIN_NODE_NAME", "PODTRAIN_CHECKPOINT_URI"])
def test_bytes_that_are_not_utf8_are_refused_and_shown_escaped(variable: str) -> None:
    """os.environ holds undecodable bytes as lone surrogates: refused, and the message itself is valid UTF-8."""
    undecodable = b"/tmp/r\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: undecodable})
    message = str(caught.value)
    assert message.startswith(f"{variable}='/tmp/r\\\\xff' holds bytes that are not UTF-8")
    message.encode("utf-8")


@pytest.mark.parametrize("field", ["data_dir", "output_dir", "checkpoint_uri", "artifact_uri"])
@pytest.mark.parametrize("tail", ["a" * 256, "/".join(["d" * 200] * 21)], ids=["long name", "long path"])
def test_a_too_long_local_path_is_refused(tmp_path: Path, field: str, tail: str) -> None:
    prefix = "file://" if field.endswith("uri") else ""
    with pytest.raises(ConfigError, match=r"is invalid: .* the file system allows: use a shorter path$") as caught:
        Config(**{field: f"{prefix}{tmp_path}/{tail}"})
    assert len(str(caught.value)) < 300  # the path is shortened in the message


def test_a_long_remote_url_is_not_measured_as_a_local_path() -> None:
    url = "s3://bucket/" + "k" * 300
    assert Config(checkpoint_uri=url).checkpoint_uri == url


def test_a_name_of_255_bytes_is_accepted(tmp_path: Path) -> None:
    folder = str(tmp_path / ("a" * 255))
    assert Config(output_dir=folder).output_dir == folder


def test_an_output_dir_naming_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"^PODTRAIN_OUTPUT_DIR=.* names a file, not a folder"):
        Config.from_env({"PODTRAIN_OUTPUT_DIR": str(tmp_path / "f")})


def test_rank_must_be_below_world_size_when_both_come_from_the_environment() -> None:
    """RANK=4 with WORLD_SIZE=4 is out of range, and the message gives the range."""
    with pytest.raises(ConfigError, match=r"RANK=4 is invalid: must be in \[0, WORLD_SIZE=4\)"):
        Config.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_config_errors_are_user_faults_and_value_errors() -> None:
    """ConfigError is something the user fixes, and a ValueError for generic callers."""
    with pytest.raises(ValueError) as caught:
        Config(keep_last=0)
    assert isinstance(caught.value, ConfigError)
    assert caught.value.fault == "user"


def test_with_changes_validates_again() -> None:
    """A modified copy is checked like a new one; the original is untouched."""
    config = Config(run_id="r1")
    assert config.with_changes(keep_last=7).keep_last == 7
    with pytest.raises(ConfigError, match="PODTRAIN_KEEP_LAST"):
        config.with_changes(keep_last=0)
    assert config.keep_last == 3


def test_config_is_frozen() -> None:
    """Fields cannot be reassigned after validation."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run_id = "other"  # type: ignore[misc]


def test_local_rank_comes_from_torchrun_s_variable() -> None:
    """LOCAL_RANK is read as torchrun sets it, beside RANK and WORLD_SIZE; PODTRAIN_LOCAL_RANK is not a thing."""
    config = Config.from_env({"LOCAL_RANK": "3", "RANK": "5", "WORLD_SIZE": "8", "PODTRAIN_LOCAL_RANK": "1"})
    assert (config.local_rank, config.rank, config.world_size) == (3, 5, 8)


def test_local_rank_defaults_to_0() -> None:
    """Without LOCAL_RANK (python train.py, or a launcher that does not set it) the process is local rank 0."""
    assert Config.from_env({"RANK": "5", "WORLD_SIZE": "8"}).local_rank == 0


def test_a_negative_local_rank_names_local_rank() -> None:
    """LOCAL_RANK=-1 is a ConfigError quoting the variable as torchrun spells it."""
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK=-1 is invalid"):
        Config.from_env({"LOCAL_RANK": "-1"})


def test_a_jobset_restart_makes_the_attempt_the_try_times_1000_plus_the_restart() -> None:
    """Try 2, JobSet restart 3 → attempt 2003: above every restart of try 2 before it (2002…) and below try 3's."""
    env = {"PODTRAIN_ATTEMPT": "2", "PODTRAIN_RESTART_ATTEMPT": "3"}
    assert Config.from_env(env).attempt == 2003
    assert Config.from_env({**env, "PODTRAIN_RESTART_ATTEMPT": "0"}).attempt == 2000
    assert Config.from_env({"PODTRAIN_ATTEMPT": "3", "PODTRAIN_RESTART_ATTEMPT": "0"}).attempt == 3000
    assert Config.from_env({"PODTRAIN_ATTEMPT": "2"}).attempt == 2, "without a restart count, the try number"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PODTRAIN_RESTART_ATTEMPT": "1"}, "PODTRAIN_ATTEMPT"),
        ({"PODTRAIN_ATTEMPT": "1", "PODTRAIN_RESTART_ATTEMPT": "1000"}, "PODTRAIN_RESTART_ATTEMPT=1000"),
        ({"PODTRAIN_ATTEMPT": "1", "PODTRAIN_RESTART_ATTEMPT": "-1"}, "PODTRAIN_RESTART_ATTEMPT=-1"),
        ({"PODTRAIN_ATTEMPT": "1", "PODTRAIN_RESTART_ATTEMPT": "x"}, "PODTRAIN_RESTART_ATTEMPT='x'"),
        ({"PODTRAIN_ATTEMPT": "1000", "PODTRAIN_RESTART_ATTEMPT": "0"}, "PODTRAIN_ATTEMPT=1000"),
    ],
)
def test_a_restart_count_that_cannot_make_an_attempt_is_one_error_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)) as info:
        Config.from_env(env)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw", ["-1", "x", "1.5"])
def test_a_job_completion_index_that_is_not_a_pod_index_is_one_error_naming_it(raw: str) -> None:
    """JOB_COMPLETION_INDEX comes from Kubernetes; anything but a whole number >= 0 names the variable."""
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX") as info:
        Config.from_env({"JOB_COMPLETION_INDEX": raw})
    assert "\n" not in str(info.value)
    assert Config.from_env({"JOB_COMPLETION_INDEX": "3"}).pod_index == 3
