# confide developer entry points. `make test` and `make demo` work on a fresh machine from a
# clean clone: they create .venv, install every dependency from PyPI / crates.io, build the
# Rust extension and then run.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
# Setup and build output goes to this log; it is printed only when a step fails.
SETUP_LOG := $(VENV)/setup.log
RUST_SOURCES := $(shell find core_rs/src -name '*.rs') Cargo.toml Cargo.lock core_rs/Cargo.toml
# Run a noisy command with its output in $(SETUP_LOG), shown only if it fails.
quietly = { $(1); } >>$(SETUP_LOG) 2>&1 || { cat $(SETUP_LOG); echo "failed: $(1) (log: $(SETUP_LOG))" >&2; exit 1; }

.PHONY: setup build test test-rust test-python lint lint-rust lint-python bench bench-rust demo demo-images app clean dist

# Dependencies are (re)installed only when pyproject.toml changes.
$(STAMP): pyproject.toml server/pyproject.toml
	@echo "setting up $(VENV) (dependencies from PyPI; a few minutes the first time)..."
	@python3 -m venv $(VENV)
	@: > $(SETUP_LOG)
	@$(call quietly,$(PY) -m pip install -q --upgrade pip)
	@# pip gets the requirement strings as separate arguments (they may hold ';', '<', quotes).
	@# torch (with its ~3 GB of CUDA wheels) goes in first, on its own, so that its downloaded
	@# wheels are freed before the rest come: that lowers the disk peak of a fresh setup.
	@$(PY) -c 'import subprocess, sys, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]; reqs = ["maturin>=1.9.4,<2", *d["dependencies"], *d["optional-dependencies"]["dev"]]; torch = [r for r in reqs if r.split(">")[0].split("=")[0].strip() == "torch"]; pip = [sys.executable, "-m", "pip", "install", "-q"]; torch and subprocess.check_call([*pip, *torch]); subprocess.check_call([*pip, *reqs])' \
	  >>$(SETUP_LOG) 2>&1 || { cat $(SETUP_LOG); df -h . >&2; echo "failed: installing the dependencies (log: $(SETUP_LOG)); a fresh setup needs about 12 GB of free disk" >&2; exit 1; }
	@touch $(STAMP)

# Release build (the statistical tests draw millions of samples), once per change of the
# Rust sources; then confide-server, which depends on confide (not on PyPI), without
# resolving dependencies (they are all installed above).
$(BUILD_STAMP): $(STAMP) $(RUST_SOURCES)
	@echo "building the Rust core (release)..."
	@$(call quietly,$(VENV)/bin/maturin develop --release -q)
	@$(call quietly,$(PY) -m pip install -q --no-deps -e server)
	@touch $(BUILD_STAMP)

setup: $(BUILD_STAMP)

build: $(BUILD_STAMP)

lint-rust:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings

lint-python: setup
	$(VENV)/bin/ruff format --check python server tests benches mobile_examples
	$(VENV)/bin/ruff check python server tests benches mobile_examples
	$(VENV)/bin/mypy --strict python/confide server/confide_server
	$(PY) -m mypy.stubtest confide._core
	# Architecture contracts: confide never imports confide_server; the engine never aiohttp.
	$(VENV)/bin/lint-imports

lint: lint-rust lint-python

test-rust:
	cargo test --workspace --release

# The wheel test (tests/cli/test_dist.py) installs what `make dist` built (for this
# machine's target only, to save a cross build) into a fresh virtualenv;
# CONFIDE_REQUIRE_DIST makes it fail, not skip, if the wheels are missing.
test-python: setup
	$(MAKE) --no-print-directory dist DIST_TARGETS=$(NATIVE_TARGET)
	CONFIDE_REQUIRE_DIST=1 $(PY) -m pytest

test: lint test-rust test-python

# Benchmarks (benches/README.md). Criterion benches of the pure-Rust kernels, one-thread and
# all-thread pools (a few minutes), then a Markdown summary of the medians.
bench-rust:
	cargo bench -p confide-benches
	python3 benches/python/criterion_table.py

# The Python report runs in a separate virtualenv, $(PEERS): Flower pins its own dependency
# versions, which must not leak into .venv. It holds numpy, flwr and a release wheel of confide
# built from this tree (.venv only lends maturin; its editable install is left alone). The
# report runs twice: one core (RAYON_NUM_THREADS=1, what the targets are stated for) and all
# cores; JSON copies land in $(BENCH_OUT). Extra script options: make bench BENCH_ARGS="--repeat 21".
PEERS ?= .venv-peers
PEERS_PY := $(PEERS)/bin/python
PEERS_STAMP := $(PEERS)/.deps-stamp
WHEEL_DIR ?= target/bench-wheels
BENCH_OUT ?= benches/results
BENCH_ARGS ?=
# The Flower release every Flower column and tests/security/test_flower_attacks.py measured.
FLWR_VERSION ?= 1.42.0

