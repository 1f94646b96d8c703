"""The lean S3 client (sdk.stores._s3http, sdk.stores._s3address): addresses, when it steps aside for botocore, region
redirects
and error answers."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import botocore.session
import pytest

from sdk.errors import StorageNotFoundError, TransientStorageError
from sdk.stores import _s3address as s3address
from sdk.stores import _s3http as s3http
from sdk.stores import _sigv4 as sigv4
from sdk.stores._fault import classify

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    """A botocore session with fake credentials, no config file, no endpoint, region eu-west-1."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    return botocore.session.get_session()


def test_aws_addresses_are_virtual_hosted_and_path_style_where_a_bucket_cannot_be_a_host(session: Any) -> None:
    """bucket.s3.<region>.amazonaws.com/key, keys percent-encoded; dotted buckets and custom endpoints by path."""
    client = s3http.create(timeout=5, session=lambda: session)
    assert client is not None
    assert (
        client._url("my-bucket", "a b/c+d.bin", None) == "https://my-bucket.s3.eu-west-1.amazonaws.com/a%20b/c%2Bd.bin"
    )
    assert client._url("my.bucket", "k", None) == "https://s3.eu-west-1.amazonaws.com/my.bucket/k"
    assert client._url("b", "", {"list-type": "2", "prefix": "x y/"}) == (
        "https://b.s3.eu-west-1.amazonaws.com/?list-type=2&prefix=x%20y%2F"
    )
    keys = sigv4.Keys(access_key="a", secret_key="b")
    address = s3address.Address(lambda: keys, endpoint="http://127.0.0.1:9000/", region="us-east-1")
    local = s3http.S3HTTP(address, timeout=5)
    assert local._url("bkt", "dir/obj", None) == "http://127.0.0.1:9000/bkt/dir/obj"


def test_keys_and_region_in_the_environment_need_no_botocore_session(session: Any) -> None:
    """With AWS_ACCESS_KEY_ID/SECRET and a region set and no config file, botocore's session is never made."""
    client = s3http.create(timeout=5, session=lambda: pytest.fail("a botocore session was made"))
    assert client is not None
    signed = client.address.sign("GET", "http://h/b/k", {}, "us-east-1")
    assert signed["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")


