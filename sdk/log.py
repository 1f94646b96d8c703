"""Logging: structlog, JSON lines off a terminal, readable lines on one; secrets never reach a line.

Every line carries ``run_id``, ``attempt`` and ``rank`` (bound once by :func:`configure`, visible from every
thread). The redaction processor runs last before rendering, after exceptions are formatted, so a secret in a
traceback is caught too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import IO, Any, TextIO

import structlog

__all__ = ["REDACTED", "SecretRedactor", "bind", "configure", "get_logger"]

REDACTED = "***"
_SECRET_KEY = re.compile(
    r"secret|passw|token|credential|api[_-]?key|private[_-]?key|authorization|signature|session[_-]?key",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_MIN_SECRET_LEN = 6

_static: dict[str, Any] = {"run_id": None, "attempt": None, "rank": 0}


class SecretRedactor:
    """A structlog processor that replaces secrets with ``***``.

    It masks: values under keys that name a secret (``password``, ``token``, ``aws_secret_access_key``…),
    the password part of URLs (``s3://user:pw@host``), and any known secret value wherever it appears in
    a string (by default the values of environment variables whose names look secret, such as
    ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN``).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = {s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted(values, key=len, reverse=True)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SecretRedactor:
        """Collect the values of secret-looking variables (names matching the secret-key pattern)."""
        environ = os.environ if environ is None else environ
        return cls(value for name, value in environ.items() if _SECRET_KEY.search(name))

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        cleaned = {self.scrub(str(key)): self._clean(str(key), value) for key, value in event.items()}
        event.clear()
        event.update(cleaned)
        return event

    def _clean(self, key: str, value: Any) -> Any:
        if _SECRET_KEY.search(key) and value not in (None, "", False):
            return REDACTED
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {self.scrub(str(k)): self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(key, v) for v in value]
        if isinstance(value, (bytes, bytearray)):
            return self.scrub(bytes(value).decode("utf-8", "replace"))
        # Anything else (objects, sets, exceptions) is rendered here, so its text is scrubbed before output.
        return self.scrub(repr(value) if isinstance(value, BaseException) else str(value))

    def scrub(self, text: str) -> str:
        """Mask every known secret value and URL password in ``text``."""
        text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def _add_run_fields(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in _static.items():
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
            _add_run_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor or SecretRedactor.from_environ(),
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
