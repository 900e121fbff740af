# make demo: set everything up on a fresh machine and run the demo job.
# make test: set everything up and run the test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moekit-setup
TORCH_VERSION := 2.13.0
# torch is pinned and installed first: an unpinned `pip install torch` on Linux pulls the CUDA build
# and its gigabytes of libraries. Set TORCH_INDEX to take torch from another wheel index (e.g. a
# CUDA build for a GPU machine); by default pip's configured sources are used.
TORCH_INDEX ?=
DEB_PACKAGES := bible-kjv sword-text-web dataset-fashion-mnist

.PHONY: setup demo test lint typecheck wheel-check deb-packages clean

setup: $(STAMP) deb-packages

# Reinstalled when pyproject.toml changes; otherwise setup is a no-op. torch comes first, from
# TORCH_INDEX, so that installing moekit finds it already satisfied.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# The data sets are Debian packages: installed when running as root, otherwise the command is printed.
deb-packages:
	@missing=""; \
	for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && apt-get install -y $$missing; \
	else \
		echo "Data packages missing:$$missing"; \
		echo "Install them with: sudo apt-get update && sudo apt-get install -y$$missing"; \
	fi

demo: setup
	$(BIN)/moekit demo --out runs/demo --resume

test: setup
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

# The published wheel works outside the source tree: build it, install it into a fresh virtual
# environment, and run every job's --help and a quick benchmark from another directory.
WHEEL_DIR := build/wheel-check
wheel-check: setup
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(BIN)/python -m pip wheel --no-deps --wheel-dir $(WHEEL_DIR)/dist .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)"
	$(WHEEL_DIR)/venv/bin/python -m pip install $(WHEEL_DIR)/dist/moekit-*.whl
	cd $(WHEEL_DIR) && for job in $$(venv/bin/python -c "from moekit.cli import JOBS; print(*JOBS)"); do \
		venv/bin/moekit $$job --help > /dev/null || exit 1; done
	cd $(WHEEL_DIR) && venv/bin/moekit bench --quick --threads 1 --repeats 1 --out bench > /dev/null
	@echo "wheel check passed: every job's --help and moekit bench --quick run from the installed wheel"

clean:
	rm -rf runs build .pytest_cache .ruff_cache .mypy_cache
