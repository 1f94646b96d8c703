"""A store that throttles: bursts of S3 SlowDown and GCS 429 are ridden out with fewer requests in flight; a
throttle that never ends fails the pull within the throttling budget with one line and exit 69 (retry later).

Real moto and fake-gcs servers behind the fault proxy, real pulls into real folders, the real ``podtrain``
command. The throttled waits are made tiny through the retry policy (or the budget through
``PODTRAIN_THROTTLE_SECONDS``), so nothing here sleeps for long; no assertion depends on timing but for a
generous upper bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sdk.data.pull import INDEX_NAME, pull
from sdk.errors import ThrottledStorageError, exit_code
from sdk.outcomes import EXIT_UNAVAILABLE
from sdk.stores.store import RetryPolicy, open_store
from tests.faultproxy import FaultProxy

if TYPE_CHECKING:
    from tests.conftest import CapturedLog

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
OBJECTS = {f"data/part-{i:04d}.bin": os.urandom(512 + i) for i in range(240)}
OBJECT_GETS = {"s3": r"^/podtrain-test/root/data/", "gcs": r"^/download/"}
FAST = {"throttle_initial_wait": 0.002, "throttle_max_wait": 0.02, "timeout": 10.0}  # tiny throttled waits


def _policy(**options: Any) -> RetryPolicy:
    return RetryPolicy(**{**FAST, **options})


def _upload(url: str) -> None:
    store = open_store(url)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: store.put(*item), OBJECTS.items()))


def _landed(dest: Path) -> dict[str, bytes]:
    return {f"data/{p.relative_to(dest).as_posix()}": p.read_bytes() for p in dest.rglob("*") if p.name != INDEX_NAME}


def _limits(log: CapturedLog) -> list[int]:
    return [line["limit"] for line in log.records("storage.throttle")]


def test_a_burst_of_40_slowdown_answers_is_ridden_out(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], captured_log: CapturedLog
) -> None:
    """The reported case: 40 SlowDowns in a row — the listing, the pull's first request, takes them all — used
    to exhaust the 6 attempts and fail the pull with every file missing. Now every file lands."""
    _upload(s3_url)
    proxy = fault_proxy("s3")
    burst = proxy.fail(503, times=40)
    result = pull([f"{s3_url}/data"], tmp_path / "d", retry=_policy())
    assert (result.files, result.fetched) == (len(OBJECTS), len(OBJECTS))
    assert _landed(tmp_path / "d") == OBJECTS
    assert burst.hits == 40
    retries = captured_log.records("storage.retry")
    assert len(retries) == 40 and all(line["throttled"] for line in retries)
    assert captured_log.records("storage.throttle_over"), "the episode ends once requests get through again"


def test_a_slowdown_burst_on_the_workers_halves_the_requests_in_flight(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], captured_log: CapturedLog
) -> None:
    """60 SlowDowns on the 16 workers' GETs: the request limit halves from the 16 in flight (8, 4, ...), never
    below 1, and every file lands."""
    _upload(s3_url)
    proxy = fault_proxy("s3")
    burst = proxy.fail(503, method="GET", path=OBJECT_GETS["s3"], times=60)
    result = pull([f"{s3_url}/data"], tmp_path / "d", workers=16, retry=_policy())
    assert result.fetched == len(OBJECTS)
    assert _landed(tmp_path / "d") == OBJECTS
    assert burst.hits == 60
    limits = _limits(captured_log)
    assert limits and limits[0] <= 8 and min(limits) >= 1, limits
    assert min(limits) <= 2, f"throttled again at each lower limit, it keeps halving: {limits}"


def test_throttled_answers_do_not_use_up_the_attempts_for_other_errors(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """10 SlowDowns then 2 InternalErrors on one object: fetched (2 failures < 3 attempts). 500 on every try of
    another: it still fails after exactly the policy's 3 attempts — ordinary errors keep their count."""
    _upload(s3_url)
    proxy = fault_proxy("s3")
    policy = _policy(attempts=3, initial_wait=0.001, max_wait=0.002, jitter=0.0)
    throttled = proxy.fail(503, method="GET", path=r"part-0007", times=10)
    failed = proxy.fail(500, method="GET", path=r"part-0007", times=2)
    pull([f"{s3_url}/data"], tmp_path / "d", retry=policy)
    assert _landed(tmp_path / "d") == OBJECTS
    assert (throttled.hits, failed.hits) == (10, 2)
    broken = proxy.fail(500, method="GET", path=r"part-0009", times=None)
    (tmp_path / "d" / "part-0009.bin").unlink()
    with pytest.raises(Exception, match="still failing after 3 attempts") as caught:
        pull([f"{s3_url}/data"], tmp_path / "d", retry=policy)
    assert not isinstance(caught.value, ThrottledStorageError)
    assert broken.hits == 3


