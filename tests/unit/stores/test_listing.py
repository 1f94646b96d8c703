"""sdk.stores._listing's hand-written first request: light to import, signed as sent, read and continued by
sdk.stores._s3http."""

from __future__ import annotations

import datetime
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from sdk.stores import _listing as listing
from sdk.stores import _sigv4 as sigv4

ROOT = Path(__file__).resolve().parents[2]
NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _page(keys: list[str], token: str = "") -> bytes:
    items = "".join(
        f"<Contents><Key>{k}</Key><Size>{len(k)}</Size><ETag>&quot;e-{k}&quot;</ETag></Contents>" for k in keys
    )
    more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>" if token else ""
    head = more or "<IsTruncated>false</IsTruncated>"
    return f'<ListBucketResult xmlns="{NS}">{head}{items}</ListBucketResult>'.encode()


class _Bucket(http.server.BaseHTTPRequestHandler):
    """A bucket answering ListObjectsV2 in two pages (or ``status`` for every request), recording each request."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []
    status: ClassVar[int] = 200
    token: ClassVar[str] = "page-2"  # as written in the XML

    def do_GET(self) -> None:
        type(self).seen.append((self.path, dict(self.headers.items())))
        query = parse_qs(urlsplit(self.path).query)
        if type(self).status != 200:
            body = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
        elif "continuation-token" in query:
            body = _page(["data/c.bin"])
        else:
            body = _page(["data/a.bin", "data/b%20b.bin"], token=type(self).token)
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """The fake bucket's endpoint, with keys in the environment (so the head start runs)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bucket)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Bucket.seen, _Bucket.status, _Bucket.token = [], 200, "page-2"
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield endpoint
    httpd.shutdown()


def test_importing_it_loads_no_http_client_tls_xml_or_dataclasses() -> None:
    """Everything imported before the request leaves is on a warm pull's critical path: only light modules."""
    code = (
        "import sys\n"
        "import sdk.stores._listing\n"
        "heavy = {'http.client', 'ssl', 'xml.etree.ElementTree', 'dataclasses', 'structlog', 'botocore'}\n"
        "heavy |= {'sdk.stores._s3http'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_request_is_on_the_wire_when_start_returns_and_signed_as_it_was_sent(bucket: str) -> None:
    """The hand-written GET carries a SigV4 signature over exactly its own path, query and headers."""
    listing.start("s3://bkt/data")
    items = listing.take("bkt", "data/")
    path, headers = _Bucket.seen[0]
    assert path == "/bkt/?list-type=2&prefix=data%2F&encoding-type=url"
    moment = datetime.datetime.strptime(headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    keys = sigv4.Keys(access_key="AKIDEXAMPLE", secret_key="secret")
    expected = sigv4.sign(
        "GET", bucket + path, {"Accept-Encoding": "identity", "Host": headers["Host"]}, keys, "us-east-1", now=moment
    )
    assert headers["Authorization"] == expected["Authorization"]
    assert items is not None


def test_start_waits_until_the_request_is_sent(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """start() returns once the listing's thread has written its request (so no import competes with it)."""
    sent: list[bool] = []
    real = listing._Listing._send

    def spy(self: Any) -> Any:
        connection = real(self)
        sent.append(True)
        return connection

    monkeypatch.setattr(listing._Listing, "_send", spy)
    listing.start("s3://bkt/data")
    assert sent == [True]
    listing.take("bkt", "data/")


def test_the_first_answer_is_read_and_the_next_pages_are_fetched_after_it(bucket: str) -> None:
    """Page one comes from the hand-written request; page two is asked for with its continuation token, once."""
    listing.start("s3://bkt/data/")
    items = listing.take("bkt", "data/")
    assert items is not None
    assert [(i["Key"], i["Size"], i["ETag"]) for i in items] == [
        ("data/a.bin", 10, '"e-data/a.bin"'),
        ("data/b b.bin", 14, '"e-data/b%20b.bin"'),
        ("data/c.bin", 10, '"e-data/c.bin"'),
    ]
    assert len(_Bucket.seen) == 2 and "continuation-token=page-2" in _Bucket.seen[1][0]
    assert listing.take("bkt", "data/") is None, "used once"


def test_an_error_answer_leaves_no_head_start(bucket: str) -> None:
    """A 403 to the first request is dropped: take() has nothing, and the normal listing reports the error."""
    _Bucket.status = 403
    listing.start("s3://bkt/data")
    assert listing.take("bkt", "data/") is None
    assert len(_Bucket.seen) == 1


def test_an_unreachable_endpoint_leaves_no_head_start(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection is dropped at once."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    listing.start("s3://bkt/data")
    assert listing.take("bkt", "data/") is None


def test_a_continuation_token_the_quick_search_cannot_read_is_taken_from_the_parsed_page(bucket: str) -> None:
    """A token written with an XML entity is not guessed: page two is asked for with the parsed token, once."""
    _Bucket.token = "page&amp;2"
    listing.start("s3://bkt/data/")
    items = listing.take("bkt", "data/")
    assert items is not None and [i["Key"] for i in items] == ["data/a.bin", "data/b b.bin", "data/c.bin"]
    assert len(_Bucket.seen) == 2 and "continuation-token=page%262" in _Bucket.seen[1][0]
