"""sdk.redaction: what is masked, in which forms, and what stays readable."""

from __future__ import annotations

import io
import json
import re
import sys
from urllib.parse import quote, quote_plus

import pytest

from sdk import redaction
from sdk.redaction import REDACTED, RedactingStream, Redactor, redact, redact_value

SECRET = "wJalr/Xut+nFEMI=K7MDENG"


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        quote(SECRET, safe=""),
        re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quote(SECRET, safe="")),  # lower-case hex
        quote_plus(SECRET),
        json.dumps(SECRET)[1:-1].replace("/", "\\/"),
    ],
)
def test_a_known_secret_is_masked_in_every_written_form(form: str) -> None:
    """As is, percent-encoded (either case of hex), JSON-escaped with \\/."""
    assert redact(f"key was {form}!") == f"key was {REDACTED}!"


def test_the_environment_is_read_again_when_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token put into the environment after start-up is masked from then on."""
    assert "late-token-123" in redact("late-token-123")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "late-token-123")
    assert redact("x late-token-123 y") == f"x {REDACTED} y"


def test_a_password_in_a_url_of_the_environment_is_masked_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATABASE_URL's password is known as a secret: masked even where it is quoted without its URL."""
    monkeypatch.setenv("DATABASE_URL", "postgres://app:pa%2Fss-w0rd@db/x")
    assert redact('bucket "app:pa/ss-w0rd@db" is invalid') == f'bucket "app:{REDACTED}@db" is invalid'


def test_remembered_command_line_urls_are_masked() -> None:
    """What the CLI hands over from its argv counts from then on."""
    redaction.remember(["pull", "s3://tok-from-argv-77@bucket/x"])
    assert redact("bucket tok-from-argv-77@bucket") == f"bucket {REDACTED}@bucket"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("s3://user:pw-1@host/x", f"s3://user:{REDACTED}@host/x"),
        ("see https://ghp_abcdef@github.com/r.git now", f"see https://{REDACTED}@github.com/r.git now"),
        ('{"u": "https:\\/\\/u:pw-2@h\\/x"}', f'{{"u": "https:\\/\\/u:{REDACTED}@h\\/x"}}'),
        ("next=https%3A%2F%2Fu%3Apw-3%40host%2F", f"next=https%3A%2F%2F{REDACTED}%40host%2F"),
        (
            "?X-Amz-Signature=ab12&X-Amz-Credential=AKIA%2F1&a=b",
            f"?X-Amz-Signature={REDACTED}&X-Amz-Credential={REDACTED}&a=b",
        ),
        ("X-Amz-Security-Token=abc&Signature=def", f"X-Amz-Security-Token={REDACTED}&Signature={REDACTED}"),
        ("?access_token=abc&sig=def", f"?access_token={REDACTED}&sig={REDACTED}"),
        ("aws_secret_access_key = abc/def\nregion = x", f"aws_secret_access_key = {REDACTED}\nregion = x"),
        ("Authorization: AWS4-HMAC-SHA256 Credential=A/B, Signature=c\nHost: h", f"Authorization: {REDACTED}\nHost: h"),
        ("x-amz-security-token: abc def", f"x-amz-security-token: {REDACTED} def"),
        ('{"SessionToken": "abc", "n": 1}', f'{{"SessionToken": "{REDACTED}", "n": 1}}'),
        ("{'password': 'a b'}", f"{{'password': '{REDACTED}'}}"),
        ("curl -H 'Authorization: Bearer abcdefgh'", f"curl -H 'Authorization: {REDACTED}'"),
    ],
)
def test_urls_user_info_and_secret_parameters_are_masked(text: str, masked: str) -> None:
    assert redact(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "SignatureDoesNotMatch: The request signature we calculated does not match",
        "ExpiredToken: The provided token has expired.",
        "num_tokens=1234 tokens_per_s=5.5 AWSAccessKeyId=AKIAEXAMPLE",
        "s3://bucket/key@v2 git@github.com:org/repo mailto:a@b.example",
        "checkpoint_uri=s3://bucket/run key=data/train-000.parquet",
    ],
)
def test_what_is_no_secret_stays_readable(text: str) -> None:
    assert redact(text) == text


def test_redaction_is_idempotent() -> None:
    """Redacting what is redacted changes nothing: writers may apply it twice (values, then the whole line)."""
    once = redact(f'token={SECRET} https://u:p@h Authorization: x\n{{"password": "y"}}')
    assert redact(once) == once
    assert redact(json.dumps({"m": once})) == json.dumps({"m": once})


def test_values_keep_numbers_and_mask_strings_under_secret_keys() -> None:
    """Metrics named like tokens keep their numbers; a string under a secret key is masked whole."""
    value = {"tokens_per_s": 12.5, "num_tokens": 7, "tokenizer": "bpe", "api_key": "k", "nested": [{"pw": SECRET}]}
    assert redact_value(value) == {
        "tokens_per_s": 12.5,
        "num_tokens": 7,
        "tokenizer": "bpe",
        "api_key": REDACTED,
        "nested": [{"pw": REDACTED}],
    }


def test_an_explicit_redactor_knows_only_its_secrets() -> None:
    assert Redactor(["only-this-one"]).text(f"only-this-one {SECRET}") == f"{REDACTED} {SECRET}"


def test_the_stream_masks_a_secret_written_in_pieces() -> None:
    """Held until the line ends (or a flush): a secret split across writes is still masked."""
    out = io.StringIO()
    stream = RedactingStream(out)
    stream.write("key " + SECRET[:5])
    assert out.getvalue() == ""
    stream.write(SECRET[5:] + " done\nnext ")
    assert out.getvalue() == f"key {REDACTED} done\n"
    stream.write("\rbar " + SECRET)
    stream.flush()
    assert out.getvalue() == f"key {REDACTED} done\nnext \rbar {REDACTED}"


def test_the_streams_are_restored_after_the_block() -> None:
    before = sys.stdout, sys.stderr
    with redaction.redacted_streams():
        assert isinstance(sys.stdout, RedactingStream)
        assert isinstance(sys.stderr, RedactingStream)
    assert (sys.stdout, sys.stderr) == before
