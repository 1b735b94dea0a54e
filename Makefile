# One command per check, the same locally and in CI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HASH := $(shell cat pyproject.toml | sha1sum | cut -c1-12)
# Two stamps: `make run` installs only what running needs; test and lint add their extras.
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
STAMP := $(VENV)/.installed-dev-$(HASH)

.PHONY: run test test-fast lint bench install system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUN_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[embedded]'
	rm -f $(VENV)/.installed-run-*
	touch $(RUN_STAMP)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[embedded,test,dev]'
	rm -f $(VENV)/.installed-dev-* $(VENV)/.installed-run-*
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

## run: the service on the shipped config (embedded database, everything under ./var)
run: $(RUN_STAMP)
	mkdir -p var/raw
	$(PY) -m huntsman run

## test: the whole test suite (the system tools it needs are installed by system-deps)
test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast tier, by markers (pyproject.toml; `service` is set by tests/conftest.py on every test
# that needs the database server): no service, no database server, no end-to-end run, no Debian
# tools, no root, nothing marked slow.
FAST := not slow and not e2e and not service and not tools and not root and not browser

## test-fast: the edit-test loop: pure science and unit tests, under a minute (PYTEST_ARGS=-x ...)
test-fast: $(STAMP)
	$(PY) -m pytest -m "$(FAST)" $(PYTEST_ARGS)

## lint: ruff and mypy; fails on any finding
lint: $(STAMP)
	$(VENV)/bin/ruff check huntsman tests benchmarks
	$(VENV)/bin/mypy

## bench: benchmarks (not part of test); figures printed and written under benchmarks/results
bench: $(STAMP) system-deps
	$(PY) -m pip install --quiet -e '.[embedded,test,dev,bench]'
	mkdir -p benchmarks/results
	$(PY) benchmarks/run_all.py --out benchmarks/results

## system-deps: astrometry.net with the Tycho-2 indexes, SExtractor and PSFEx (Debian)
system-deps:
	@./scripts/system-deps.sh

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
