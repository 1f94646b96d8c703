# podtrain — every target builds what it needs; `make test` works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --progress-bar off -c requirements/constraints.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv test test-all lint demo bench clean

help:
	@echo "make demo   pull, train, SIGTERM, resume, push: the whole flow on a local file:// bucket (S3=1: on moto)"
	@echo "make test   build .venv, run the whole suite (real S3/GCS servers on 127.0.0.1)"
	@echo "make lint   ruff + mypy"
	@echo "make bench  checkpoint save/resume benchmarks, as ratios against boto3"

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran — failing"; exit 1; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || exit 1; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check sdk entrypoint tests bench examples
	$(VENV)/bin/ruff format --check sdk entrypoint tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.example

# S3=1: the bucket is an S3 server (moto) on 127.0.0.1 instead of a local folder.
demo: $(STAMP)
	$(PY) examples/demo.py --workdir .demo $(if $(S3),--s3)

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache build *.egg-info
