"""The run's configuration: one frozen dataclass, read from arguments first, then ``PODTRAIN_*`` variables.

This is the only place that reads the environment for podtrain's own settings. Object-store credentials are
not here on purpose: they come from each cloud's own chain (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``STORAGE_EMULATOR_HOST``). With nothing set, every location is a local directory under ``./.podtrain``,
so ``python train.py`` runs on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from sdk.errors import ConfigError
from sdk.lifecycle.preemption import parse_signals

__all__ = [
    "ENV_PREFIX",
    "EXTERNAL",
    "RESTARTS",
    "RESTART_VARIABLE",
    "CheckpointMode",
    "Config",
    "LogFormat",
    "variable_of",
]

ENV_PREFIX = "PODTRAIN_"
LogFormat = Literal["auto", "json", "console"]
CheckpointMode = Literal["async", "overlap", "sync"]
_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would let a trailing newline pass
# Ranges (README's settings table): finite, so no deadline, timeout or sleep overflows.
_MAX_COUNT = 1_000_000  # attempts, ranks, checkpoints kept
_MAX_STEPS = 10**12  # step intervals
_MAX_SECONDS = 366 * 86400.0  # checkpoint interval
_MAX_GRACE = 86400.0  # a day: Kubernetes grace periods are seconds to hours
_MAX_STALL = 86400.0
_MAX_THROTTLE = 3600.0
_OR_UNSET = dict.fromkeys(("attempt", "keep_every", "checkpoint_every_steps", "checkpoint_every_seconds"), ", or unset")
_NAME_MAX, _PATH_MAX = 255, 4096  # Linux: bytes in one path component; in a whole path, with its NUL
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run needs to know about where it is and what it may do.

    Each field maps to ``PODTRAIN_<FIELD>`` (upper case), except those another program sets
    (:data:`EXTERNAL`): torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, Kubernetes' ``JOB_COMPLETION_INDEX``.
    """

    run_id: str = "local"
    attempt: int | None = None  # None: derived from the checkpoint store (newest attempt seen + 1)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank among this pod's (node's) processes: local rank 0 reports to the pod's supervisor
    pod_index: int | None = None  # the pod's index in a job of several pods (an Indexed Job's, a JobSet's)
    data_uri: str | None = None  # one URL, or several separated by commas
    data_dir: str = ""
    data_include: str = ""  # comma-separated globs on names under the data URI; empty: everything
    data_exclude: str = ""
    checkpoint_uri: str = ""
    keep_last: int = 3
    keep_every: int | None = None  # also keep every K-th step, forever
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = None
    checkpoint_mode: CheckpointMode = "async"
    artifact_uri: str = ""
    stall_seconds: float = 60.0  # a data pull or artifact push that moves no byte for this long is cut and retried
    throttle_seconds: float = (
        300.0  # how long a pull or push keeps retrying a store that throttles it (sdk.stores._throttle)
    )
    require_checksums: bool = False  # a pulled object the store keeps no checksum for is an error, not "unverified"
    output_dir: str = ""
    grace_seconds: float = 30.0
    stop_signals: str = "SIGTERM,SIGINT,SIGUSR1"
    termination_log: str = "/dev/termination-log"
    log_format: LogFormat = "auto"
    log_level: str = "info"
    node_name: str = ""  # the Kubernetes node (downward API spec.nodeName), for the run record
    report_file: str = ""  # set by `podtrain run`: where the child reports its progress (sdk.lifecycle.childreport)

    def __post_init__(self) -> None:
        home = Path.cwd() / ".podtrain" / self.run_id
        defaults = {
            "data_dir": str(home / "data"),
            "checkpoint_uri": str(home / "checkpoints"),
            "artifact_uri": str(home / "artifacts"),
            "output_dir": str(home / "output"),
        }
        for name, value in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str) and not _is_utf8(value):
                raise ConfigError(
                    f"{_variable(field.name)}={_shown(value)} holds bytes that are not UTF-8: "
                    "set it to UTF-8 text (names, paths and URLs here must be UTF-8)"
                )
        if not _RUN_ID.fullmatch(self.run_id):
            _fail("run_id", self.run_id, "use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric")
        self._check_int("attempt", 1, _MAX_COUNT, "the attempt's number")
        self._check_int("world_size", 1, _MAX_COUNT, "the number of ranks")
        if not 0 <= self.rank < self.world_size:
            _fail("rank", self.rank, f"must be in [0, WORLD_SIZE={self.world_size})")
        self._check_int("local_rank", 0, _MAX_COUNT, "the rank among this pod's processes")
        self._check_int("pod_index", 0, _MAX_COUNT, "the pod's index in its job")
        self._check_int("keep_last", 1, _MAX_COUNT, "how many checkpoints to keep")
        self._check_int("keep_every", 1, _MAX_STEPS, "a step interval")
        self._check_int("checkpoint_every_steps", 1, _MAX_STEPS, "a step interval")
        self._check_seconds("checkpoint_every_seconds", _MAX_SECONDS, "seconds between checkpoints")
        self._validate_choices()
        self._validate_paths()

    def _check_int(self, name: str, low: int, high: int, what: str) -> None:
        value = getattr(self, name)
        if value is not None and not low <= value <= high:
            _fail(name, value, f"{what}, in [{low}, {high}]{_OR_UNSET.get(name, '')}")

    def _check_seconds(self, name: str, high: float, what: str) -> None:
        """A finite number of seconds in (0, high]: ``inf`` or ``1e300`` would overflow a deadline or a timeout."""
        value = getattr(self, name)
        if value is not None and not (math.isfinite(value) and 0 < value <= high):
            _fail(name, value, f"{what}, in (0, {high:.0f}]{_OR_UNSET.get(name, '')}")

    def _validate_paths(self) -> None:
        for name in ("data_dir", "output_dir", "checkpoint_uri", "artifact_uri"):
            path = _local_path(getattr(self, name))
            if path is None:
                continue
            problem = _too_long(path)
            if problem:
                _fail_path(name, path, f"{problem}: use a shorter path")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            _fail_path("output_dir", self.output_dir, "it names a file, not a folder: name a folder (or a new path)")

    def _validate_choices(self) -> None:
        if self.checkpoint_mode not in ("async", "overlap", "sync"):
            _fail(
                "checkpoint_mode",
                self.checkpoint_mode,
                "async (snapshot, write in the background), overlap (async; the snapshot overlaps the next "
                "forward/backward) or sync (write before returning)",
            )
        try:
            parse_signals(self.stop_signals)
        except ValueError as exc:
            _fail("stop_signals", self.stop_signals, f"{exc}; name signals like SIGTERM,SIGUSR1")
        self._check_seconds("stall_seconds", _MAX_STALL, "seconds without a byte before a transfer is retried")
        self._check_seconds("throttle_seconds", _MAX_THROTTLE, "seconds to retry a throttling store")
        self._check_seconds("grace_seconds", _MAX_GRACE, "the pod's terminationGracePeriodSeconds")
        if self.log_format not in ("auto", "json", "console"):
            _fail("log_format", self.log_format, "one of auto, json, console")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            _fail("log_level", self.log_level, "one of debug, info, warning, error")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a config: explicit ``overrides`` win, then ``PODTRAIN_*`` from ``env`` (default: os.environ)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in overrides and overrides[field.name] is not None:
                values[field.name] = overrides.pop(field.name)
                continue
            overrides.pop(field.name, None)
            variable = _variable(field.name)
            raw = env.get(variable)
            if raw is None or raw.strip() == "":
                continue
            values[field.name] = _parse(field.name, variable, raw.strip(), str(field.type))
        if overrides:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(overrides))}")
        restart = env.get(RESTART_VARIABLE, "").strip()
        if restart:
            values["attempt"] = _with_restart(
                values.get("attempt"), _parse("restart", RESTART_VARIABLE, restart, "int")
            )
        return cls(**values)

    @property
    def data_uris(self) -> list[str]:
        """``PODTRAIN_DATA_URI`` split at commas (empty when unset)."""
        return _split(self.data_uri or "")

    @property
    def data_globs(self) -> tuple[list[str], list[str]]:
        """``(include, exclude)`` globs from ``PODTRAIN_DATA_INCLUDE`` / ``PODTRAIN_DATA_EXCLUDE``."""
        return _split(self.data_include), _split(self.data_exclude)

    def with_changes(self, **changes: Any) -> Config:
        """A copy with some fields replaced, validated again."""
        return dataclasses.replace(self, **changes)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


