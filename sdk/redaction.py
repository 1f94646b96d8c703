"""Redaction: the one function every writer of podtrain passes its text through, so no secret leaves the process.

:func:`redact` masks, in any text, with ``***``:

* every *known secret value* wherever it appears — the values of secret-looking environment variables
  (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``*_PASSWORD``, ``*_API_KEY``…), the passwords and tokens
  in the user-info of any URL in the environment or on the command line (:func:`remember`) — as is,
  percent-encoded (either case of hex, ``+`` for spaces), JSON-escaped (``\\/`` too) and HTML-escaped;
* the *user-info of any URL*: ``scheme://user:pw@host`` keeps the user (``user:***@``), ``scheme://token@host``
  loses it whole (``***@``); in JSON-escaped (``https:\\/\\/``) and percent-encoded (``https%3A%2F%2F``) URLs too;
* *secret parameters*: a name that ends in a secret word (``X-Amz-Signature``, ``X-Amz-Credential``,
  ``X-Amz-Security-Token``, ``Signature``, ``access_token``, ``sig``, ``aws_secret_access_key``, ``password``…)
  followed by ``=`` (query strings, config files, ``key=value`` logs), a quoted such name followed by ``:`` and a
  quoted string (JSON, Python reprs), such a header-style name (``X-Amz-Security-Token: …``,
  ``aws_session_token: …``) followed by ``:``, ``Authorization:``/``Cookie:`` headers to the end of the line, and
  ``Bearer`` tokens. Names are matched by their ending so that ``num_tokens=``, ``SignatureDoesNotMatch:`` and
  ``AWSAccessKeyId=`` stay readable.

:func:`redact_value` does the same over a JSON-like value (keys and string values; a string under a
secret-looking key is masked whole; numbers, booleans and None are kept). :class:`RedactingStream` wraps a text
stream (the CLI wraps stdout and stderr), so every byte written through it is redacted a line at a time.

The process's redactor is built from ``os.environ`` and what :func:`remember` was given, and rebuilt only when
either changed. This module imports only the standard library's light modules: the error and CLI paths use it
without loading structlog.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any
from urllib.parse import quote, quote_plus, unquote

__all__ = [
    "REDACTED",
    "RedactingStream",
    "Redactor",
    "current",
    "redact",
    "redact_value",
    "redacted_streams",
    "remember",
    "secret_name",
]

REDACTED = "***"
MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask half of every line

# Variable and field names that hold a secret (matched on the lower-cased name). Not "tokens"/"tokenizer"
# (training metrics), not access key *ids*.
_SECRET_NAME = re.compile(
    r"secret|passw|token(?!s|iz)|credential|api[_-]?key|private[_-]?key|authorization|signature|session[_-]?key"
    r"|access[_-]?key(?![_-]?id)|account[_-]?key|connection[_-]?string|cookie"
)
# In free text, a parameter is secret when its name *ends* in one of these words followed by = or :
# (Signature=, X-Amz-Credential=, aws_secret_access_key =, "SessionToken": …); not SignatureDoesNotMatch, not
# num_tokens, not AWSAccessKeyId. Searched in the lower-cased text, without IGNORECASE (10-30x slower).
_WORD = (
    r"secret|token|passw(?:or)?d|passphrase|credentials?|signature|sig|api[_-]?key|apikey|private[_-]?key"
    r"|session[_-]?key|access[_-]?key|account[_-]?key|authorization|auth|cookie"
)
_CANDIDATE = re.compile(rf"""(?:{_WORD})(?P<q>["']?)[ \t]*(?P<sep>[=:])[ \t]*""")
_HINTS = ("secret", "token", "pass", "credential", "sig", "key", "auth", "cookie")
_WHOLE_LINE_NAMES = ("authorization", "proxy-authorization", "cookie", "set-cookie")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
_NAME_MAX = 200  # a parameter name is not looked for further back: a line is scanned in linear time
_ESCAPED_BREAK = r"(?!\\[nrt])"  # in JSON-rendered text a value ends where an escaped line break starts
_QUOTED_AT = re.compile(r"""["](?:[^"\\\n]|\\.)*["]|'[^'\n]*'""")
_WORD_AT = re.compile(rf"""(?:{_ESCAPED_BREAK}[^\s"'&;,<>()\[\]{{}}])+""")  # name=value
_HEADER_AT = re.compile(rf"""(?:{_ESCAPED_BREAK}[^\s"'<>])+""")  # X-Amz-Security-Token: value
_LINE_AT = re.compile(rf"""(?:{_ESCAPED_BREAK}[^\r\n"'<>])+""")  # Authorization: the rest of the line
_BEARER = re.compile(r"\b(?:Bearer|bearer|BEARER)[ \t]+(?P<w>[A-Za-z0-9._~+/=-]{6,})")
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*:(?://|\\/\\/))(?P<user>[^\s/?#@:\"'<>\\]*)(?P<pw>:[^\s/?#\"'<>\\]*)?@"
)
_ENCODED_USERINFO = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*%3A%2F%2F)(?P<info>(?:[^\s/?#&%]|%(?!40|2F)[0-9A-F]{2})+)%40", re.I
)


def secret_name(name: str) -> bool:
    """Whether a variable or field called ``name`` holds a secret (``AWS_SESSION_TOKEN``, ``password``…)."""
    return _SECRET_NAME.search(name.lower()) is not None


def _mask_params(text: str, low: str) -> str:
    """``text`` with the values of its secret parameters masked (``low``: ``text`` lower-cased, same length)."""
    out, done = [], 0
    for m in _CANDIDATE.finditer(low):
        start = m.start()
        if start < done:
            continue  # inside a value masked already
        stop = max(0, start - _NAME_MAX)
        while start > stop and low[start - 1] in _NAME_CHARS:
            start -= 1
        name, quote_char, at = low[start : m.start("q")], m["q"], m.end()
        value = None
        if m["sep"] == "=" and not quote_char:  # name=value
            value = _QUOTED_AT.match(text, at) or _WORD_AT.match(text, at)
        elif quote_char:  # "name": "value"
            if start and low[start - 1] == quote_char and m["sep"] == ":":
                value = _QUOTED_AT.match(text, at)
        elif name in _WHOLE_LINE_NAMES:  # Authorization: ...
            value = _LINE_AT.match(text, at)
        elif "-" in name or "_" in name:  # X-Amz-Security-Token: value
            value = _HEADER_AT.match(text, at)
        if value is None:
            continue
        quoted = value[0][:1] in ("'", '"')
        masked = f"{value[0][0]}{REDACTED}{value[0][0]}" if quoted else REDACTED
        out += [text[done:at], masked]
        done = value.end()
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


def _userinfo_secrets(text: str) -> Iterator[str]:
    """The passwords (and user-only tokens) in the user-info of every URL in ``text``, decoded and as written."""
    for m in _URL_USERINFO.finditer(text):
        secret = m["pw"][1:] if m["pw"] else m["user"]
        yield from (secret, unquote(secret))


def _variants(secret: str) -> set[str]:
    """The forms a secret is written in: as is, percent-encoded, JSON-escaped, HTML-escaped; lines of a long one."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), _html_escaped(secret)}
    escaped = json.dumps(secret)[1:-1]
    forms |= {escaped, escaped.replace("/", "\\/"), json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms |= {re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), f) for f in list(forms) if "%" in f}
    if "\n" in secret:
        forms |= {line.strip() for line in secret.splitlines() if len(line.strip()) >= 2 * MIN_SECRET_LEN}
    return {f for f in forms if len(f) >= MIN_SECRET_LEN}


def _html_escaped(text: str) -> str:
    """``html.escape(text)`` without importing :mod:`html` (and its entity tables) into every command."""
    for char, entity in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#x27;")):
        text = text.replace(char, entity)
    return text


class Redactor:
    """Masks known secret values (``secrets``) and the patterns of the module docstring."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = {v for s in secrets if s and len(s) >= MIN_SECRET_LEN for v in _variants(s)}
        self._secrets = sorted(values, key=len, reverse=True)  # longest first: a secret holding another goes whole

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> Redactor:
        """Secret-looking variables' values, the user-info secrets of every variable's URLs, and ``extra``."""
        environ = os.environ if environ is None else environ
        found = [value for name, value in environ.items() if secret_name(name)]
        found += [s for value in environ.values() if "@" in value for s in _userinfo_secrets(value)]
        return cls([*found, *extra])

    def text(self, text: str) -> str:
        """``text`` with every secret masked."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "@" in text and ("://" in text or ":\\/\\/" in text):
            text = _URL_USERINFO.sub(_mask_userinfo, text)
        if "%40" in text:
            text = _ENCODED_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}%40", text)
        low = text.lower()
        if any(hint in low for hint in _HINTS):
            if len(low) != len(text):  # a character whose lower case is longer: find them in a mapped copy
                low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
            text = _mask_params(text, low)
        if "earer" in text:
            text = _BEARER.sub(lambda m: m[0][: m.start("w") - m.start()] + REDACTED, text)
        return text

    def value(self, value: Any, *, key: str = "", render: bool = False) -> Any:
        """``value`` (JSON-like) with every string redacted and strings under secret-looking keys masked whole.

        Numbers, booleans and None are kept. Other objects are kept as they are, or with ``render`` turned into
        their (redacted) text — a log line renders them anyway.
        """
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if key and secret_name(key) and value not in ("", b""):
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.text(str(k)): self.value(v, key=str(k), render=render) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v, key=key, render=render) for v in value]
        if not render:
            return value
        if isinstance(value, (bytes, bytearray)):
            return self.text(bytes(value).decode("utf-8", "replace"))
        return self.text(repr(value) if isinstance(value, BaseException) else str(value))


def _mask_userinfo(m: re.Match[str]) -> str:
    if m["pw"] is not None:
        return f"{m['scheme']}{m['user']}:{REDACTED}@"
    return f"{m['scheme']}{REDACTED}@"


# -- the process's redactor ------------------------------------------------------------------------------------
class _Known:
    """The secrets the process knows of: its environment and what :func:`remember` was given; one redactor for
    them, rebuilt only when either changed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.remembered: list[str] = []
        self.cached: tuple[Any, int, Redactor] | None = None

    def redactor(self) -> Redactor:
        data = getattr(os.environ, "_data", None)  # CPython's own dict: compared, not re-read, on every call
        cached = self.cached
        if cached is not None and data is not None and cached[1] == len(self.remembered) and cached[0] == data:
            return cached[2]
        with self.lock:
            built = Redactor.from_environ(extra=list(self.remembered))
            self.cached = (dict(data) if data is not None else None, len(self.remembered), built)
        return built


_known = _Known()


def remember(texts: Iterable[str]) -> None:
    """Add the user-info secrets of the URLs in ``texts`` (a command line) to what is masked from now on."""
    found = [s for text in texts if "@" in text for s in _userinfo_secrets(text)]
    if found:
        with _known.lock:
            _known.remembered.extend(found)


def current() -> Redactor:
    """The redactor for the environment as it is now (rebuilt only when a variable or :func:`remember` changed)."""
    return _known.redactor()


def redact(text: str) -> str:
    """``text`` with every secret the process knows of, every URL's user-info and secret parameter masked."""
    return current().text(text)


def redact_value(value: Any) -> Any:
    """A JSON-like ``value`` with :func:`redact` applied to every key and string (see :meth:`Redactor.value`)."""
    return current().value(value)


# -- streams ---------------------------------------------------------------------------------------------------
class RedactingStream:
    """A text stream that redacts what is written to ``stream``, a line at a time.

    Text is held until a line ends (``\\n`` or ``\\r``, as a progress bar ends its lines) or :meth:`flush`, so a
    secret written in two pieces is still seen whole. Everything else (``isatty``, ``fileno``, ``encoding``…)
    is the wrapped stream's.
    """

    HOLD = 1 << 16  # a line longer than this is written out without waiting for its end

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._pending = ""
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            held = self._pending + text
            cut = max(held.rfind("\n"), held.rfind("\r")) + 1
            if not cut and len(held) < self.HOLD:
                self._pending = held
                return len(text)
            done, self._pending = (held[:cut], held[cut:]) if cut else (held, "")
            self.stream.write(redact(done))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                held, self._pending = self._pending, ""
                self.stream.write(redact(held))
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def redacted_streams(*, restore: bool = True) -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` redacted for the block (and after it, with ``restore=False``: for a
    process about to exit, so the interpreter's last words — a traceback — are redacted too)."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if restore:
            sys.stdout, sys.stderr = saved
