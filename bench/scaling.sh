#!/usr/bin/env bash
# How the guard's costs grow with the work (examples/bench_scaling.rs): heal time against schema
# size with and without the admin URL, heal time and NOTIFYs with 1, 100 and 1,000 requests waiting
# on one reload, resident memory with 1,000 and 10,000 idle connections and 1,000 held bodies; on
# the real PostgREST 14 and the release guard as its own process, in its default configuration.
#   bash bench/scaling.sh        (about 10 minutes on 2 cores)
# Writes bench/scaling-latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/scaling-latest.md
POSTGREST_DIR=${PGRST_GUARD_TEST_POSTGREST:-$(cd .. && pwd)/shared/postgrest}

echo "building (release)"
cargo build --release --quiet --bin pgrst-guard --example bench_scaling
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TABLES=$(PGRST_GUARD_BIN="$PWD/target/release/pgrst-guard" PGRST_GUARD_TEST_POSTGREST="$POSTGREST_DIR" \
  target/release/examples/bench_scaling)
{
  echo "## Scaling ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, at $(git rev-parse --short HEAD))"
  echo
  echo "$TABLES"
} >"$OUT"
cat "$OUT"