RESTART_VARIABLE = "PODTRAIN_RESTART_ATTEMPT"  # a JobSet's restart count (its pods' label, by the downward API)
RESTARTS = 1000  # restarts of one try: the attempt is try x RESTARTS + restart


def _with_restart(attempt: int | None, restart: int) -> int:
    """The attempt of restart ``restart`` of try ``attempt``: ``attempt x 1000 + restart``, so that a gang restarted
    in the cluster (a JobSet's restart, the same Airflow try) fences the gang it replaces, and a later try every
    restart of an earlier one."""
    if attempt is None:
        raise ConfigError(
            f"{RESTART_VARIABLE}={restart} is set and PODTRAIN_ATTEMPT is not: set PODTRAIN_ATTEMPT to the try number "
            "whose restarts it counts"
        )
    if not 0 <= restart < RESTARTS:
        raise ConfigError(f"{RESTART_VARIABLE}={restart} is invalid: a JobSet restart count, in [0, {RESTARTS - 1}]")
    if not 1 <= attempt < _MAX_COUNT // RESTARTS:
        raise ConfigError(
            f"PODTRAIN_ATTEMPT={attempt} is invalid with {RESTART_VARIABLE}: the try number, in "
            f"[1, {_MAX_COUNT // RESTARTS - 1}]"
        )
    return attempt * RESTARTS + restart


