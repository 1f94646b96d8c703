"""sdk.log: JSON lines off a terminal, run fields on every line, and secrets never written."""

from __future__ import annotations

import io
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import sdk.log
from sdk.log import REDACTED, get_logger

Configure = Callable[..., io.StringIO]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def configure() -> Iterator[Configure]:
    """configure(**options) -> the buffer podtrain's log now writes to; defaults are restored afterwards."""

    def setup(stream: io.StringIO | None = None, **options: Any) -> io.StringIO:
        stream = io.StringIO() if stream is None else stream
        sdk.log.configure(stream=stream, **options)
        return stream

    yield setup
    sdk.log.configure()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """A random AWS secret key in the environment, as a pod would have it."""
    value = secrets.token_urlsafe(30)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
    return value


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# -- format and fields -------------------------------------------------------------------------------------------
def test_lines_are_json_when_the_stream_is_not_a_terminal(configure: Configure) -> None:
    """With fmt=auto and a pipe or file, each event is one JSON object on its own line."""
    out = configure(fmt="auto")
    log = get_logger("podtrain.test")
    log.info("first", step=1)
    log.warning("second", url="s3://b/k")
    first, second = _lines(out)
    assert (first["event"], first["step"], first["level"]) == ("first", 1, "info")
    assert (second["event"], second["url"], second["level"]) == ("second", "s3://b/k", "warning")
    assert "podtrain.test" in first.values()
    assert first["timestamp"].endswith("Z")


def test_lines_are_readable_text_on_a_terminal(configure: Configure) -> None:
    """With fmt=auto and a terminal, lines are for people, not JSON."""
    out = configure(stream=_Terminal(), fmt="auto")
    get_logger("podtrain.test").info("hello there", step=3)
    text = out.getvalue()
    assert "hello there" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_every_line_carries_run_id_attempt_and_rank(configure: Configure) -> None:
    """run_id, attempt and rank from configure() are on each line, whichever logger wrote it."""
    out = configure(fmt="json", run_id="run-42", attempt=3, rank=1)
    get_logger("a").info("one")
    get_logger("b").error("two")
    for line in _lines(out):
        assert (line["run_id"], line["attempt"], line["rank"]) == ("run-42", 3, 1)


def test_readable_lines_leave_out_run_fields_that_are_not_set(configure: Configure) -> None:
    """On a terminal, a command outside any run prints no ``run_id=None attempt=None``; JSON lines keep every
    key (null), so what reads them sees one shape."""
    out = configure(stream=_Terminal(), fmt="console")
    get_logger("podtrain.test").info("pull.done", files=1)
    assert "pull.done" in out.getvalue() and "None" not in out.getvalue(), out.getvalue()
    out = configure(stream=_Terminal(), fmt="console", run_id="r7", attempt=2)
    get_logger("podtrain.test").info("run.start")
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # colours
    assert "run_id=r7" in text and "attempt=2" in text, text
    out = configure(fmt="json")
    get_logger("podtrain.test").info("pull.done")
    (line,) = _lines(out)
    assert line["run_id"] is None and line["attempt"] is None


def test_run_fields_reach_lines_written_from_other_threads(configure: Configure) -> None:
    """A worker thread's lines carry the same run fields (they are process-wide, not context-local)."""
    out = configure(fmt="json", run_id="run-42", attempt=2, rank=0)
    worker = threading.Thread(target=lambda: get_logger("worker").info("from thread"))
    worker.start()
    worker.join()
    (line,) = _lines(out)
    assert (line["event"], line["run_id"], line["attempt"]) == ("from thread", "run-42", 2)


def test_bind_changes_the_fields_of_later_lines(configure: Configure) -> None:
    """bind(attempt=...) after configure shows on every later line."""
    out = configure(fmt="json", run_id="r", attempt=None)
    log = get_logger("t")
    log.info("before")
    sdk.log.bind(attempt=7)
    log.info("after")
    before, after = _lines(out)
    assert before["attempt"] is None
    assert after["attempt"] == 7


