# confide developer entry points. `make test` and `make demo` work on a fresh machine from a
# clean clone: they create .venv, install every dependency from PyPI / crates.io, build the
# Rust extension and then run.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: setup build test test-rust test-python lint lint-rust lint-python bench bench-rust demo demo-images app clean

# Dependencies are (re)installed only when pyproject.toml changes.
$(STAMP): pyproject.toml server/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pip gets the requirement strings as separate arguments (they may hold ';', '<', quotes).
	$(PY) -c 'import subprocess, sys, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]; subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "maturin>=1.9.4,<2", *d["dependencies"], *d["optional-dependencies"]["dev"]])'
	# confide-server depends on confide, which is not on PyPI: build confide first, then
	# install the server without resolving dependencies (they are all listed above).
	$(VENV)/bin/maturin develop --release -q
	$(PY) -m pip install -q --no-deps -e server
	touch $(STAMP)

setup: $(STAMP) build

# Release build: the statistical tests draw millions of samples.
build: $(STAMP)
	$(VENV)/bin/maturin develop --release -q

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

test-python: setup
	$(PY) -m pytest

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

# The '*' .gitignore keeps the whole environment out of `git status` (Python >= 3.13's venv
# writes it itself). Flower is optional for the report (its columns print "-" without it), so
# a failed flwr install only warns.
$(PEERS_STAMP):
	python3 -m venv $(PEERS)
	echo '*' > $(PEERS)/.gitignore
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q "numpy>=2"
	$(PEERS_PY) -m pip install -q flwr || echo "warning: flwr could not be installed; Flower columns will be empty"
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
demo-images: setup
	$(VENV)/bin/confide-server simulate --data lesions --model squeezenet --clients 10 \
	  --rounds 5 --image-size 64 --lr 0.05 --timeout 900 --out demo-images --release

# The patient diagnosis app (mobile_examples/patient_app) on this machine's loopback, with
# the release `make demo-images` signed (verified against its pinned release key).
app: setup
	@test -f demo-images/state/release_key.pub || { echo "run 'make demo-images' first"; exit 2; }
	PYTHONPATH=mobile_examples/patient_app $(PY) -m patient_app \
	  --state-dir demo-images/patient-device \
	  --release-key-file demo-images/state/release_key.pub \
	  --import-release demo-images/state/releases --port 8770

clean:
	rm -rf $(VENV) target
