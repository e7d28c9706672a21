# syntax=docker/dockerfile:1
# Build: docker build -t pgrst-guard .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY examples ./examples
COPY config ./config
RUN cargo build --release --locked --bin pgrst-guard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home pgrst-guard
COPY --from=build /src/target/release/pgrst-guard /usr/local/bin/pgrst-guard
COPY config/pgrst-guard.toml /etc/pgrst-guard/pgrst-guard.toml
USER 10001
ENV PGRST_GUARD_LISTEN=0.0.0.0:8080 \
    PGRST_GUARD_ADMIN_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8081/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/pgrst-guard"]
