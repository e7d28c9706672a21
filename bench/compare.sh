#!/usr/bin/env bash
# Before/after: the guard built from BASE (a git ref, default HEAD~1) against the working tree's,
# same machine, same run, alternating in each round, on a static origin (the proxy's own cost) and
# the real PostgREST 14; medians of ROUNDS rounds and the after/before ratio.
#   bash bench/compare.sh [BASE]      (DURATION=10 seconds per load run, ROUNDS=3 by default)
# BASE_BIN=path skips building BASE. Writes bench/compare-latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-HEAD~1}
OUT=bench/compare-latest.md
source bench/common.sh

BASE_COMMIT=$(git rev-parse --short "$BASE")
echo "building the guard at $BASE_COMMIT and the working tree (release)"
if [ -n "${BASE_BIN:-}" ]; then
  # A binary already built from BASE (it is the caller's word that it was).
  cp "$BASE_BIN" "$WORK/guard-before"
else
  git worktree add -f -q "$WORK/base-src" "$BASE_COMMIT"
  CARGO_TARGET_DIR=target/bench-base cargo build --release --quiet --bin pgrst-guard --manifest-path "$WORK/base-src/Cargo.toml"
  git worktree remove --force "$WORK/base-src"
  cp target/bench-base/release/pgrst-guard "$WORK/guard-before"
fi
cargo build --release --quiet --bin pgrst-guard
cp target/release/pgrst-guard "$WORK/guard-after"

start_postgres
start_postgrest
ORIGIN_PORT=$(free_port)
start_nginx origin auto "$(origin_server "$ORIGIN_PORT")"; wait_port "$ORIGIN_PORT"

declare -A PORT
for build in before after; do for up in static postgrest; do
  port=$(free_port); PORT[$build/$up]=$port
  case $up in static) upstream=http://127.0.0.1:$ORIGIN_PORT; admin=() ;; postgrest) upstream=http://127.0.0.1:$PGRST_PORT; admin=(--upstream-admin "http://127.0.0.1:$PGRST_ADMIN") ;; esac
  PGRST_GUARD_LOG_LEVEL=warn "$WORK/guard-$build" --listen "127.0.0.1:$port" --upstream "$upstream" "${admin[@]}" --db-uri "$DB_URI" >"$WORK/guard-$build-$up.log" 2>&1 &
  PIDS+=($!)
done; done
for port in "${PORT[@]}"; do wait_port "$port"; done
sleep 1

declare -A RPS P50
echo "load: wrk, ${DURATION}s per run, $ROUNDS rounds"
for r in $(seq 1 "$ROUNDS"); do
  for c in ${CONNECTIONS:-1 32}; do
    for up in static postgrest; do
      case $up in static) path=/bench_items ;; postgrest) path="/bench_items?select=id,name&id=gt.0&order=id&limit=2" ;; esac
      # Alternate which build goes first, so that neither always meets a warmer machine.
      order="before after"; [ $((r % 2)) = 0 ] && order="after before"
      for build in $order; do
        threads=1; [ "$c" -gt 1 ] && threads=2
        out=$(wrk -t"$threads" -c"$c" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[$build/$up]}$path")
        RPS[$up/$c/$build/$r]=$(awk '/^Requests\/sec/ {printf "%d", $2}' <<<"$out")
        P50[$up/$c/$build/$r]=$(awk '$1=="50%" {print $2}' <<<"$out" | to_us)
        printf '  round %s %-9s c=%-3s %-6s %8s req/s  p50 %8s us\n' "$r" "$up" "$c" "$build" "${RPS[$up/$c/$build/$r]}" "${P50[$up/$c/$build/$r]}"
      done
    done
  done
done
values() { local -n table=$1; for r in $(seq 1 "$ROUNDS"); do echo "${table[$2/$r]}"; done; }
{
  echo "## Before/after ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${DURATION}s per run, $ROUNDS rounds)"
  echo
  echo "Before: $BASE_COMMIT. After: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + working tree'). Medians; req/s spread in brackets."
  echo
  echo "| upstream | conns | before req/s | after req/s | after/before | p50 before / after (us) |"
  echo "|---|---|---|---|---|---|"
  for up in static postgrest; do for c in ${CONNECTIONS:-1 32}; do
    b=$(median $(values RPS "$up/$c/before")); a=$(median $(values RPS "$up/$c/after"))
    echo "| $up | $c | $b ($(spread $(values RPS "$up/$c/before"))) | $a ($(spread $(values RPS "$up/$c/after"))) | $(ratio "$a" "$b") | $(median $(values P50 "$up/$c/before")) / $(median $(values P50 "$up/$c/after")) |"
  done; done
} | tee "$OUT"
