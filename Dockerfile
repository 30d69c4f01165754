# syntax=docker/dockerfile:1
#
# pgsidecar container image.
#
#   docker build -t pgsidecar:0.1.0 .
#   docker run --rm -p 6432:6432 -p 9930:9930 \
#     -e PGSIDECAR_UPSTREAM_HOST=db.example -e PGSIDECAR_UPSTREAM_USER=app \
#     -e PGSIDECAR_UPSTREAM_PASSWORD=... -e PGSIDECAR_CLIENT_PASSWORD=... \
#     -e PGSIDECAR_ADMIN_TOKEN=... pgsidecar:0.1.0
#   docker run --rm -e ... pgsidecar:0.1.0 check      # validate the configuration only
#
# Expected size: about 30 MB uncompressed (roughly 12 MB compressed in a registry).
# The runtime stage is distroless/cc (glibc, libgcc_s, CA certificates, tzdata, passwd
# entries for nonroot: about 23 MB) plus the pgsidecar binary, about 6 MB once debug
# info and symbols are stripped (all Rust crates are linked in; today it needs only
# glibc and libgcc_s at run time: no OpenSSL, no libpq). No shell or package manager
# is shipped: nothing in the image runs but pgsidecar, which keeps the attack surface
# and the pull time of a sidecar (pulled onto every node that runs the application)
# small.
#
# Both stages are Debian 12 (bookworm): the binary is linked against the builder's glibc
# and must not need a newer one than the runtime stage has. For reproducible builds, pin
# both images by digest (FROM image:tag@sha256:...) in your registry mirror.

ARG RUST_VERSION=1.95

# ---- builder ---------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS builder

# Release binaries for the image: no debug info (Cargo.toml keeps line tables for
# profiling on developer machines) and stripped symbols. Set before the dependency
# layer so both builds use the same profile and the cache stays valid.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

WORKDIR /build

# Dependency layer: build every dependency against a dummy crate. This layer is only
# rebuilt when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src \
        target/release/pgsidecar* \
        target/release/deps/pgsidecar-* \
        target/release/deps/libpgsidecar-* \
        target/release/.fingerprint/pgsidecar-*

# The real sources. Touch them so cargo never mistakes the dummy artifacts for current.
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/pgsidecar /out/pgsidecar \
    && /out/pgsidecar --version

# ---- runtime ---------------------------------------------------------------------
# distroless/cc: glibc and libgcc_s (Rust's unwinder) and nothing else; the :nonroot
# variant runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="pgsidecar" \
      org.opencontainers.image.description="PostgreSQL sidecar proxy: session and transaction pooling, health checks, circuit breaking, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/pgsidecar /usr/local/bin/pgsidecar
# Default configuration: upstream, credentials and admin token from environment
# variables (see the file's header); listens on 0.0.0.0 inside the container.
COPY deploy/docker/proxy.yaml /etc/pgsidecar/proxy.yaml

# Read by `pgsidecar` (and `pgsidecar check`) when --config is not given.
ENV PGSIDECAR_CONFIG=/etc/pgsidecar/proxy.yaml

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532

# 6432: PostgreSQL clients. 9930: admin HTTP (metrics, probes, control).
EXPOSE 6432 9930

# SIGTERM starts the graceful drain: /readyz fails at once, new clients are still
# accepted for admin.shutdown_delay, then clients leave at transaction boundaries and
# after admin.shutdown_timeout the rest get FATAL 57P01. Give the container
# shutdown_delay + shutdown_timeout + a few seconds (docker stop -t 40; Kubernetes
# terminationGracePeriodSeconds). A second SIGTERM exits at once.
STOPSIGNAL SIGTERM

# No HEALTHCHECK: the image has no shell or HTTP client to run one with, and the
# orchestrators this image targets probe the admin port themselves (Kubernetes
# startup/liveness/readiness probes on /startupz, /livez, /readyz).

ENTRYPOINT ["/usr/local/bin/pgsidecar"]