def test_keys_in_the_environment_sign_and_send_without_importing_botocore(server: str) -> None:
    """A podtrain process given keys as variables never imports botocore (~65 ms of its start) to make a request."""
    code = (
        "import sys\n"
        "from sdk.stores import _s3http as s3http\n"
        "client = s3http.create(timeout=5, session=lambda: sys.exit('a botocore session was made'))\n"
        "assert client.get('bkt', 'obj')[0] == b'hello'\n"
        "assert not [m for m in sys.modules if m.startswith('botocore')], 'botocore was imported'\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_ENDPOINT_URL": server,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "setting",
    [
        ("env", "HTTPS_PROXY", "http://proxy:3128"),
        ("env", "AWS_USE_FIPS_ENDPOINT", "true"),
        ("config", "s3", "\n    addressing_style = path"),
        ("config", "endpoint_url", " https://minio.example"),
        ("region", "", ""),
    ],
)
def test_what_only_botocore_does_makes_it_step_aside(
    session: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, setting: tuple[str, str, str]
) -> None:
    """Proxies, FIPS, a config file's S3 settings or endpoint, or no region and no endpoint: None (use botocore)."""
    kind, name, value = setting
    if kind == "env":
        monkeypatch.setenv(name, value)
    elif kind == "config":
        (tmp_path / "config").write_text(f"[default]\n{name} ={value}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    else:
        monkeypatch.delenv("AWS_DEFAULT_REGION")
        monkeypatch.delenv("AWS_REGION", raising=False)
    assert s3http.create(timeout=5, session=botocore.session.get_session) is None


class _Store(http.server.BaseHTTPRequestHandler):
    """Answers like S3 for a bucket in us-west-2: a request signed for another region gets 400 and the region."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        scope = self.headers.get("Authorization", "")
        type(self).seen.append(scope.split("Credential=")[1].split("/")[2])
        if "/us-west-2/" not in scope:
            self._answer(400, b"<Error><Code>AuthorizationHeaderMalformed</Code></Error>", region="us-west-2")
        elif self.path.endswith("/missing"):
            self._answer(404, b"<Error><Code>NoSuchKey</Code><Message>The key does not exist</Message></Error>")
        elif self.path.endswith("/busy"):
            self._answer(
                503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            )
        else:
            self._answer(200, b"hello", crc="mnG7TA==")
            if self.path.endswith("/then-hang-up"):
                self.close_connection = True  # no "Connection: close" said: the client believes it may reuse it

    def _answer(self, status: int, body: bytes, *, region: str = "", crc: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if region:
            self.send_header("x-amz-bucket-region", region)
        if crc:
            self.send_header("x-amz-checksum-crc32c", crc)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _keys(session: Any) -> Any:
    frozen = session.get_credentials().get_frozen_credentials()
    keys = sigv4.Keys(access_key=frozen.access_key, secret_key=frozen.secret_key, token=frozen.token)
    return lambda: keys


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Store.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_bucket_in_another_region_is_followed_once_and_remembered(session: Any, server: str) -> None:
    """The first GET is signed for us-east-1, S3 names us-west-2, the retry and every later request use it."""
    client = s3http.S3HTTP(s3address.Address(_keys(session), endpoint=server, region="us-east-1"), timeout=5)
    data, answer = client.get("bkt", "obj")
    assert data == b"hello" and answer["ChecksumCRC32C"] == "mnG7TA==" and answer["ContentLength"] == 5
    assert client.get("bkt", "obj", 0, 2)[0] == b"hello"
    assert _Store.seen == ["us-east-1", "us-west-2", "us-west-2"]


def test_error_answers_carry_the_status_and_s3_s_code_and_sort_like_botocore_s(session: Any, server: str) -> None:
    """404 NoSuchKey is not found (fail fast); 503 SlowDown is transient (retry)."""
    client = s3http.S3HTTP(s3address.Address(_keys(session), endpoint=server, region="us-west-2"), timeout=5)
    with pytest.raises(s3http.S3Error) as missing:
        client.get("bkt", "missing")
    assert (missing.value.status, missing.value.s3_code) == (404, "NoSuchKey")
    assert isinstance(classify(missing.value, url="s3://bkt/missing"), StorageNotFoundError)
    with pytest.raises(s3http.S3Error) as busy:
        client.get("bkt", "busy")
    assert isinstance(classify(busy.value, url="s3://bkt/busy"), TransientStorageError)
    assert client.get("bkt", "obj")[0] == b"hello", "the connection is still good after error answers"


def test_a_kept_alive_connection_the_server_closed_is_replaced_at_once(session: Any, server: str) -> None:
    """The server drops an idle connection silently: the next request goes on a new one, without an error."""
    client = s3http.S3HTTP(s3address.Address(_keys(session), endpoint=server, region="us-west-2"), timeout=5)
    assert client.get("bkt", "then-hang-up")[0] == b"hello"
    assert client.get("bkt", "obj")[0] == b"hello"
    assert len(_Store.seen) == 2


def test_a_key_deleteobjects_could_not_delete_is_raised_as_its_error_on_both_clients(
    session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteObjects answers 200 and lists the keys it could not delete: a recursive delete that left a key behind
    fails (access denied, here) on the lean client and on botocore's, never passes as done."""
    from sdk.errors import StoragePermissionError
    from sdk.stores import _s3botocore

    body = (
        b'<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Error><Key>run/a</Key>'
        b"<Code>AccessDenied</Code><Message>Access Denied</Message></Error></DeleteResult>"
    )
    lean = s3http.S3HTTP(
        s3address.Address(_keys(session), endpoint="http://127.0.0.1:9", region="us-west-2"), timeout=5
    )
    monkeypatch.setattr(lean, "_request", lambda *args, **kwargs: (body, {}))
    library = _s3botocore.BotocoreS3((), timeout=5)
    answer = {"Errors": [{"Key": "run/a", "Code": "AccessDenied", "Message": "Access Denied"}]}
    monkeypatch.setattr(library.client, "delete_objects", lambda **kwargs: answer)
    for client in (lean, library):
        with pytest.raises(s3http.S3Error, match="run/a") as caught:
            client.delete_many("bkt", ["run/a", "run/b"])
        assert isinstance(classify(caught.value, url="s3://bkt/run"), StoragePermissionError)
