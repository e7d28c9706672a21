# Shared by the bench scripts: the settings, a work directory removed at exit, helpers, a throwaway
# PostgreSQL and the real PostgREST 14. Sourced from the project's root.
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
POSTGREST_DIR=${PGRST_GUARD_TEST_POSTGREST:-$(cd .. && pwd)/shared/postgrest}
WORK=$(mktemp -d "/tmp/pgrst-guard-$(basename "$0" .sh).XXXXXX")
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Every nginx the script started writes a pid file there.
  for pidfile in "$WORK"/*.pid; do [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; done
  [ -n "${PGDATA_DIR:-}" ] && as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1 || { echo "installing $2"; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
# wrk's latency lines look like "50%  123.00us"; print them in microseconds.
to_us() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); print v } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v*1000 } else if (v ~ /s$/) { sub(/s$/,"",v); print v*1000000 } }'; }
# The median and the spread (min–max) of numbers.
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
spread() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s–%s", lo, hi }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
diff_us() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f", a - b }'; }

need wrk wrk
need nginx nginx

# PostgreSQL with the bench table and PostgREST's roles; sets DB_URI and PG_PORT.
start_postgres() {
  PG_BIN=$(pg_config --bindir); [ -x "$PG_BIN/initdb" ] || PG_BIN=/usr/lib/postgresql/15/bin
  PGDATA_DIR=$WORK/pg; PG_PORT=$(free_port)
  mkdir -p "$PGDATA_DIR"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDATA_DIR"
  as_postgres "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust --no-sync >/dev/null
  as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/log" -w -o "-p $PG_PORT -k $PGDATA_DIR -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
  DB_URI="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  psql -q "$DB_URI" -c "CREATE TABLE bench_items (id int PRIMARY KEY, name text, created_at timestamptz DEFAULT '2026-01-01');
                        INSERT INTO bench_items (id, name) SELECT g, 'item ' || g FROM generate_series(1, 3) g;
                        CREATE ROLE anon NOLOGIN; CREATE ROLE authenticator LOGIN NOINHERIT; GRANT anon TO authenticator;
                        GRANT USAGE ON SCHEMA public TO anon; GRANT SELECT ON bench_items TO anon;"
}

# The newest PostgREST 14 of POSTGREST_DIR; sets PGRST_PORT and PGRST_ADMIN.
start_postgrest() {
  PGRST_BIN=$WORK/postgrest
  local src; src=$(ls "$POSTGREST_DIR"/postgrest-14.* | sort -V | tail -n 1)
  case "$src" in *.xz) xz -dc "$src" >"$PGRST_BIN" ;; *) cp "$src" "$PGRST_BIN" ;; esac
  chmod +x "$PGRST_BIN"
  PGRST_PORT=$(free_port); PGRST_ADMIN=$(free_port)
  cat >"$WORK/postgrest.conf" <<CONF
db-uri = "postgresql://authenticator@127.0.0.1:$PG_PORT/postgres"
db-schemas = "public"
db-anon-role = "anon"
db-pool = 20
server-host = "127.0.0.1"
server-port = $PGRST_PORT
admin-server-port = $PGRST_ADMIN
log-level = "error"
CONF
  LANG=C.UTF-8 "$PGRST_BIN" "$WORK/postgrest.conf" >"$WORK/postgrest.log" 2>&1 &
  PIDS+=($!); wait_port "$PGRST_PORT"
}

# start_nginx NAME WORKERS HTTP-BLOCK [CPUS]: an nginx of its own (config, pid and log named NAME),
# pinned to CPUS when given; returns once it runs.
start_nginx() {
  cat >"$WORK/$1.conf" <<CONF
worker_processes $2;
pid $WORK/$1.pid;
error_log $WORK/$1-error.log warn;
events { worker_connections 8192; }
http { access_log off; $3 }
CONF
  if [ -n "${4:-}" ]; then taskset -c "$4" nginx -c "$WORK/$1.conf" -p "$WORK"; else nginx -c "$WORK/$1.conf" -p "$WORK"; fi
}
# The static origin's server block: a small PostgREST-like JSON answer.
origin_server() { echo "server { listen 127.0.0.1:$1; client_max_body_size 0; location / { default_type \"application/json; charset=utf-8\"; return 200 '$BENCH_BODY'; } }"; }
# A proxy's server block on port $1 to the upstream named $2 (keep-alive to it).
proxy_server() { echo "server { listen 127.0.0.1:$1; client_max_body_size 0; location / { proxy_pass http://$2; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"; }

BENCH_BODY='[{"id":1,"name":"item 1","created_at":"2026-01-01T00:00:00+00:00"},{"id":2,"name":"item 2","created_at":"2026-01-01T00:00:00+00:00"}]'
