# The two front-door commands: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-wheel lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-system.sh scripts/build-pyfuse3.sh deploy/pyfuse3/read-inode.patch
	bash scripts/setup-system.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pyfuse3 with the no-open read change (issue 15; docs/pyfuse3-read-inode.md), then the rest.
	bash scripts/build-pyfuse3.sh $(VENV)/bin/pip build/pyfuse3
	$(PY) -m pip install -q --force-reinstall --no-deps build/pyfuse3/pyfuse3-*.whl
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	bash scripts/demo.sh

# Two pytest-xdist workers: the suite waits on subprocesses and mounts about a quarter of the time,
# so two workers halve it on 2 cores. Every test keeps to its own tmp_path, ports and processes.
TEST_WORKERS ?= 2

test: setup
	SECRETFS_WHEELHOUSE=$(CURDIR)/build/pyfuse3 $(PY) -m pytest -q -n $(TEST_WORKERS)

# The same suite against the built sdist and wheel installed in a fresh venv of WHEEL_PYTHON
# (scripts/test-wheel.sh; CI runs it on Python 3.13). Needs no `make setup`, only the system part.
WHEEL_PYTHON ?= python3

test-wheel:
	bash scripts/setup-system.sh
	bash scripts/test-wheel.sh $(WHEEL_PYTHON) -n $(TEST_WORKERS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/read_latency.py

clean:
	rm -rf $(VENV) build *.egg-info bench/.build