def test_lines_below_the_level_are_dropped(configure: Configure) -> None:
    """level='warning' drops debug and info lines."""
    out = configure(fmt="json", level="warning")
    log = get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    assert [line["event"] for line in _lines(out)] == ["w"]


# -- secrets -----------------------------------------------------------------------------------------------------
@pytest.fixture(params=["json", "console"])
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_secret_from_the_environment_is_masked_in_the_event_text(configure: Configure, secret: str, fmt: str) -> None:
    """The value of AWS_SECRET_ACCESS_KEY inside a message is replaced by ***."""
    out = configure(fmt=fmt)
    get_logger("t").info(f"connecting with key {secret} now")
    get_logger("t").info("positional %s", secret)
    assert secret not in out.getvalue()
    assert f"connecting with key {REDACTED} now" in out.getvalue()


def test_a_secret_is_masked_in_values_lists_and_nested_mappings(configure: Configure, secret: str, fmt: str) -> None:
    """Known secret values are masked wherever they sit in the event's values."""
    out = configure(fmt=fmt)
    get_logger("t").info("x", cmd=f"aws --secret={secret}", argv=["run", secret], env={"VAR": f"a{secret}b"})
    assert secret not in out.getvalue()


def test_values_under_secret_looking_keys_are_masked(configure: Configure, fmt: str) -> None:
    """password=, token=, aws_secret_access_key= hide their values even when the value is not known."""
    out = configure(fmt=fmt)
    get_logger("t").info(
        "x", password="pw-not-in-env-123", aws_session_token="tok-not-in-env-456", nested={"api_key": "k-789xyz"}
    )
    text = out.getvalue()
    for value in ("pw-not-in-env-123", "tok-not-in-env-456", "k-789xyz"):
        assert value not in text


def test_a_secret_in_an_exception_traceback_is_masked(configure: Configure, secret: str, fmt: str) -> None:
    """log.exception renders the traceback, then the secret inside it is masked."""
    out = configure(fmt=fmt)
    try:
        raise RuntimeError(f"signing failed for {secret}")
    except RuntimeError:
        get_logger("t").exception("upload failed")
    text = out.getvalue()
    assert "RuntimeError" in text
    assert "signing failed for" in text
    assert secret not in text


def test_a_secret_in_an_exception_value_is_masked(configure: Configure, secret: str, fmt: str) -> None:
    """An exception passed as a field is rendered with the secret masked."""
    out = configure(fmt=fmt)
    get_logger("t").warning("storage.retry", error=PermissionError(f"bad key {secret}"))
    assert secret not in out.getvalue()


def test_passwords_in_urls_are_masked(configure: Configure, fmt: str) -> None:
    """user:password@ in any URL keeps the user and hides the password, in text and in values."""
    out = configure(fmt=fmt)
    log = get_logger("t")
    log.info("connecting to https://alice:hunter2-pass@proxy.example:3128/")
    log.info("endpoint", url="s3://alice:hunter2-pass@minio.local/bucket/key")
    text = out.getvalue()
    assert "hunter2-pass" not in text
    assert f"alice:{REDACTED}@" in text


def test_a_secret_used_as_a_key_is_masked(configure: Configure, secret: str) -> None:
    """A secret that ends up as a field name or a nested key is masked too."""
    out = configure(fmt="json")
    get_logger("t").info("x", **{secret: 1}, per_key={secret: "value"})
    assert secret not in out.getvalue()


def test_a_secret_inside_an_object_is_masked(configure: Configure, secret: str) -> None:
    """An object whose repr holds a secret (a config, a URL in a namespace, bytes) is masked when rendered."""
    out = configure(fmt="json")
    get_logger("t").info("x", cfg=SimpleNamespace(key=secret), raw=secret.encode(), keys={secret})
    assert secret not in out.getvalue()
