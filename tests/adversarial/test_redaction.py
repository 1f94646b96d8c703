"""Secrets never leave the process: every byte podtrain writes is grepped for planted secrets.

The real console script runs as a subprocess with planted values in ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` and in URLs' user-info, against moto behind the fault proxy, whose error answers quote the
token (raw, percent-encoded, JSON-escaped), a URL with a password, a URL with a token as its user, and signed-URL
parameters. Then stdout, stderr, the termination message, ``run.json`` and the attempt records in the artifact
store, the metrics file and every other file in the output folder are read back: no form of any planted secret
may appear, and the redaction marker must appear where it was (so the check is not vacuous).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.conftest import BUCKET
from tests.faultproxy import FaultProxy

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
MARK = "***"
RUN_ID = "redact-run"

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzPLANTEDKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjPLANTED/SessionToken+Value=="
URL_PASSWORD = "hunter2-planted-pw"
URL_TOKEN = "ghp0plantedurltoken77"
SIGNATURE = "5f1c0ffee0ddba11a9e0c4b7e2d1f00d0123456789abcdef0123456789abcd"
AUTH_SIGNATURE = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
CONFIG_SECRET = "cfg+Secret/From+A+Credentials+File"
PLANTED = (SECRET_KEY, SESSION_TOKEN, URL_PASSWORD, URL_TOKEN, SIGNATURE, AUTH_SIGNATURE, CONFIG_SECRET)

# What a talkative server (or a proxy in front of it) says when it refuses a request.
SERVER_MESSAGE = (
    f"The security token included in the request is invalid: {SESSION_TOKEN}. "
    f"Key tried: {quote(SECRET_KEY, safe='')}; as JSON {json.dumps({'SecretAccessKey': SECRET_KEY})[1:-1]}"
    f" and {json.dumps(SECRET_KEY).replace('/', chr(92) + '/')}; redirected from https://admin:{URL_PASSWORD}"
    f"@internal.example/x and https://{URL_TOKEN}@git.example/repo.git, signed as "
    f"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20240101"
    f"&X-Amz-Signature={SIGNATURE}&X-Amz-Security-Token={quote(SESSION_TOKEN, safe='')}; "
    f"Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20240101/us-east-1/s3/aws4_request, "
    f"SignedHeaders=host, Signature={AUTH_SIGNATURE}\naws_secret_access_key = {CONFIG_SECRET}\n"
)


def _forms(secret: str) -> set[str]:
    """The ways a secret can be written: as is, percent-encoded (both cases of hex), JSON-escaped."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    forms |= {f.replace(f"%{h}", f"%{h.lower()}") for f in list(forms) for h in ("2F", "2B", "3D")}
    forms |= {json.dumps(secret)[1:-1].replace("/", "\\/")}
    return forms


def _leaks(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    return sorted({form for secret in PLANTED for form in _forms(secret) if form in text})


def assert_clean(what: str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    leaks = _leaks(raw)
    assert not leaks, f"{what} leaks {leaks}:\n{raw.decode('utf-8', 'replace')}"


def _files(folder: Path) -> Iterator[Path]:
    return (path for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink())


@pytest.fixture
def proxy(fault_proxy: Callable[[str], FaultProxy]) -> FaultProxy:
    """moto behind the fault proxy; the environment (and so the subprocess's) points at it."""
    return fault_proxy("s3")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_SESSION_TOKEN=SESSION_TOKEN, PODTRAIN_LOG_FORMAT="json")
    env.pop("PODTRAIN_TERMINATION_LOG", None)
    env.update(extra)
    return env


def _podtrain(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PODTRAIN, *args], env=env, cwd=cwd, capture_output=True, timeout=180)


def _store_bytes(prefix: str) -> dict[str, bytes]:
    """Every object under ``s3://BUCKET/<prefix>``, read directly (not through podtrain's writers)."""
    from sdk.stores.store import open_store

    store = open_store(f"s3://{BUCKET}/{prefix}")
    return {name: store.get(name) for name in store.walk()}


# -- podtrain run ---------------------------------------------------------------------------------------------
CHILD = """
import os
from sdk.log import get_logger
from sdk.data.outputs import append_metrics
token = os.environ["AWS_SESSION_TOKEN"]
url = "https://admin:" + os.environ["DB_PASSWORD"] + "@internal.example/x"
get_logger("child").info("child.says " + token, url=url)
append_metrics(os.environ["PODTRAIN_OUTPUT_DIR"], 1, {"loss": 0.5, "note": "token " + token, "from": url, token: 1})
"""


