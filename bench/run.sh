#!/usr/bin/env bash
# The benchmark: the upstream directly, through pgrst-guard and through nginx (proxy_pass with
# upstream keep-alive), on the same upstreams in one run (a static origin, for the proxy's own cost,
# and the real PostgREST 14); ROUNDS rounds, medians and the spread; then memory, then heal cost
# (the double, and the real PostgREST with a big schema).
#   bash bench/run.sh            (DURATION=10 seconds per load run, ROUNDS=3 by default)
# Installs wrk and nginx from Debian when missing. Writes bench/results-latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results-latest.md
source bench/common.sh
need curl curl

echo "building (release)"
cargo build --release --quiet --bin pgrst-guard --example postgrest_double --example bench_heal --example bench_heal_real

start_postgres
start_postgrest

# The PostgREST double
DOUBLE_PORT=$(free_port); DOUBLE_ADMIN=$(free_port)
target/release/examples/postgrest_double --db-uri "$DB_URI" --port "$DOUBLE_PORT" --admin-port "$DOUBLE_ADMIN" --pool-size 20 >"$WORK/double.log" 2>&1 &
PIDS+=($!); wait_port "$DOUBLE_PORT"

# nginx: the static origin, and the two proxies
ORIGIN_PORT=$(free_port); NGINX_STATIC=$(free_port); NGINX_DOUBLE=$(free_port); NGINX_PGRST=$(free_port)
start_nginx nginx auto "
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 128; }
  upstream double { server 127.0.0.1:$DOUBLE_PORT; keepalive 128; }
  upstream postgrest { server 127.0.0.1:$PGRST_PORT; keepalive 128; }
  $(origin_server "$ORIGIN_PORT")
  $(proxy_server "$NGINX_STATIC" origin)
  $(proxy_server "$NGINX_DOUBLE" double)
  $(proxy_server "$NGINX_PGRST" postgrest)"
wait_port "$ORIGIN_PORT"; wait_port "$NGINX_STATIC"; wait_port "$NGINX_DOUBLE"; wait_port "$NGINX_PGRST"

# pgrst-guard, one in front of each upstream
GUARD_STATIC=$(free_port); GUARD_DOUBLE=$(free_port); GUARD_PGRST=$(free_port)
PGRST_GUARD_LOG_LEVEL=warn target/release/pgrst-guard --listen "127.0.0.1:$GUARD_STATIC" --upstream "http://127.0.0.1:$ORIGIN_PORT" --db-uri "$DB_URI" >"$WORK/guard-static.log" 2>&1 &
GUARD_STATIC_PID=$!; PIDS+=($GUARD_STATIC_PID)
PGRST_GUARD_LOG_LEVEL=warn target/release/pgrst-guard --listen "127.0.0.1:$GUARD_DOUBLE" --upstream "http://127.0.0.1:$DOUBLE_PORT" --upstream-admin "http://127.0.0.1:$DOUBLE_ADMIN" --db-uri "$DB_URI" >"$WORK/guard-double.log" 2>&1 &
PIDS+=($!)
PGRST_GUARD_LOG_LEVEL=warn target/release/pgrst-guard --listen "127.0.0.1:$GUARD_PGRST" --upstream "http://127.0.0.1:$PGRST_PORT" --upstream-admin "http://127.0.0.1:$PGRST_ADMIN" --db-uri "$DB_URI" >"$WORK/guard-postgrest.log" 2>&1 &
PIDS+=($!)
wait_port "$GUARD_STATIC"; wait_port "$GUARD_DOUBLE"; wait_port "$GUARD_PGRST"
sleep 1
IDLE_KB=$(rss_kb "$GUARD_STATIC_PID")

declare -A RPS P50 P99
run_wrk() { # name url connections round
  local threads=1; [ "$3" -gt 1 ] && threads=2
  local out; out=$(wrk -t"$threads" -c"$3" -d"${DURATION}s" --latency "$2")
  RPS[$1/$3/$4]=$(awk '/^Requests\/sec/ {printf "%d", $2}' <<<"$out")
  P50[$1/$3/$4]=$(awk '$1=="50%" {print $2}' <<<"$out" | to_us)
  P99[$1/$3/$4]=$(awk '$1=="99%" {print $2}' <<<"$out" | to_us)
  printf '  round %s %-16s c=%-3s %8s req/s  p50 %8s us  p99 %8s us\n' "$4" "$1" "$3" "${RPS[$1/$3/$4]}" "${P50[$1/$3/$4]}" "${P99[$1/$3/$4]}"
}
values() { local -n table=$1; local key=$2; for r in $(seq 1 "$ROUNDS"); do echo "${table[$key/$r]}"; done; }
echo "load: wrk, ${DURATION}s per run, $ROUNDS rounds"
for r in $(seq 1 "$ROUNDS"); do
  for c in ${CONNECTIONS:-1 32}; do
    for up in static postgrest double; do
      case $up in
        static) direct=$ORIGIN_PORT; guard=$GUARD_STATIC; proxy=$NGINX_STATIC; path=/bench_items ;;
        postgrest) direct=$PGRST_PORT; guard=$GUARD_PGRST; proxy=$NGINX_PGRST; path="/bench_items?select=id,name&id=gt.0&order=id&limit=2" ;;
        double) direct=$DOUBLE_PORT; guard=$GUARD_DOUBLE; proxy=$NGINX_DOUBLE; path=/bench_items ;;
      esac
      run_wrk "$up-direct" "http://127.0.0.1:$direct$path" "$c" "$r"
      run_wrk "$up-guard" "http://127.0.0.1:$guard$path" "$c" "$r"
      run_wrk "$up-nginx" "http://127.0.0.1:$proxy$path" "$c" "$r"
    done
  done