def test_a_throttle_that_never_ends_fails_within_the_budget_in_one_line(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """Every object GET answered SlowDown: the pull gives up once the 1 s budget is spent (not after a count of
    tries), with one line naming the throttling, the budget's setting and what to do; exit code 69."""
    _upload(s3_url)
    proxy = fault_proxy("s3")
    fault = proxy.fail(503, method="GET", path=OBJECT_GETS["s3"], times=None)
    started = time.monotonic()
    with pytest.raises(ThrottledStorageError) as caught:
        pull([f"{s3_url}/data"], tmp_path / "d", retry=_policy(throttle_seconds=1.0))
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "\n" not in message
    assert "throttl" in message and "PODTRAIN_THROTTLE_SECONDS" in message and "retry later" in message
    assert "SlowDown" in message
    assert exit_code(caught.value) == EXIT_UNAVAILABLE
    assert fault.hits > 6 * 16, "throttled answers are retried for the budget, not for 6 attempts"
    assert elapsed < 60


def test_the_pull_command_exits_69_with_one_line_once_the_throttling_budget_is_spent(
    s3_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """`podtrain pull` with PODTRAIN_THROTTLE_SECONDS=2 against a store that throttles every GET: exit 69,
    stderr one line saying the store throttled past the budget; no partial file is left behind."""
    _upload(s3_url)
    proxy = fault_proxy("s3")
    proxy.fail(503, method="GET", path=OBJECT_GETS["s3"], times=None)
    dest = tmp_path / "d"
    done = subprocess.run(
        [PODTRAIN, "pull", f"{s3_url}/data", "--dest", str(dest), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PODTRAIN_THROTTLE_SECONDS": "2", "PODTRAIN_LOG_LEVEL": "error"},
    )
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("podtrain: storage unavailable:")
    assert "throttling" in lines[0] and "2 s throttling budget" in lines[0]
    assert not [p for p in dest.rglob("*") if p.is_file() and p.name != INDEX_NAME]


def test_the_throttling_budget_setting_is_validated(tmp_path: Path) -> None:
    """A budget that is not a finite number of seconds in (0, 3600] exits 2 naming the variable."""
    for bad in ("0", "-5", "inf", "nan", "7200", "soon"):
        done = subprocess.run(
            [PODTRAIN, "pull", (tmp_path / "store").as_uri(), "--dest", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PODTRAIN_THROTTLE_SECONDS": bad},
        )
        assert done.returncode == 2, (bad, done.stderr)
        assert "PODTRAIN_THROTTLE_SECONDS" in done.stderr, (bad, done.stderr)


@pytest.mark.usefixtures("fast_gcsfs_retries")
def test_a_gcs_429_burst_is_ridden_out_with_fewer_requests_in_flight(
    gcs_url: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], captured_log: CapturedLog
) -> None:
    """300 answers of 429 rateLimitExceeded on fake-gcs downloads — more than gcsfs's own six tries and our six
    attempts absorb per request — then the store recovers: every file lands and the request limit shrank."""
    objects = dict(list(OBJECTS.items())[:48])
    store = open_store(gcs_url)
    for rel, data in objects.items():
        store.put(rel, data)
    proxy = fault_proxy("gcs")
    burst = proxy.fail(429, method="GET", path=OBJECT_GETS["gcs"], times=300)
    result = pull([f"{gcs_url}/data"], tmp_path / "d", workers=4, retry=_policy())
    assert result.fetched == len(objects)
    assert _landed(tmp_path / "d") == objects
    assert burst.hits == 300
    limits = _limits(captured_log)
    assert limits and min(limits) == 1, limits
