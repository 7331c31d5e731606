#!/usr/bin/env bash
# Cold start: a freshly started pooler under `pgbench -S -c CLIENTS -T DUR` against one
# throwaway PostgreSQL 15 (scale 10, fsync off, trust). Per round, a new pooler process
# (so its pool is empty), then pgbench with per-second aggregates: prints the largest
# transaction latency of each second and of the whole run, and for pgsilo its SHOW ACQUIRE
# afterwards (where the waiting went, by how each client got its server). Prints the load
# average before and after: the figures are indications on a shared machine.
#
#   benches/cold_start.sh PGSILO_BINARY [more pgsilo binaries...]
#   ROUNDS=5 DUR=2 CLIENTS=20 PGBOUNCER=1 MIN_POOL=0 FORCED=0 benches/cold_start.sh target/release/pgsilo
#
# PGBOUNCER=1 adds rounds of the system's pgbouncer (same pool size) for comparison.
# MIN_POOL sets min_pool_size; with FORCED=1 the database forces its user (postgres), so
# the pool is opened ahead of pgbench, as PgBouncer does for such databases.
# Run as root (the cluster runs as postgres).
set -euo pipefail
ROUNDS=${ROUNDS:-5} DUR=${DUR:-2} CLIENTS=${CLIENTS:-20} PGBOUNCER=${PGBOUNCER:-0} MIN_POOL=${MIN_POOL:-0}
FORCED=${FORCED:-0}
FORCE_TOML="" FORCE_INI=""
if [ "$FORCED" = 1 ]; then FORCE_TOML='user = "postgres"' FORCE_INI=" user=postgres"; fi
# shellcheck source=tools/throwaway_pg.sh
. "$(dirname "$0")/tools/throwaway_pg.sh"
W=$(mktemp -d /tmp/pgsilo-cold.XXXX)
PGP=$((25000 + RANDOM % 5000))
PORT=$((PGP + 1))
POOLER_PID=""
stop_pooler() {
  if [ -n "$POOLER_PID" ]; then
    kill "$POOLER_PID" 2>/dev/null || true
    wait "$POOLER_PID" 2>/dev/null || true
    POOLER_PID=""
  fi
}
throwaway_pg "$W" $PGP "max_connections = 200" "shared_buffers = 256MB"
trap 'stop_pooler; throwaway_pg_cleanup "$W"' EXIT
$BIN/pgbench -h 127.0.0.1 -p $PGP -U postgres -i -s 10 -q postgres >/dev/null 2>&1
echo '"postgres" ""' >"$W/users.txt"

wait_listening() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return
    sleep 0.1
  done
  echo "pooler did not start:" >&2
  cat "$W/pooler.log" >&2
  exit 1
}

start_pgsilo() {
  cat >"$W/pgsilo.toml" <<T
[pgsilo]
listen_addr = "127.0.0.1"
listen_port = $PORT
auth_type = "trust"
auth_file = "$W/users.txt"
pool_mode = "transaction"
default_pool_size = 20
min_pool_size = $MIN_POOL
max_client_conn = $((CLIENTS + 100))
takeover_socket = ""
admin_users = ["postgres"]
log_connections = false
log_disconnections = false
[databases.postgres]
host = "127.0.0.1"
port = $PGP
$FORCE_TOML
T
  setsid "$1" "$W/pgsilo.toml" >"$W/pooler.log" 2>&1 </dev/null &
  POOLER_PID=$!
  wait_listening
}

start_pgbouncer() {
  cat >"$W/pgbouncer.ini" <<T
[databases]
postgres = host=127.0.0.1 port=$PGP$FORCE_INI
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
auth_type = trust
auth_file = $W/users.txt
pool_mode = transaction
default_pool_size = 20
min_pool_size = $MIN_POOL
max_client_conn = $((CLIENTS + 100))
unix_socket_dir =
T
  /usr/sbin/pgbouncer -u postgres "$W/pgbouncer.ini" >"$W/pooler.log" 2>&1 </dev/null &
  POOLER_PID=$!
  wait_listening
}

# round NAME: pgbench on a fresh pooler; prints each second's largest latency (ms).
round() {
  rm -f "$W"/pgbench_log.*
  (cd "$W" && $BIN/pgbench -h 127.0.0.1 -p $PORT -U postgres -n -S -c "$CLIENTS" -j 2 -T "$DUR" \
    -l --aggregate-interval=1 --log-prefix="$W/pgbench_log" postgres >"$W/pgbench.out" 2>&1) || {
    cat "$W/pgbench.out" >&2
    return
  }
  # interval_start n sum sum2 min max (one file per pgbench thread): latencies in
  # microseconds; the seconds are wall-clock ones, so the first and last are partial.
  cat "$W"/pgbench_log.* | sort -n | awk -v name="$1" -v load="$(cut -d' ' -f1 /proc/loadavg)" '
    { if (!($1 in sec)) order[k++] = $1; if ($6 > sec[$1]) sec[$1] = $6; if ($6 > max) max = $6; n += $2 }
    END {
      for (i = 0; i < k; i++) per = per sprintf(" %6.1f", sec[order[i]] / 1000)
      printf "%-10s max_ms=%6.1f per_second_max_ms=[%s ] tx=%d load1=%s\n", name, max / 1000, per, n, load
    }'
}

echo "load before: $(cat /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  for b in "$@"; do
    start_pgsilo "$b"
    round "$(basename "$(dirname "$(realpath "$b")")")"
    if [ "${SHOW_ACQUIRE:-1}" = 1 ]; then
      psql -h 127.0.0.1 -p $PORT -U postgres -X -A -F' ' -c 'SHOW ACQUIRE' pgsilo 2>/dev/null | sed 's/^/    /' || true
    fi
    stop_pooler
  done
  if [ "$PGBOUNCER" = 1 ]; then
    start_pgbouncer
    round pgbouncer
    stop_pooler
  fi
done
echo "load after: $(cat /proc/loadavg)"
