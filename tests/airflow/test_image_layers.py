"""What a change costs in the image's layers: ``docker/Dockerfile.example`` rebuilt with a changed ``train.py``
writes one small layer; ``docker/Dockerfile`` rebuilt with a changed podtrain writes podtrain's two small layers
and reuses the venv's. buildah ``--layers`` on the images ``make image`` built (marked ``image``:
``make image-test``); each test prints the rebuild's seconds and the new layers' bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _kubepodman import Podman
from e2e_support import REPO
from image_support import BASE, EXAMPLE, inspect, podman

pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]
__all__ = ["podman"]  # the fixture, imported for pytest


def rebuild(podman: Podman, dockerfile: str, context: Path, tag: str, **build_args: str) -> float:
    """``buildah bud --layers`` of ``docker/<dockerfile>`` on ``context`` as ``tag``; the seconds it took."""
    args = [x for k, v in build_args.items() for x in ("--build-arg", f"{k}={v}")]
    started = time.monotonic()
    built = subprocess.run(
        [
            *("buildah", "--storage-driver", podman.storage_driver, "bud", "--isolation", "chroot", "--layers"),
            *("--pull=never", "-f", str(REPO / "docker" / dockerfile), *args, "-t", tag, str(context)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return time.monotonic() - started


def changed_layers(podman: Podman, old: str, new: str) -> list[int]:
    """The indexes of ``new``'s layers that ``old`` does not have at the same place."""
    a, b = inspect(podman, old)["RootFS"]["Layers"], inspect(podman, new)["RootFS"]["Layers"]
    return [n for n in range(max(len(a), len(b))) if n >= len(a) or n >= len(b) or a[n] != b[n]]


def layer_bytes(podman: Podman, tag: str) -> list[int]:
    """The size of each of ``tag``'s layers, bottom first (its manifest's, uncompressed in local storage)."""
    out = subprocess.run(
        ["buildah", "--storage-driver", podman.storage_driver, "inspect", "--type", "image", tag],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [int(layer["size"]) for layer in json.loads(json.loads(out.stdout)["Manifest"])["layers"]]


def test_changing_train_py_rebuilds_only_the_last_layer(podman: Podman, tmp_path: Path) -> None:
    """docker/Dockerfile.example rebuilt with a changed train.py: every layer of the base image is reused and
    exactly one new layer, train.py's, is written. Prints the rebuild's seconds and the new layer's bytes."""
    context = tmp_path / "context"
    (context / "examples").mkdir(parents=True)
    (context / "examples" / "train.py").write_text(
        (REPO / "examples" / "train.py").read_text() + f"\n# changed at {time.time_ns()}\n"
    )
    tag = f"{EXAMPLE}-rebuild"
    seconds = rebuild(podman, "Dockerfile.example", context, tag, BASE_IMAGE=BASE)
    try:
        base_layers = len(inspect(podman, BASE)["RootFS"]["Layers"])
        assert changed_layers(podman, BASE, tag) == [base_layers], "the base image's layers are all reused"
        assert changed_layers(podman, EXAMPLE, tag) == [base_layers], "one layer differs: train.py's"
        size = layer_bytes(podman, tag)[base_layers]
        assert 0 < size < 200_000, size
    finally:
        podman.run("rmi", "--force", tag, check=False)
    print(f"train.py changed: rebuilt in {seconds:.1f} s, one new layer of {size} bytes")


def test_changing_podtrain_rebuilds_a_small_layer_not_the_venv(podman: Podman, tmp_path: Path) -> None:
    """docker/Dockerfile rebuilt with a change to podtrain's code (the build arguments make image used, so every
    step before it is cached): the venv layer and everything under it are reused, and the two new layers, the
    wheel copied and installed, are together far smaller than the venv."""
    context = tmp_path / "context"
    for name in ("pyproject.toml", "README.md", "requirements/image.txt", ".dockerignore"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, context / name)
    for package in ("sdk", "entrypoint"):
        shutil.copytree(REPO / package, context / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (context / "sdk" / "__init__.py").open("a") as f:
        f.write(f"\n# changed at {time.time_ns()}\n")
    config = inspect(podman, BASE)["Config"]["Labels"]
    tag = f"{BASE}-rebuild"
    seconds = rebuild(
        podman,
        "Dockerfile",
        context,
        tag,
        BASE_IMAGE=config["org.opencontainers.image.base.name"],
        TORCH_VERSION=os.environ.get("TORCH_VERSION", "2.13.0+cpu"),  # docker/build-local.sh's defaults
        TORCH_INDEX_URL=f"http://127.0.0.1:{os.environ.get('TORCH_INDEX_PORT', '8765')}/simple",
    )
    try:
        changed = changed_layers(podman, BASE, tag)
        top = len(inspect(podman, BASE)["RootFS"]["Layers"])  # the wheel's COPY and its install are the last two
        assert changed == [top - 2, top - 1], f"layers {changed} differ, not only podtrain's two"
        sizes = layer_bytes(podman, tag)
        size, venv = sizes[top - 2] + sizes[top - 1], max(sizes)
        assert 0 < size < 10_000_000 and size * 100 < venv, (sizes, changed)
    finally:
        podman.run("rmi", "--force", tag, check=False)
    print(f"podtrain changed: rebuilt in {seconds:.1f} s, two new layers of {size} bytes (the venv: {venv} bytes)")
