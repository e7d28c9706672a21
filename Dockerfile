# syntax=docker/dockerfile:1
# Build: docker build -t pgrst-guard .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin pgrst-guard \
 && strip target/release/pgrst-guard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home pgrst-guard
COPY --from=build /src/target/release/pgrst-guard /usr/local/bin/pgrst-guard
# Configuration comes from PGRST_GUARD_* variables (or mount a TOML file and set PGRST_GUARD_CONFIG).
USER 10001
ENV PGRST_GUARD_LISTEN=0.0.0.0:8080 \
    PGRST_GUARD_ADMIN_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8081/healthz || exit 1
# Exec form: the guard is PID 1 and gets SIGTERM itself, so `docker stop` drains open requests.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgrst-guard"]
