# confide developer entry points. `make test` and `make demo` work on a fresh machine from a
# clean clone: they create .venv, install every dependency from PyPI / crates.io, build the
# Rust extension and then run.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: setup build test test-rust test-python lint lint-rust lint-python bench bench-rust demo clean

# Dependencies are (re)installed only when pyproject.toml changes.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.9.4,<2" $$($(PY) -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(" ".join(d["dependencies"] + d["optional-dependencies"]["dev"]))')
	touch $(STAMP)

setup: $(STAMP) build

# Release build: the statistical tests draw millions of samples.
build: $(STAMP)
	$(VENV)/bin/maturin develop --release -q

lint-rust:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings

lint-python: setup
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/mypy --strict python/confide
	$(PY) -m mypy.stubtest confide._core

lint: lint-rust lint-python

test-rust:
	cargo test --workspace --release

test-python: setup
	$(PY) -m pytest

test: lint test-rust test-python

bench-rust:
	cargo bench -p confide-benches

bench: setup
	$(PY) benches/python/bench_core.py

clean:
	rm -rf $(VENV) target
