# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1.95-slim-bookworm AS build
# jemalloc (the hub's allocator, tikv-jemallocator) is built from C with make.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin prostaff-events

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin appuser
COPY --from=build /src/target/release/prostaff-events /usr/local/bin/prostaff-events
COPY config /app/config
WORKDIR /app
USER appuser
ENV PORT=4000 \
    BIND_ADDR=0.0.0.0 \
    APP_ENV=production \
    LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 4000
# The binary checks its own /health: no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["prostaff-events", "healthcheck"]
STOPSIGNAL SIGTERM
CMD ["prostaff-events"]
