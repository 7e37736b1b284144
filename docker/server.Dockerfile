# confide-server: the aggregation server (and the demo's job preparation).
#
#   docker build -f docker/server.Dockerfile -t confide-server:0.1.0 .
#   docker run --rm -v "$PWD/job:/job" -v confide-state:/var/lib/confide -p 8765:8765 \
#       confide-server:0.1.0 confide-server run --config /job/job.toml
#
# Stage 1 compiles the Rust core into an abi3 wheel (Python >= 3.10) and builds the
# confide-server wheel; stage 2 installs only the wheels (no compiler, no sources) and runs
# as an unprivileged user. Base images are pinned by tag (rust-version 1.89, edition 2024).
FROM rust:1.89-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir "maturin>=1.9.4,<2"
WORKDIR /src
# The whole Cargo workspace (benches is a member) and both Python packages.
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY core_rs core_rs
COPY benches benches
COPY python python
COPY server server
RUN /opt/build/bin/maturin build --release --locked --strip -o /wheels \
 && /opt/build/bin/pip wheel --no-cache-dir --no-deps ./server -w /wheels

FROM python:3.12-slim-bookworm
# A fixed uid, shared with the site image, so the demo's volumes are readable by both.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin confide \
 && mkdir -p /var/lib/confide /federation /opt/confide \
 && chown confide:confide /var/lib/confide /federation
COPY --from=build /wheels /wheels
# [demo]: scikit-learn's breast-cancer table for prepare_federation.py and simulate.
RUN pip install --no-cache-dir --find-links /wheels "confide-server==0.1.0" \
    "confide[privacy,demo]==0.1.0" && rm -rf /wheels
COPY docker/prepare_federation.py /opt/confide/prepare_federation.py
USER confide
WORKDIR /var/lib/confide
EXPOSE 8765
# /v1/health is the unauthenticated liveness probe; it answers 503 while the state recovers.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=12 \
  CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8765/v1/health', timeout=2).status == 200 else 1)"]
CMD ["confide-server", "--help"]