done
declare -A MRPS MP50 MP99 SRPS
for key in "${!RPS[@]}"; do
  base=${key%/*}
  [ -n "${MRPS[$base]:-}" ] && continue
  MRPS[$base]=$(median $(values RPS "$base")); SRPS[$base]=$(spread $(values RPS "$base"))
  MP50[$base]=$(median $(values P50 "$base")); MP99[$base]=$(median $(values P99 "$base"))
done

# Memory of the static-origin guard: idle (above), 1,000 keep-alive connections, 100 MiB upload.
ulimit -n 65536 2>/dev/null || true
python3 bench/hold_connections.py 127.0.0.1 "$GUARD_STATIC" 1000 /bench_items < <(sleep 600) >"$WORK/hold.out" 2>&1 &
HOLD_PID=$!
for _ in $(seq 1 200); do grep -q ready "$WORK/hold.out" 2>/dev/null && break; sleep 0.05; done
CONN_KB=$(rss_kb "$GUARD_STATIC_PID")
kill "$HOLD_PID" 2>/dev/null || true
sleep 1
head -c $((100 * 1024 * 1024)) /dev/zero >"$WORK/upload.bin"
BEFORE_HWM=$(hwm_kb "$GUARD_STATIC_PID"); BEFORE_RSS=$(rss_kb "$GUARD_STATIC_PID")
curl -s -o /dev/null -w '%{http_code}' --data-binary @"$WORK/upload.bin" -H 'content-type: application/octet-stream' "http://127.0.0.1:$GUARD_STATIC/bench_items" >"$WORK/upload.status"
AFTER_HWM=$(hwm_kb "$GUARD_STATIC_PID")
UPLOAD_GROWTH_KB=$(( AFTER_HWM > BEFORE_RSS ? AFTER_HWM - BEFORE_RSS : 0 ))

echo "heal cost"
HEAL_TABLE=$(target/release/examples/bench_heal 2>"$WORK/heal.log")
echo "heal cost on the real PostgREST with a big schema"
HEAL_REAL=$(PGRST_GUARD_TEST_POSTGREST="$POSTGREST_DIR" target/release/examples/bench_heal_real ${BIG_SCHEMA_TABLES:-2000} 30 2>"$WORK/heal-real.log")

{
  echo "## Latest run ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${DURATION}s per load run)"
  echo
  echo "Medians of $ROUNDS rounds; req/s spread (min–max) in brackets."
  echo
  echo "| upstream | conns | direct req/s | guard req/s | nginx req/s | guard/nginx | guard/direct | p50 direct / guard / nginx (us) | p99 direct / guard / nginx (us) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for up in static postgrest double; do for c in 1 32; do
    echo "| $up | $c | ${MRPS[$up-direct/$c]} (${SRPS[$up-direct/$c]}) | ${MRPS[$up-guard/$c]} (${SRPS[$up-guard/$c]}) | ${MRPS[$up-nginx/$c]} (${SRPS[$up-nginx/$c]}) | $(ratio "${MRPS[$up-guard/$c]}" "${MRPS[$up-nginx/$c]}") | $(ratio "${MRPS[$up-guard/$c]}" "${MRPS[$up-direct/$c]}") | ${MP50[$up-direct/$c]} / ${MP50[$up-guard/$c]} / ${MP50[$up-nginx/$c]} | ${MP99[$up-direct/$c]} / ${MP99[$up-guard/$c]} / ${MP99[$up-nginx/$c]} |"
  done; done
  echo
  echo "Guard p50 over direct at 1 connection: static $(diff_us "${MP50[static-guard/1]}" "${MP50[static-direct/1]}") us (nginx $(diff_us "${MP50[static-nginx/1]}" "${MP50[static-direct/1]}") us), PostgREST $(diff_us "${MP50[postgrest-guard/1]}" "${MP50[postgrest-direct/1]}") us (nginx $(diff_us "${MP50[postgrest-nginx/1]}" "${MP50[postgrest-direct/1]}") us)."
  echo
  echo "| memory (guard in front of the static origin) | resident |"
  echo "|---|---|"
  echo "| idle | $((IDLE_KB / 1024)) MiB |"
  echo "| 1,000 open keep-alive connections | $((CONN_KB / 1024)) MiB |"
  echo "| peak growth during a 100 MiB upload (HTTP $(cat "$WORK/upload.status")) | $((UPLOAD_GROWTH_KB / 1024)) MiB |"
  echo
  echo "Heal cost (stale-cache error to replayed answer, minus the double's own load time):"
  echo
  echo "$HEAL_TABLE"
  echo
  echo "Heal cost on the real PostgREST 14 with a big schema (the heal time minus PostgREST's own reload):"
  echo
  echo "$HEAL_REAL"
} | tee "$OUT"