EXTERNAL = {  # fields another program sets, and its variable
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
    "pod_index": "JOB_COMPLETION_INDEX",
}


def variable_of(name: str) -> str:
    """The environment variable of the field ``name``."""
    return EXTERNAL.get(name, ENV_PREFIX + name.upper())


_variable = variable_of


def _fail(name: str, value: object, fix: str) -> None:
    raise ConfigError(f"{_variable(name)}={value!r} is invalid: {fix}")


def _fail_path(name: str, path: str, fix: str) -> None:
    shown = path if len(path) <= 80 else f"{path[:40]}…{path[-20:]} ({len(path.encode())} bytes)"
    raise ConfigError(f"{_variable(name)}={shown!r} is invalid: {fix}")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # os.environ and sys.argv hold undecodable bytes as lone surrogates
        return False
    return True


def _shown(text: str) -> str:
    """``text`` with its undecodable bytes as ``\\xNN``, quoted: safe to print and to write as UTF-8."""
    try:
        return repr(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
    except UnicodeEncodeError:  # a surrogate no byte decodes to: set in code, not read from the environment
        return ascii(text)


def _local_path(url: str) -> str | None:
    """The absolute local path ``url`` names (a plain path, ``file://`` or ``local://``), else None."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return os.path.abspath(os.path.expanduser(url))
    return os.path.abspath(rest) if scheme.lower() in ("file", "local") else None


def _too_long(path: str) -> str:
    """Why the file system would refuse ``path`` with ENAMETOOLONG, or ``""``."""
    longest = max((len(part.encode("utf-8")) for part in path.split("/")), default=0)
    if longest > _NAME_MAX:
        return f"a name in it is {longest} bytes long, over the {_NAME_MAX} the file system allows"
    if len(path.encode("utf-8")) >= _PATH_MAX:
        return f"it is {len(path.encode('utf-8'))} bytes long, over the {_PATH_MAX - 1} the file system allows"
    return ""


def _parse(name: str, variable: str, raw: str, type_name: str) -> Any:
    parser: Callable[[str], Any] = str
    base = type_name.replace(" | None", "")
    if base == "bool":
        flag = _FLAGS.get(raw.lower())
        if flag is None:
            raise ConfigError(f"{variable}={raw!r} is not a yes/no value: use 1/0, true/false, yes/no or on/off")
        return flag
    if base == "int":
        parser = int
    elif base == "float":
        parser = float
    try:
        return parser(raw)
    except ValueError:
        kind = "an integer" if parser is int else "a number"
        raise ConfigError(f"{variable}={raw!r} is not {kind}: fix or unset it") from None
