#!/usr/bin/env bash
# The Docker test bed: no image registry is reachable here, so the images docker-compose.yml and the
# Dockerfile name (debian:bookworm-slim, rust:1-bookworm, postgres:15, postgrest/postgrest) are made
# locally from Debian's packages, the host's Rust toolchain and the PostgREST binaries of the test bed.
# A user's machine pulls the official ones instead. Idempotent: existing images are kept.
#   bash tests/docker/testbed.sh        start dockerd if needed, then make the missing images
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
work="$root/target/docker-testbed"
mkdir -p "$work"
POSTGREST_TAG=v14.17

if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { echo "dockerd is missing: apt-get install docker.io" >&2; exit 1; }
  echo "starting dockerd"
  (dockerd >"$work/dockerd.log" 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { cat "$work/dockerd.log" >&2; exit 1; }
fi

have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have debian:bookworm-slim; then
  echo "debootstrap: a minimal Debian bookworm"
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/rootfs" -c . | docker import - debian:bookworm-slim >/dev/null
  rm -rf "$work/rootfs"
fi

if ! have rust:1-bookworm; then
  echo "rust:1-bookworm from the host's toolchain"
  toolchain=$(rustc --print sysroot)
  ctx="$work/rust-image"
  rm -rf "$ctx" && mkdir -p "$ctx/rust"
  cp -a "$toolchain/bin" "$toolchain/lib" "$ctx/rust/"
  # The machine's own extra certificate authorities (an egress proxy's), so that cargo inside the
  # build reaches crates.io as the host does.
  mkdir -p "$ctx/ca"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
  cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY ca /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
COPY rust /usr/local/rust
ENV PATH=/usr/local/rust/bin:$PATH CARGO_HOME=/usr/local/cargo
DOCKERFILE
  docker build -q -t rust:1-bookworm "$ctx" >/dev/null
  rm -rf "$ctx"
fi

if ! have postgres:15; then
  echo "postgres:15 from Debian's postgresql-15"
  ctx="$work/postgres-image"
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp tests/docker/postgres-entrypoint.sh "$ctx/docker-entrypoint.sh"
  cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
DOCKERFILE
  docker build -q -t postgres:15 "$ctx" >/dev/null
  rm -rf "$ctx"
fi

if ! have "postgrest/postgrest:$POSTGREST_TAG"; then
  echo "postgrest/postgrest:$POSTGREST_TAG from the test bed's binary"
  dir="${PGRST_GUARD_TEST_POSTGREST:-$root/../shared/postgrest}"
  ctx="$work/postgrest-image"
  rm -rf "$ctx" && mkdir -p "$ctx"
  src=$(ls "$dir"/postgrest-14.* | sort -V | tail -n 1)
  case "$src" in *.xz) xz -dc "$src" >"$ctx/postgrest" ;; *) cp "$src" "$ctx/postgrest" ;; esac
  chmod +x "$ctx/postgrest"
  cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpq5 libgmp10 libffi8 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY postgrest /bin/postgrest
ENV LANG=C.UTF-8
USER 1000
EXPOSE 3000
CMD ["postgrest"]
DOCKERFILE
  docker build -q -t "postgrest/postgrest:$POSTGREST_TAG" "$ctx" >/dev/null
  rm -rf "$ctx"
fi
echo "docker test bed ready"
