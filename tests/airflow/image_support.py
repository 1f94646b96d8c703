"""What the image tests share (``test_e2e_image.py``, ``test_image_layers.py``): the images ``make image`` built,
their ENTRYPOINT, and podman set up for this machine (``podman``, a fixture)."""

from __future__ import annotations

import json
import os
import resource
import shutil
from typing import Any

import pytest
from _kubepodman import Podman
from e2e_support import IMAGE, REPO

__all__ = ["BASE", "ENTRYPOINT", "EXAMPLE", "inspect", "podman"]

VERSION = next(
    line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("version")
)
BASE = os.environ.get("PODTRAIN_TEST_IMAGE", f"localhost/podtrain:{VERSION}-cpu")
EXAMPLE = os.environ.get("PODTRAIN_TEST_EXAMPLE_IMAGE", f"localhost/podtrain-example:{VERSION}-cpu")
ENTRYPOINT = ["tini", "-g", "--", "podtrain", "run", "--"]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """podman on the storage ``make image`` built into (overlay, else vfs), with this machine's limits.

    This machine gives root no CAP_SYS_RESOURCE, so a container may not raise a limit: its open files are this
    process's limit and its processes 4096 (podman's defaults ask for more and the runtime is refused); and its
    cgroups are a v1/v2 hybrid, which crun refuses, so runc runs the containers."""
    assert os.geteuid() == 0, "the image tests run as root (buildah and podman's storage): make image-test"
    assert shutil.which("podman") and shutil.which("runc"), "podman and runc are missing: make image-test installs them"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={soft}:{hard}", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n'
    )
    for driver in ("overlay", "vfs"):
        runtime = Podman(images={IMAGE: EXAMPLE}, storage_driver=driver, containers_conf=conf)
        if all(runtime.run("image", "exists", ref, check=False).returncode == 0 for ref in (BASE, EXAMPLE)):
            return runtime
    pytest.fail(f"{BASE} and {EXAMPLE} are not built: run make image-test (or make image) as root")


def inspect(podman: Podman, ref: str) -> dict[str, Any]:
    return json.loads(podman.run("image", "inspect", ref).stdout)[0]
