"""Logging: structlog, JSON lines off a terminal, readable lines on one; secrets never reach a line.

Every line carries ``run_id``, ``attempt`` and ``rank`` (bound once by :func:`configure`, visible from every
thread); a readable line leaves out those that are not set (null in JSON). The redaction processor runs last
before rendering, after exceptions are formatted, so a secret in a traceback is caught too. Its rules are
:mod:`sdk.redaction`'s, which every other writer uses as well (:func:`redact` and :func:`redact_value`,
re-exported here).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import IO, Any, TextIO

import structlog

from sdk import redaction
from sdk.redaction import REDACTED, Redactor, redact, redact_value

__all__ = ["REDACTED", "SecretRedactor", "bind", "configure", "get_logger", "redact", "redact_value"]

_static: dict[str, Any] = {"run_id": None, "attempt": None, "rank": 0}


class SecretRedactor:
    """A structlog processor that replaces secrets with ``***`` (the rules are :mod:`sdk.redaction`'s).

    It masks: values under keys that name a secret (``password``, ``token``, ``aws_secret_access_key``…),
    URLs' user-info (``s3://user:***@host``, ``https://***@host``), secret parameters (``X-Amz-Signature=``,
    ``Authorization:``…), and any known secret value wherever it appears, percent-encoded or JSON-escaped too.
    ``secrets``: the values to know; without them, those of the process's environment *as it is at each line*
    (secret-looking variables such as ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN``, passwords in URLs).
    """

    def __init__(self, secrets: Iterable[str] | None = None) -> None:
        self._fixed = None if secrets is None else Redactor(secrets)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SecretRedactor:
        """The secrets of ``environ`` (default: ``os.environ`` as it is now), fixed from here on."""
        redactor = cls(())
        redactor._fixed = Redactor.from_environ(environ)
        return redactor

    @property
    def _redactor(self) -> Redactor:
        return self._fixed if self._fixed is not None else redaction.current()

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        redactor = self._redactor
        cleaned = {redactor.text(str(k)): redactor.value(v, key=str(k), render=True) for k, v in event.items()}
        event.clear()
        event.update(cleaned)
        return event

    def scrub(self, text: str) -> str:
        """``text`` with every secret masked."""
        return self._redactor.text(text)


def _add_run_fields(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in _static.items():
        event.setdefault(key, value)
    return event


def _add_set_run_fields(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """For people: only the run fields that are set (a command outside any run has no run id, no attempt)."""
    for key, value in _static.items():
        if value is not None:
            event.setdefault(key, value)
    return event


def configure(
    *,
    run_id: str | None = None,
    attempt: int | None = None,
    rank: int = 0,
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    redactor: SecretRedactor | None = None,
) -> None:
    """Set up structlog for this process.

    ``fmt``: ``"json"``, ``"console"`` or ``"auto"`` (console when ``stream`` is a terminal). Safe to call
    again; the last call wins.
    """
    stream = sys.stderr if stream is None else stream
    bind(run_id=run_id, attempt=attempt, rank=rank)
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=_isatty(stream))
        if fmt == "console"
        else structlog.processors.JSONRenderer(default=str)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_set_run_fields if fmt == "console" else _add_run_fields,  # JSON lines keep one shape (nulls)
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor or SecretRedactor(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def bind(**fields: Any) -> None:
    """Set fields every line carries from now on, from every thread (``run_id``, ``attempt``, ``rank``…)."""
    _static.update(fields)


def get_logger(name: str) -> Any:
    """A structlog logger tagged with ``logger_name=name`` (configures defaults on first use if nobody did)."""
    if not structlog.is_configured():
        configure()
    return structlog.get_logger(logger_name=name)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