# The '*' .gitignore keeps the whole environment out of `git status` (Python >= 3.13's venv
# writes it itself). Flower is optional for the report (its columns print "-" without it), so
# a failed flwr install only warns.
$(PEERS_STAMP):
	python3 -m venv $(PEERS)
	echo '*' > $(PEERS)/.gitignore
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q "numpy>=2"
	$(PEERS_PY) -m pip install -q "flwr[simulation]==$(FLWR_VERSION)" || echo "warning: flwr could not be installed; Flower columns will be empty"
	touch $(PEERS_STAMP)

bench: $(STAMP) $(PEERS_STAMP)
	rm -rf $(WHEEL_DIR)
	$(VENV)/bin/maturin build --release -q -o $(WHEEL_DIR)
	$(PEERS_PY) -m pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/confide-*.whl
	mkdir -p $(BENCH_OUT)
	$(PEERS_PY) benches/python/bench_core.py --threads 1 --json $(BENCH_OUT)/python-one-core.json $(BENCH_ARGS)
	$(PEERS_PY) benches/python/bench_core.py --threads all --json $(BENCH_OUT)/python-all-cores.json $(BENCH_ARGS)

# A real federation on loopback: one confide-server and three client processes ("hospitals")
# over HTTP, ~10 rounds, then federated vs central accuracy and demo-output/accuracy.png.
demo: setup
	$(VENV)/bin/confide-server simulate --clients 3 --rounds 10 --out demo-output

# The Dopamine-style image federation on loopback: 10 hospitals train SqueezeNet 1.1 at
# 64x64 over HTTP on the lesion task (synthetic lesions on real scans shipped by pydicom and
# scikit-image), patient-level DP-SGD with Rust-core noise under SecAgg+; then the final
# model is signed as a device release and `make app` opens the patient app on it.
# The Dopamine experiment (confide-server dopamine): 10 hospitals, SqueezeNet 1.1 at 64x64,
# distributed patient-level DP-SGD under SecAgg+ next to non-private FedAvg and central
# training on the same split; the final DP model is signed for the patient app.
demo-images: setup
	$(VENV)/bin/confide-server dopamine --out demo-images --release

# The patient diagnosis app (mobile_examples/patient_app) on this machine's loopback, with
# the release `make demo-images` signed (verified against its pinned release key).
app: setup
	@test -f demo-images/state/release_key.pub || { echo "run 'make demo-images' first"; exit 2; }
	PYTHONPATH=mobile_examples/patient_app $(PY) -m patient_app \
	  --state-dir demo-images/patient-device \
	  --release-key-file demo-images/state/release_key.pub \
	  --import-release demo-images/state/releases --port 8770

# Installable artifacts in $(DIST): the confide wheel (abi3, release, stripped, linked with
# zig against glibc 2.28: runs on manylinux_2_28 and newer, e.g. RHEL 8, Ubuntu 20.04), the
# same for aarch64 (Raspberry Pi-class boards, patient devices; needs the rustup target), the
# confide-server wheel and both sdists. auditwheel prints the platform each wheel fits.
DIST ?= dist
NATIVE_TARGET := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
DIST_TARGETS ?= x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu
dist: $(STAMP)
	rm -rf $(DIST) server/build && mkdir -p $(DIST)
	@for t in $(DIST_TARGETS); do \
	  rustup target list --installed 2>/dev/null | grep -qx $$t || rustup target add $$t >/dev/null 2>&1 || true; \
	  echo "building the confide wheel for $$t (release, manylinux_2_28)..."; \
	  PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --strip --zig \
	    --compatibility manylinux_2_28 --target $$t -i $(PY) -o $(DIST) -q >$(DIST)/build-$$t.log 2>&1 \
	    || { cat $(DIST)/build-$$t.log; exit 1; }; \
	done
	$(VENV)/bin/maturin sdist -o $(DIST) >/dev/null 2>&1
	$(PY) -m pip wheel -q --no-deps --no-build-isolation ./server -w $(DIST)
	cd server && $(abspath $(PY)) -c 'from setuptools import build_meta as b; b.build_sdist("$(abspath $(DIST))")' >/dev/null 2>&1
	rm -rf server/build $(DIST)/build-*.log
	@for w in $(DIST)/confide-*.whl; do \
	  echo "$$(basename $$w): $$($(VENV)/bin/auditwheel show $$w | tr '\n' ' ' | sed -n 's/.*consistent with the following platform tag: *\("[^"]*"\).*/fits \1/p')"; \
	done
	@ls -l $(DIST)

clean:
	rm -rf $(VENV) target $(DIST)
