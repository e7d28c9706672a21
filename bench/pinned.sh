#!/usr/bin/env bash
# Requests per second per proxy core: nginx (one worker) and pgrst-guard (one worker) each pinned
# alone on core 0, the static origin and wrk on the other cores, in alternation over ROUNDS rounds.
#   bash bench/pinned.sh           (DURATION=10 seconds per run, ROUNDS=3, CONNECTIONS="1 32")
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 cores" >&2; exit 1; }
LAST=$(( $(nproc) - 1 ))
cargo build --release --quiet --bin pgrst-guard
start_postgres

ORIGIN_PORT=$(free_port); NGINX_PORT=$(free_port); GUARD_PORT=$(free_port)
start_nginx origin auto "$(origin_server "$ORIGIN_PORT")" "1-$LAST"; wait_port "$ORIGIN_PORT"
start_nginx proxy 1 "upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 128; } $(proxy_server "$NGINX_PORT" origin)" 0
wait_port "$NGINX_PORT"
PGRST_GUARD_LOG_LEVEL=warn taskset -c 0 target/release/pgrst-guard --workers 1 --listen "127.0.0.1:$GUARD_PORT" --upstream "http://127.0.0.1:$ORIGIN_PORT" --db-uri "$DB_URI" >"$WORK/guard.log" 2>&1 &
PIDS+=($!); wait_port "$GUARD_PORT"
sleep 1
declare -A RPS
for r in $(seq 1 "$ROUNDS"); do for c in ${CONNECTIONS:-1 32}; do for proxy in nginx guard; do
  port=$NGINX_PORT; [ $proxy = guard ] && port=$GUARD_PORT
  threads=1; [ "$c" -gt 1 ] && threads=2
  RPS[$proxy/$c/$r]=$(taskset -c "1-$LAST" wrk -t"$threads" -c"$c" -d"${DURATION}s" "http://127.0.0.1:$port/bench_items" | awk '/^Requests\/sec/ {printf "%d", $2}')
  echo "  round $r c=$c $proxy ${RPS[$proxy/$c/$r]} req/s on one core"
done; done; done
values() { for r in $(seq 1 "$ROUNDS"); do echo "${RPS[$1/$r]}"; done; }
echo
echo "| conns | nginx req/s per core | guard req/s per core | guard/nginx |"
echo "|---|---|---|---|"
for c in ${CONNECTIONS:-1 32}; do
  n=$(median $(values "nginx/$c")); g=$(median $(values "guard/$c"))
  echo "| $c | $n ($(spread $(values "nginx/$c"))) | $g ($(spread $(values "guard/$c"))) | $(ratio "$g" "$n") |"
done
