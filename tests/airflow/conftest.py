"""The Airflow suite's set-up: runs in .venv-airflow (`make test`), never in the training environment.

Before anything imports Airflow: ``AIRFLOW_HOME`` is a fresh temporary folder (removed at exit) with a SQLite
database path inside it, examples are off, and the DAGs folder is ``examples/airflow``, which is also put on
``sys.path`` as Airflow does for a DAGs folder (so ``import podtrain_airflow`` works). Nothing here needs the
database; a test that runs a DAG creates it with ``airflow_db``.

``offline.py`` has the hand-made runtime context these fixtures use.

* ``dagbag`` — every DAG of ``examples/airflow``, loaded once.
* ``render_pod(task, map_index=-1, try_number=1, xcoms=None)`` — the task's pod as its worker would build it,
  offline: a hand-made runtime context, the operator's own template rendering (for a mapped task, the
  MappedOperator's: it unmaps with the upstream XCom from ``xcoms``), then its ``build_pod_request_obj``.
* ``airflow_db`` — ``airflow db migrate`` into this session's SQLite file, once.
* ``s3`` — an S3 server on 127.0.0.1 per end-to-end module, run by the training environment (skipped, saying
  why, without it); ``gang_ends`` — every gang task's end as ``gang_finished()`` judged it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "examples" / "airflow"
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="podtrain-airflow-home-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)

os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
for name in [n for n in os.environ if n.startswith("PODTRAIN_DAG_")]:
    del os.environ[name]  # the DAGs' settings are their defaults unless a test sets them
if str(DAGS) not in sys.path:
    sys.path.insert(0, str(DAGS))

from e2e_support import TrainingS3Server, training_env_missing  # noqa: E402
from kubeapi import KubeAPIServer  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from offline import render_and_build  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def dagbag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS), bundle_path=DAGS)


@pytest.fixture
def render_pod() -> Any:
    return render_and_build


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """This session's Airflow metadata database (SQLite), migrated once."""
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, timeout=300)
    return AIRFLOW_HOME / "airflow.db"


@pytest.fixture
def kube() -> Iterator[KubeAPIServer]:
    """The test Kubernetes (tests/airflow/kubeapi.py), its `sh:test` image running `sh -c`."""
    with KubeAPIServer(images={"sh:test": ["sh", "-c"]}) as server:
        yield server


@pytest.fixture
def api(kube: KubeAPIServer) -> k8s.CoreV1Api:
    """The official client's CoreV1Api on that server."""
    cfg = k8s.Configuration()
    cfg.host = kube.url
    return k8s.CoreV1Api(k8s.ApiClient(cfg))


@pytest.fixture(scope="module")
def s3() -> Iterator[TrainingS3Server]:
    """An S3 server on 127.0.0.1 for one end-to-end module, run by the training environment."""
    missing = training_env_missing()
    if missing:
        pytest.skip(missing)
    with TrainingS3Server() as server:
        yield server


@pytest.fixture
def gang_ends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, BaseException | None]]:
    """Every gang task's end as ``gang_finished()`` judged it: ``(task_id, verdict, exception raised)``."""
    from podtrain_airflow.multinode import GangOperator

    seen: list[tuple[str, Any, BaseException | None]] = []
    original = GangOperator.gang_finished

    def gang_finished(self: Any, context: Any, event: Any) -> Any:
        try:
            result = original(self, context, event)
        except BaseException as exc:
            seen.append((self.task_id, self.verdict, exc))
            raise
        seen.append((self.task_id, self.verdict, None))
        return result

    monkeypatch.setattr(GangOperator, "gang_finished", gang_finished)
    return seen