def _run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = dict(
        PODTRAIN_RUN_ID=RUN_ID,
        PODTRAIN_ATTEMPT="1",
        PODTRAIN_GRACE_SECONDS="20",
        # The password rides in the checkpoint URI as a secret parameter, in a prefix the store can write (the
        # supervisor probes the checkpoint store before anything starts; user-info would name no bucket).
        PODTRAIN_CHECKPOINT_URI=f"s3://{BUCKET}/ckpt-password={URL_PASSWORD}",
        PODTRAIN_ARTIFACT_URI=f"s3://{BUCKET}/artifacts",
        PODTRAIN_OUTPUT_DIR=str(tmp_path / "out"),
        PODTRAIN_TERMINATION_LOG=str(tmp_path / "termination-log"),
        DB_PASSWORD=URL_PASSWORD,
    )
    return _env(**{**settings, **extra})


def _check_run_outputs(tmp_path: Path, out: subprocess.CompletedProcess[bytes]) -> dict[str, bytes]:
    """Every byte the run wrote, checked clean; returned by name for the marker checks."""
    written = {"stdout": out.stdout, "stderr": out.stderr}
    termination = tmp_path / "termination-log"
    assert termination.exists(), out.stderr.decode()
    written["termination-log"] = termination.read_bytes()
    for path in _files(tmp_path / "out") if (tmp_path / "out").exists() else ():
        written[f"out/{path.relative_to(tmp_path / 'out')}"] = path.read_bytes()
    for name, data in _store_bytes(f"artifacts/{RUN_ID}").items():
        written[f"store:{name}"] = data
    for what, data in written.items():
        assert_clean(what, data)
    return written


def test_a_run_writes_no_planted_secret_anywhere(proxy: FaultProxy, tmp_path: Path) -> None:
    """A run whose output push is refused by a server quoting the token, whose checkpoint URI carries a
    password, and whose child logs and records metrics holding secrets: no byte written holds a secret."""
    proxy.fail(403, message=SERVER_MESSAGE, method="PUT", path=r"/artifacts/.*metrics", times=None)
    out = _podtrain("run", "--", sys.executable, "-c", CHILD, env=_run_env(tmp_path), cwd=tmp_path)
    written = _check_run_outputs(tmp_path, out)
    message = json.loads(written["termination-log"])["message"]
    assert "outputs not pushed" in message and MARK in message, message
    record = json.loads(written["store:run.json"])
    assert record["attempts"][0]["message"].startswith(message.removesuffix("…"))  # the same sentence, maybe cut
    assert MARK in json.loads(written["store:.podtrain/attempt-0001.json"])["message"]
    assert MARK in written["stderr"].decode()
    metrics = json.loads(written["out/metrics.jsonl"])
    assert metrics["note"] == f"token {MARK}" and metrics["from"] == f"https://admin:{MARK}@internal.example/x"
    assert metrics["loss"] == 0.5


def test_a_run_whose_data_uri_holds_a_token_writes_it_nowhere(proxy: FaultProxy, tmp_path: Path) -> None:
    """The data pull fails before the child on a URL with a token as its user-info: stderr, the termination
    message and the record say why without the token."""
    env = _run_env(tmp_path, PODTRAIN_DATA_URI=f"s3://{URL_TOKEN}@{BUCKET}/data/", PODTRAIN_DATA_DIR="data")
    out = _podtrain("run", "--", sys.executable, "-c", "pass", env=env, cwd=tmp_path)
    assert out.returncode != 0
    written = _check_run_outputs(tmp_path, out)
    assert_clean("data dir", b"".join(p.read_bytes() for p in _files(tmp_path)))
    message = json.loads(written["termination-log"])["message"]
    assert "data pull failed" in message and f"s3://{MARK}@" in message, message
    assert f"s3://{MARK}@" in json.loads(written["store:run.json"])["attempts"][0]["message"]


