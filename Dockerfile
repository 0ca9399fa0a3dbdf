# syntax=docker/dockerfile:1
#
# jobgate images: one Dockerfile, two targets built from a common builder.
#
#   docker build --target producer -t jobgate-producer .
#   docker build --target consumer -t jobgate-consumer .
#
# (docker-compose.yml builds both.) Without --target the last stage, `producer`, is built.
#
# Stages:
#   chef     cargo-chef on the official Rust image (rust:1 = Debian trixie)
#   planner  turns the workspace manifests + Cargo.lock into recipe.json
#   builder  builds only the dependencies from recipe.json (a cached layer that is reused
#            until a Cargo.toml or Cargo.lock changes), then the two binaries
#   runtime  debian:trixie-slim, same Debian release as the builder so the glibc the
#            binaries were linked against is present; non-root user, CA certificates
#   consumer / producer   runtime + one binary each
#
# Build dependencies: the bundled librdkafka (rdkafka-sys) and the producer's jemalloc
# (tikv-jemalloc-sys) are built with their ./configure and make, lapin uses rustls +
# ring; the C/C++ toolchain, make and zlib1g-dev of the rust:1 image cover all three, so nothing is installed in the builder. zlib is linked
# dynamically (libz-sys finds the image's zlib), which is why the runtime is
# debian:trixie-slim (zlib1g is part of every Debian base) and not distroless/cc.

ARG CHEF_IMAGE=lukemathwalker/cargo-chef:latest-rust-1
ARG RUNTIME_IMAGE=debian:trixie-slim

# ---------------------------------------------------------------- build
FROM ${CHEF_IMAGE} AS chef
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only: this layer stays cached while only the workspace's own code changes.
# Same profile and package selection as the build below, so nothing is compiled twice.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin producer --bin consumer

# ---------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: amqps:// (rustls-native-certs reads the system store).
# zlib1g: already in the base image, listed because the binaries link libz.so.1.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 jobgate \
    && useradd --system --uid 10001 --gid jobgate --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin jobgate
WORKDIR /
# Both binaries drain on SIGTERM (bounded by JOBGATE_SHUTDOWN_GRACE_MS); give the
# container runtime a stop timeout longer than that grace.
STOPSIGNAL SIGTERM

# ---------------------------------------------------------------- consumer
FROM runtime AS consumer
COPY --from=builder /app/target/release/consumer /usr/local/bin/consumer
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/consumer"]

# ---------------------------------------------------------------- producer
FROM runtime AS producer
# curl: for health checks against GET /readyz (see docker-compose.yml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /app/target/release/producer /usr/local/bin/producer
USER 10001:10001
ENV JOBGATE_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/producer"]
