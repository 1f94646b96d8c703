"""The run's configuration: one frozen dataclass, read from arguments first, then ``PODTRAIN_*`` variables.

This is the only place that reads the environment for podtrain's own settings. Object-store credentials are
not here on purpose: they come from each cloud's own chain (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``STORAGE_EMULATOR_HOST``). With nothing set, every location is a local directory under ``./.podtrain``,
so ``python train.py`` runs on a laptop.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from sdk.errors import ConfigError
from sdk.preemption import parse_signals

__all__ = ["ENV_PREFIX", "CheckpointMode", "Config", "LogFormat"]

ENV_PREFIX = "PODTRAIN_"
LogFormat = Literal["auto", "json", "console"]
CheckpointMode = Literal["async", "overlap", "sync"]
_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run needs to know about where it is and what it may do.

    Each field maps to ``PODTRAIN_<FIELD>`` (upper case), except ``rank``/``world_size``, which follow
    torchrun's ``RANK``/``WORLD_SIZE``.
    """

    run_id: str = "local"
    attempt: int | None = None  # None: derived from the checkpoint store (newest attempt seen + 1)
    rank: int = 0
    world_size: int = 1
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
    throttle_seconds: float = 300.0  # how long a pull or push keeps retrying a store that throttles it (sdk.throttle)
    require_checksums: bool = False  # a pulled object the store keeps no checksum for is an error, not "unverified"
    output_dir: str = ""
    grace_seconds: float = 30.0
    stop_signals: str = "SIGTERM,SIGINT,SIGUSR1"
    termination_log: str = "/dev/termination-log"
    log_format: LogFormat = "auto"
    log_level: str = "info"
    node_name: str = ""  # the Kubernetes node (downward API spec.nodeName), for the run record
    report_file: str = ""  # set by `podtrain run`: where the child reports its progress (sdk.report)

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
        if not _RUN_ID.match(self.run_id):
            _fail("run_id", self.run_id, "use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric")
        if self.attempt is not None and self.attempt < 1:
            _fail("attempt", self.attempt, "attempts are numbered from 1")
        if self.world_size < 1:
            _fail("world_size", self.world_size, "must be at least 1")
        if not 0 <= self.rank < self.world_size:
            _fail("rank", self.rank, f"must be in [0, WORLD_SIZE={self.world_size})")
        if self.keep_last < 1:
            _fail("keep_last", self.keep_last, "keep at least 1 checkpoint")
        if self.keep_every is not None and self.keep_every < 1:
            _fail("keep_every", self.keep_every, "a positive step interval, or unset")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            _fail("checkpoint_every_steps", self.checkpoint_every_steps, "a positive step interval, or unset")
        if self.checkpoint_every_seconds is not None and not self.checkpoint_every_seconds > 0:
            _fail("checkpoint_every_seconds", self.checkpoint_every_seconds, "a positive number of seconds, or unset")
        self._validate_choices()

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
        if not self.stall_seconds > 0:
            _fail("stall_seconds", self.stall_seconds, "seconds without a byte before a transfer is retried (> 0)")
        if not 0 < self.throttle_seconds <= 3600:
            _fail("throttle_seconds", self.throttle_seconds, "seconds to retry a throttling store, in (0, 3600]")
        if not self.grace_seconds > 0:
            _fail("grace_seconds", self.grace_seconds, "set it to the pod's terminationGracePeriodSeconds (> 0)")
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


def _variable(name: str) -> str:
    return name.upper() if name in ("rank", "world_size") else ENV_PREFIX + name.upper()


def _fail(name: str, value: object, fix: str) -> None:
    raise ConfigError(f"{_variable(name)}={value!r} is invalid: {fix}")


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