def test_a_run_refused_for_its_config_writes_no_password(proxy: FaultProxy, tmp_path: Path) -> None:
    """A configuration error naming a URL with a password (exit 2, before any child): stderr and the
    termination message mask it."""
    env = _run_env(tmp_path, PODTRAIN_CHECKPOINT_URI=f"nosuchscheme://admin:{URL_PASSWORD}@host/x")
    out = _podtrain("run", "--", sys.executable, "-c", "pass", env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr.decode()
    assert_clean("stdout", out.stdout)
    assert_clean("stderr", out.stderr)
    line = (tmp_path / "termination-log").read_bytes()
    assert_clean("termination-log", line)
    assert f"admin:{MARK}@" in out.stderr.decode() and f"admin:{MARK}@" in json.loads(line)["message"]


# -- the other commands -----------------------------------------------------------------------------------------
COMMANDS = {
    "pull": lambda root: ["pull", f"s3://{BUCKET}/data/", "--dest", str(root / "dest")],
    "push": lambda root: ["push", str(root / "out"), f"s3://{BUCKET}/pushed"],
    "checkpoints-list": lambda root: ["checkpoints", "list", f"s3://{BUCKET}/ckpt"],
    "checkpoints-verify": lambda root: ["checkpoints", "verify", f"s3://{BUCKET}/ckpt"],
    "record": lambda root: ["record", f"s3://{BUCKET}/artifacts/{RUN_ID}"],
}


def _workspace(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.txt").write_text("weights\n")
    return tmp_path


def _check_command(tmp_path: Path, out: subprocess.CompletedProcess[bytes]) -> None:
    assert out.returncode != 0, out.stdout.decode()
    assert_clean("stdout", out.stdout)
    assert_clean("stderr", out.stderr)
    for path in _files(tmp_path):
        assert_clean(str(path), path.read_bytes())
    assert MARK in out.stderr.decode() + out.stdout.decode(), out.stderr.decode()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_server_error_quoting_secrets_is_masked_in_every_command(
    proxy: FaultProxy, tmp_path: Path, command: str
) -> None:
    """Every request is refused with a body quoting the token, the key, passwords and signatures: the
    command fails with its one-line error, and no byte it writes holds any of them."""
    proxy.fail(403, message=SERVER_MESSAGE, match=lambda method, target: method != "HEAD", times=None)  # HEAD: no body
    root = _workspace(tmp_path)
    out = _podtrain(*COMMANDS[command](root), env=_env(), cwd=root)
    _check_command(root, out)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("userinfo", ["user:" + URL_PASSWORD, URL_TOKEN])
def test_a_url_with_user_info_is_masked_in_every_command(
    proxy: FaultProxy, tmp_path: Path, command: str, userinfo: str
) -> None:
    """A URL given with a password or a token as its user-info: whatever the command says about it hides it."""
    root = _workspace(tmp_path)
    args = [arg.replace(f"s3://{BUCKET}/", f"s3://{userinfo}@{BUCKET}/") for arg in COMMANDS[command](root)]
    out = _podtrain(*args, env=_env(), cwd=root)
    secret = userinfo.rpartition(":")[2].encode()
    assert secret not in out.stdout + out.stderr, "the URL's secret is echoed by the command"
    _check_command(root, out)


def test_a_usage_error_echoing_a_secret_is_masked(tmp_path: Path) -> None:
    """argparse's own message quotes the bad value: it goes through the same redaction."""
    out = _podtrain("smoke", "--gpus", f"https://admin:{URL_PASSWORD}@host/x", env=_env(), cwd=tmp_path)
    assert out.returncode == 2
    assert_clean("stderr", out.stderr)
    assert f"admin:{MARK}@" in out.stderr.decode()


@pytest.mark.parametrize("as_json", [False, True])
def test_a_stored_record_holding_secrets_is_printed_masked(proxy: FaultProxy, tmp_path: Path, as_json: bool) -> None:
    """`podtrain record` of a run.json written by hand (or by an older podtrain) with secrets in it: the table and
    the JSON it prints hide them."""
    from sdk.stores.store import open_store

    entry = {"attempt": 1, "outcome": "failed", "exit_code": 1, "node": f"https://{URL_TOKEN}@node.example/x"}
    stored = {"run_id": RUN_ID, "attempts": [{**entry, "message": SERVER_MESSAGE}]}
    open_store(f"s3://{BUCKET}/artifacts/{RUN_ID}").put("run.json", json.dumps(stored).encode())
    args = ["record", f"s3://{BUCKET}/artifacts/{RUN_ID}"] + (["--json"] if as_json else [])
    out = _podtrain(*args, env=_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert_clean("stdout", out.stdout)
    assert_clean("stderr", out.stderr)
    assert f"https://{MARK}@node.example/x" in out.stdout.decode()


def test_the_push_record_never_holds_a_secret_of_the_destination_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination whose URL holds a secret value: ``.podtrain-push.jsonl`` records it masked, and a second push
    still recognises what was sent (nothing sent twice)."""
    from sdk.data.push import PUSH_INDEX, push

    secret = "pushSecretValue0123456789"
    monkeypatch.setenv("PODTRAIN_TEST_SECRET_TOKEN", secret)
    source = tmp_path / "out"
    source.mkdir()
    (source / "metrics.jsonl").write_text("{}\n")
    url = (tmp_path / secret / "artifacts").as_uri()
    assert push(str(source), url).sent == 1
    index = (source / PUSH_INDEX).read_bytes()
    assert secret.encode() not in index and b"***" in index
    assert push(str(source), url).sent == 0
