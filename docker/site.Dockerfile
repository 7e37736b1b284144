# confide site: a hospital's client (`confide client`), with its data mounted read-only.
#
#   docker build -f docker/site.Dockerfile -t confide-site:0.1.0 .
#   docker run --rm -v "$PWD/data:/data:ro" -v site-state:/state \
#       -v "$PWD/token:/run/secrets/token:ro" confide-site:0.1.0 confide client \
#       --server https://server.example:8765 --data /data/train.csv --state /state \
#       --token-file /run/secrets/token --client-id hospital-1
#
# Same two-stage build as server.Dockerfile, installing only the SDK (no server, no
# accountant): what a site runs.
FROM rust:1.89-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir "maturin>=1.9.4,<2"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY core_rs core_rs
COPY benches benches
COPY python python
RUN /opt/build/bin/maturin build --release --locked --strip -o /wheels

FROM python:3.12-slim-bookworm
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin confide \
 && mkdir -p /state && chown confide:confide /state
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --find-links /wheels "confide==0.1.0" && rm -rf /wheels
USER confide
WORKDIR /state
# A site serves nothing: its liveness is its process (it exits when the job ends).
HEALTHCHECK NONE
CMD ["confide", "client", "--help"]
