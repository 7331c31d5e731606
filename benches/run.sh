#!/usr/bin/env bash
# `make bench`: pgsilo against PgBouncer and against PostgreSQL itself, on this machine,
# in one go. See benches/README.md for what is measured and how to read it.
#
#   1. builds pgsilo (release) and benches/tools/idle_clients.rs (plain rustc);
#   2. starts a throwaway PostgreSQL (fsync off, pgbench scale 10, max_connections above
#      the largest client count) under $BENCH_OUT/run, a pgsilo and, when installed, a
#      PgBouncer: both transaction pooling, the same pool size, scram-sha-256 for the same
#      user with the same auth_file (PostgreSQL's own verifier, so both log in to the
#      server by SCRAM passthrough);
#   3. pgbench: -S in -M simple/extended/prepared at 1, 20, 200 and 1000 clients, -S -C
#      (a new SCRAM login per transaction) and the TPC-B-like default script, each against
#      every target in turn (the order rotates per configuration, so drift hits all alike),
#      each measured over a window that opens once all its clients are connected;
#   4. memory: 10,000 idle clients logged in to a fresh pgsilo, then a fresh PgBouncer
#      (trust authentication), RSS per client;
#   5. writes $BENCH_OUT/report.md (also printed), results.csv and memory.csv; stops
#      everything it started, also on failure or Ctrl-C.
#
# Environment (defaults in brackets):
#   BENCH_SECONDS [8; quick 5]   the measured window of each pgbench run
#   BENCH_QUICK [0]              1: clients "20 200" only, shorter runs (about 4 minutes)
#   BENCH_CLIENTS ["1 20 200 1000"]  client counts for the -S runs
#   BENCH_MODES ["simple extended prepared"]
#   BENCH_EXTRA ["connect tpcb"] the -S -C run and the TPC-B run (both at 20 clients)
#   BENCH_TARGETS ["postgres pgbouncer pgsilo"]
#   BENCH_FRONT ["tls unix"]     the front-door cells, after the main matrix: each pooler
#                                again with TLS both ways (clients sslmode=require, server
#                                TLS to PostgreSQL with ssl = on) and with clients on its
#                                Unix socket; -S -M simple and extended, and -S -C (a new login per
#                                transaction, with its TLS handshake) at 20 clients. "" skips.
#   BENCH_ROUNDS [5]             repeat the whole matrix, alternating targets; the summary
#                                shows medians with min–max, and marks noisy cells
#   BENCH_PERF [1]               perf stat on the pooler: system calls and context switches
#                                per transaction (skipped where perf cannot count)
#   BENCH_JOBS [2]               pgbench -j (at most the client count)
#   BENCH_POOL_SIZE [20]         default_pool_size of both poolers
#   BENCH_SCALE [10]             pgbench scale
#   BENCH_WARMUP [3]             seconds of unmeasured -S load per target first
#   BENCH_IDLE_CLIENTS [10000]   0 skips the memory run
#   BENCH_SCRAM_ITERATIONS [4096] the bench user's verifier; fewer makes pgbench -C spend
#                                less of the machine on the client's own PBKDF2
#   BENCH_POOLER_CPUS []         a taskset list for both poolers (default: not pinned)
#   BENCH_PROFILE [shared]       pinned: the pinned profile, the pooler on the last core
#                                and PostgreSQL and pgbench on the others (taskset), so
#                                the pooler's cost shows apart from theirs; shared: no
#                                pinning (the poolers' own defaults)
#   BENCH_COLD_ROUNDS [ROUNDS]   cold start: per round each pooler is restarted and
#                                pgbench -S -c 20 runs from its first moment for
#                                BENCH_COLD_SECONDS [2] s (connecting included); 0 skips
#   BENCH_LOG_CONNECTIONS [0]    1: both poolers log every connect/disconnect
#   BENCH_PORT [16400]           PostgreSQL; the poolers use the next four ports (keep them
#                                below the ephemeral range, 32768+, or a client socket may hold one)
#   BENCH_OUT [target/bench]     where the report goes; scratch files under BENCH_OUT/run
#   BENCH_KEEP_LOGS [0]          1: keep pgbench's per-transaction logs
#   PGSILO_BIN                   a pgsilo binary to use instead of building one
#   CARGO_TARGET_DIR, CARGO
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
CARGO=${CARGO:-cargo}
OUT=${BENCH_OUT:-$ROOT/target/bench}
case "$OUT" in /*) ;; *) OUT=$ROOT/$OUT ;; esac
RUN=$OUT/run
TOOLS=$ROOT/benches/tools

QUICK=${BENCH_QUICK:-0}
# perf stat for system calls and context switches per transaction, where perf works.
PERF=0
if [ "${BENCH_PERF:-1}" = 1 ] && command -v perf >/dev/null \
  && perf stat -x, -e raw_syscalls:sys_enter,context-switches -- true >/dev/null 2>&1; then
  PERF=1
fi
if [ "$QUICK" = 1 ]; then
  SECS=${BENCH_SECONDS:-5}
  CLIENTS=${BENCH_CLIENTS:-"20 200"}
else
  SECS=${BENCH_SECONDS:-8}
  CLIENTS=${BENCH_CLIENTS:-"1 20 200 1000"}
fi
MODES=${BENCH_MODES:-"simple extended prepared"}
EXTRA=${BENCH_EXTRA-"connect tpcb"}
TARGETS=${BENCH_TARGETS:-"postgres pgbouncer pgsilo"}
FRONT=${BENCH_FRONT-"tls unix"}
ROUNDS=${BENCH_ROUNDS:-5}
JOBS=${BENCH_JOBS:-2}
POOL=${BENCH_POOL_SIZE:-20}
SCALE=${BENCH_SCALE:-10}
WARMUP=${BENCH_WARMUP:-3}
IDLE=${BENCH_IDLE_CLIENTS:-10000}
SCRAM_ITER=${BENCH_SCRAM_ITERATIONS:-4096}
POOLER_CPUS=${BENCH_POOLER_CPUS:-}
PROFILE=${BENCH_PROFILE:-shared}
# The pinned profile: PostgreSQL and pgbench on the first cores, the pooler on the last.
OTHERS_PIN=()
case $PROFILE in
  shared) ;;
  pinned)
    NCPU=$(nproc)
    [ "$NCPU" -ge 2 ] || die "BENCH_PROFILE=pinned needs at least 2 cores"
    POOLER_CPUS=${POOLER_CPUS:-$((NCPU - 1))}
    OTHERS_PIN=(taskset -c "0-$((NCPU - 2))")
    ;;
  *) die "unknown BENCH_PROFILE $PROFILE (shared, pinned)" ;;
esac
COLD_ROUNDS=${BENCH_COLD_ROUNDS:-${BENCH_ROUNDS:-5}}
COLD_SECS=${BENCH_COLD_SECONDS:-2}
LOGCONN=${BENCH_LOG_CONNECTIONS:-0}
KEEP_LOGS=${BENCH_KEEP_LOGS:-0}
PGPORT=${BENCH_PORT:-16400}
SILO_PORT=$((PGPORT + 1))
PGB_PORT=$((PGPORT + 2))
MEM_SILO_PORT=$((PGPORT + 3))
MEM_PGB_PORT=$((PGPORT + 4))
SILO_TLS_PORT=$((PGPORT + 5))
PGB_TLS_PORT=$((PGPORT + 6))
SILO_UNIX_PORT=$((PGPORT + 7))
PGB_UNIX_PORT=$((PGPORT + 8))
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
USER_NAME=bench
PASSWORD=bench_pass
DB=bench

say() { printf 'bench: %s\n' "$*" >&2 2>/dev/null || true; }
die() { printf 'bench: %s\n' "$*" >&2 2>/dev/null || true; exit 2; }
trap '' PIPE

pg_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] || die "no PostgreSQL server found; install it with: apt-get install postgresql"
  echo "$d"
}

# PostgreSQL and PgBouncer refuse to run as root: run them as the postgres user then.
PGUSER_OS=postgres
id -u postgres >/dev/null 2>&1 || PGUSER_OS=nobody
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid="$PGUSER_OS" --regid="$(id -g "$PGUSER_OS")" --clear-groups -- "$@"
  else
    "$@"
  fi
}
own_pg() { if [ "$(id -u)" = 0 ]; then chown -R "$PGUSER_OS" "$@"; fi; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local i
  for i in $(seq 1 150); do port_busy "$1" && return 0; sleep 0.1; done
  return 1
}

# --- what we start, and stopping it --------------------------------------------------
PG_STARTED=0
declare -A PID=()       # target -> pooler pid (pgsilo, pgbouncer, mem-pgsilo, mem-pgbouncer)
OPENER_PID=

stop_pid() {  # pid signal
  local pid=$1 sig=${2:-INT} i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -"$sig" "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

stop_pooler() {  # name
  local name=$1
  [ -n "${PID[$name]:-}" ] || return 0
  case $name in *pgbouncer) stop_pid "${PID[$name]}" TERM ;; *) stop_pid "${PID[$name]}" INT ;; esac
  unset "PID[$name]"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$OPENER_PID" ] && stop_pid "$OPENER_PID" TERM
  local n
  for n in "${!PID[@]}"; do stop_pooler "$n"; done
  if [ "$PG_STARTED" = 1 ]; then
    as_pg "$(pg_bindir)/pg_ctl" -D "$RUN/pg" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$RUN/pg"
  fi
  [ "$rc" = 0 ] || say "failed (exit $rc); logs in $RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# --- preflight -----------------------------------------------------------------------
command -v pgbench >/dev/null || die "pgbench is missing (apt-get install postgresql-client)"
# The system's Python if there is one: a version manager's shim costs 0.2 s a call.
PY=${PYTHON:-$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || command -v python3 || true)}
[ -n "$PY" ] || die "python3 is missing"
BIN=${PGSILO_BIN:-$TARGET/release/pgsilo}
have_pgbouncer=0
[ -x "$PGBOUNCER" ] && have_pgbouncer=1
if [ "$have_pgbouncer" = 0 ]; then
  say "PgBouncer not found at $PGBOUNCER: comparing pgsilo with PostgreSQL only"
  TARGETS=$(echo "$TARGETS" | tr ' ' '\n' | grep -v '^pgbouncer$' | paste -sd' ')
fi
for p in $PGPORT $SILO_PORT $PGB_PORT $MEM_SILO_PORT $MEM_PGB_PORT; do
  port_busy "$p" && die "127.0.0.1:$p is in use; set BENCH_PORT to another base port"
done

# File descriptors: 1000 pgbench clients, and IDLE idle clients (opener and pooler each).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$IDLE" -gt 0 ] && [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((IDLE + 500)) ]; then
  say "fd limit $NOFILE is too low for $IDLE idle clients; using $((NOFILE - 500))"
  IDLE=$((NOFILE - 500))
fi
MAX_CLIENTS=0
for c in $CLIENTS 20; do [ "$c" -gt "$MAX_CLIENTS" ] && MAX_CLIENTS=$c; done
MAX_CLIENT_CONN=$(( (IDLE > MAX_CLIENTS ? IDLE : MAX_CLIENTS) + 1000 ))

mkdir -p "$OUT"
rm -rf "$RUN"
mkdir -p "$RUN/pg" "$RUN/sock" "$RUN/pgbouncer" "$RUN/pgbench" "$RUN/logs" "$RUN/tls" "$RUN/usock"
own_pg "$RUN/pg" "$RUN/sock" "$RUN/pgbouncer" "$RUN/logs"
as_pg test -w "$RUN/pg" || die "the $PGUSER_OS user cannot write to $RUN (a parent folder is not searchable?)"
CSV=$OUT/results.csv
MEMCSV=$OUT/memory.csv
META=$OUT/meta.txt
rm -f "$CSV" "$MEMCSV" "$META" "$OUT/report.md"
echo "round,seq,workload,mode,clients,jobs,target,status,tps,transactions,failed,avg_ms,p50_ms,p99_ms,p999_ms,max_ms,conn_ms,window_s,pgbench_tps,pooler_cpu_s,cpu_us_per_tx,pg_cpu_us_per_tx,pgbench_cpu_us_per_tx,peak_rss_kib,busy_pct,other_pct,syscalls_per_tx,cs_per_tx,note" >"$CSV"
echo "target,count,ok,failed,secs,rss_before_kib,rss_after_kib,hwm_after_kib,fds_after,note" >"$MEMCSV"

meta() { printf '%s=%s\n' "$1" "$2" >>"$META"; }
started=$(date +%s)
meta date_start "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
meta commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo '+dirty')"
meta nproc "$(nproc)"
meta cpu_model "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
meta mem "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

# --- build -----------------------------------------------------------------------------
if [ -z "${PGSILO_BIN:-}" ]; then
  say "building pgsilo (release)"
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET "$CARGO" build --release --bin pgsilo) >&2
fi
[ -x "$BIN" ] || die "$BIN is missing"
OPENER=$OUT/idle_clients
if [ "$IDLE" -gt 0 ]; then
  rustc --edition 2021 -O "$TOOLS/idle_clients.rs" -o "$OPENER" >&2 || die "could not build benches/tools/idle_clients.rs"
fi

# --- PostgreSQL --------------------------------------------------------------------------
PGBIN=$(pg_bindir)
PG_MAX_CONN=$((MAX_CLIENTS + 2 * POOL + 50))
say "starting PostgreSQL on 127.0.0.1:$PGPORT (max_connections $PG_MAX_CONN)"
as_pg "$PGBIN/initdb" -D "$RUN/pg" -U postgres --auth=trust --no-sync -E UTF8 >"$RUN/logs/initdb.log" 2>&1 \
  || { cat "$RUN/logs/initdb.log" >&2; die "initdb failed"; }
cat >>"$RUN/pg/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$RUN/sock'
max_connections = $PG_MAX_CONN
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
CONF
# TLS for the front-door cells: one self-signed CA, one certificate for localhost, used by
# PostgreSQL and both poolers. Plain cells set server TLS off explicitly, so ssl = on
# changes nothing for them.
if [ -n "$FRONT" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=bench-ca \
    -keyout "$RUN/tls/ca.key" -out "$RUN/tls/ca.crt" >/dev/null 2>&1
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
    -keyout "$RUN/tls/server.key" -out "$RUN/tls/server.csr" >/dev/null 2>&1
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$RUN/tls/ext"
  openssl x509 -req -in "$RUN/tls/server.csr" -CA "$RUN/tls/ca.crt" -CAkey "$RUN/tls/ca.key" -CAcreateserial \
    -days 30 -extfile "$RUN/tls/ext" -out "$RUN/tls/server.crt" >/dev/null 2>&1 || die "openssl could not make certificates"
  cp "$RUN/tls/server.crt" "$RUN/tls/server.key" "$RUN/pg/"
  chmod 0600 "$RUN/pg/server.key" "$RUN/tls/server.key"
  own_pg "$RUN/pg/server.crt" "$RUN/pg/server.key" "$RUN/tls" "$RUN/usock"
  printf "ssl = on\n" >>"$RUN/pg/postgresql.conf"
fi
cat >"$RUN/pg/pg_hba.conf" <<HBA
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
HBA
PG_STARTED=1
as_pg "${OTHERS_PIN[@]}" "$PGBIN/pg_ctl" -D "$RUN/pg" -l "$RUN/logs/postgres.log" -w start >/dev/null \
  || { tail -20 "$RUN/logs/postgres.log" >&2; die "PostgreSQL did not start"; }
PSQL=("$PGBIN/psql" -X -q -A -t -h "$RUN/sock" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "CREATE ROLE $USER_NAME LOGIN PASSWORD '$PASSWORD'" \
  -c "CREATE DATABASE $DB OWNER $USER_NAME" >/dev/null
if [ "$SCRAM_ITER" != 4096 ]; then
  # PostgreSQL 15 always uses 4096 iterations; a verifier made elsewhere is stored as given.
  "${PSQL[@]}" -d postgres -c "ALTER ROLE $USER_NAME PASSWORD '$("$PY" "$TOOLS/bench.py" verifier "$PASSWORD" "$SCRAM_ITER")'" >/dev/null
fi
VERIFIER=$("${PSQL[@]}" -d postgres -c "SELECT rolpassword FROM pg_authid WHERE rolname = '$USER_NAME'")
case "$VERIFIER" in SCRAM-SHA-256\$*) ;; *) die "expected a SCRAM verifier for $USER_NAME, got: $VERIFIER" ;; esac
say "pgbench -i -s $SCALE"
PGPASSWORD=$PASSWORD pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PGPORT" -U "$USER_NAME" "$DB" >"$RUN/logs/pgbench-init.log" 2>&1 \
  || { cat "$RUN/logs/pgbench-init.log" >&2; die "pgbench -i failed"; }
meta pg_version "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}')"
meta pgbench_version "pgbench $(pgbench --version | awk '{print $3}')"

# --- the poolers -------------------------------------------------------------------------
# The same auth_file for both: PostgreSQL's verifier, so each proves the client's password
# and logs in to the server by SCRAM passthrough.
printf '"%s" "%s"\n' "$USER_NAME" "$VERIFIER" >"$RUN/userlist_scram.txt"
# The memory run uses trust for clients; the poolers then log in to PostgreSQL with the password.
printf '"%s" "%s"\n' "$USER_NAME" "$PASSWORD" >"$RUN/userlist_plain.txt"
chmod 0644 "$RUN"/userlist_*.txt

logconn=false; [ "$LOGCONN" = 1 ] && logconn=true
write_pgsilo_conf() {  # file port auth_type userlist [front: tls|unix]
  local front=${5:-} extra="server_tls_sslmode = \"disable\"
unix_socket_dir = \"\""
  case $front in
    tls) extra="client_tls_sslmode = \"require\"
client_tls_cert_file = \"$RUN/tls/server.crt\"
client_tls_key_file = \"$RUN/tls/server.key\"
server_tls_sslmode = \"require\"
unix_socket_dir = \"\"" ;;
    unix) extra="server_tls_sslmode = \"disable\"
unix_socket_dir = \"$RUN/usock\"" ;;
  esac
  cat >"$1" <<TOML
# Written by benches/run.sh.
[pgsilo]
name = "bench"
listen_addr = "127.0.0.1"
listen_port = $2
listen_backlog = 4096
auth_type = "$3"
auth_file = "$4"
pool_mode = "transaction"
max_client_conn = $MAX_CLIENT_CONN
default_pool_size = $POOL
log_connections = $logconn
log_disconnections = $logconn
takeover_socket = ""
$extra

[databases.$DB]
host = "127.0.0.1"
port = $PGPORT
dbname = "$DB"
TOML
}

write_pgbouncer_ini() {  # file port auth_type userlist [front: tls|unix]
  local lc=0; [ "$LOGCONN" = 1 ] && lc=1
  local front=${5:-} extra="server_tls_sslmode = disable
unix_socket_dir ="
  case $front in
    tls) extra="client_tls_sslmode = require
client_tls_cert_file = $RUN/tls/server.crt
client_tls_key_file = $RUN/tls/server.key
server_tls_sslmode = require
unix_socket_dir =" ;;
    unix) extra="server_tls_sslmode = disable
unix_socket_dir = $RUN/usock" ;;
  esac
  cat >"$1" <<INI
; Written by benches/run.sh.
[databases]
$DB = host=127.0.0.1 port=$PGPORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
listen_backlog = 4096
$extra
auth_type = $3
auth_file = $4
pool_mode = transaction
max_client_conn = $MAX_CLIENT_CONN
default_pool_size = $POOL
log_connections = $lc
log_disconnections = $lc
INI
  own_pg "$1"
}

# Command prefixes that exec (setpriv, taskset), so $! is the pooler's own pid.
PIN=(); [ -n "$POOLER_CPUS" ] && PIN=(taskset -c "$POOLER_CPUS")
AS_PG=(); [ "$(id -u)" = 0 ] && AS_PG=(setpriv --reuid="$PGUSER_OS" --regid="$(id -g "$PGUSER_OS")" --clear-groups --)

start_pgsilo() {  # name conf port
  "$BIN" --check "$2" >"$RUN/logs/$1.check" 2>&1 || { cat "$RUN/logs/$1.check" >&2; die "$2 is invalid"; }
  # In a session of its own, as under systemd: sharing pgbench's scheduler autogroup
  # makes PostgreSQL's backends wait (see issue 16). setsid execs in place, so $! is
  # the pooler.
  setsid "${PIN[@]}" "$BIN" "$2" >"$RUN/logs/$1.log" 2>&1 &
  PID[$1]=$!
  wait_port "$3" || { tail -20 "$RUN/logs/$1.log" >&2; die "$1 did not start"; }
}

start_pgbouncer() {  # name ini port
  setsid "${AS_PG[@]}" "${PIN[@]}" "$PGBOUNCER" "$2" >"$RUN/logs/$1.log" 2>&1 &
  PID[$1]=$!
  wait_port "$3" || { tail -20 "$RUN/logs/$1.log" >&2; die "$1 did not start"; }
}

# "3 threads: pgsilo-w0 on 0, ..." for the report.
cores_of() {
  local pid=$1 t
  for t in /proc/"$pid"/task/*; do
    printf '%s→%s\n' "$(cat "$t/comm" 2>/dev/null)" "$(awk '/Cpus_allowed_list/ {print $2}' "$t/status" 2>/dev/null)"
  done | sort | uniq -c | awk '{printf "%s%s%s", sep, ($1 > 1 ? $1 "× " : ""), $2; sep="; "}'
}

# Runs cores_of only once the workers exist (a first client makes sure of nothing more).
SETTINGS="$SECS s per run, rounds $ROUNDS, pgbench -j min($JOBS, clients), pool_size $POOL, pgbench scale $SCALE, transaction pooling, scram-sha-256 with $SCRAM_ITER iterations (passthrough to the server), connection logging $( [ "$LOGCONN" = 1 ] && echo on || echo off ) in both poolers, pooler fd limit $NOFILE"
[ -n "$POOLER_CPUS" ] && SETTINGS="$SETTINGS, poolers pinned with taskset -c $POOLER_CPUS"
[ "$PROFILE" = pinned ] && SETTINGS="$SETTINGS, pinned profile: PostgreSQL and pgbench on ${OTHERS_PIN[2]}"
meta profile "$PROFILE"
meta settings "$SETTINGS"

target_port() {
  case $1 in
    postgres) echo "$PGPORT" ;; pgsilo) echo "$SILO_PORT" ;; pgbouncer) echo "$PGB_PORT" ;;
    pgsilo-tls) echo "$SILO_TLS_PORT" ;; pgbouncer-tls) echo "$PGB_TLS_PORT" ;;
    pgsilo-unix) echo "$SILO_UNIX_PORT" ;; pgbouncer-unix) echo "$PGB_UNIX_PORT" ;;
  esac
}
# Where pgbench connects: the Unix socket's folder for the -unix targets.
target_host() {
  case $1 in *-unix) echo "$RUN/usock" ;; *) echo 127.0.0.1 ;; esac
}
# libpq's sslmode for the target: require for the -tls targets, else no TLS at all.
target_sslmode() {
  case $1 in *-tls) echo require ;; *) echo disable ;; esac
}
start_front() {  # target
  local t=$1 port
  port=$(target_port "$t")
  case $t in
    pgsilo-*)
      write_pgsilo_conf "$RUN/$t.toml" "$port" scram-sha-256 "$RUN/userlist_scram.txt" "${t#pgsilo-}"
      start_pgsilo "$t" "$RUN/$t.toml" "$port"
      ;;
    pgbouncer-*)
      write_pgbouncer_ini "$RUN/pgbouncer/$t.ini" "$port" scram-sha-256 "$RUN/userlist_scram.txt" "${t#pgbouncer-}"
      start_pgbouncer "$t" "$RUN/pgbouncer/$t.ini" "$port"
      ;;
  esac
  say "$t pid ${PID[$t]} on port $port"
}

for t in $TARGETS; do
  case $t in
    pgsilo)
      write_pgsilo_conf "$RUN/pgsilo.toml" "$SILO_PORT" scram-sha-256 "$RUN/userlist_scram.txt"
      start_pgsilo pgsilo "$RUN/pgsilo.toml" "$SILO_PORT"
      say "pgsilo pid ${PID[pgsilo]} on 127.0.0.1:$SILO_PORT"
      ;;
    pgbouncer)
      write_pgbouncer_ini "$RUN/pgbouncer/pgbouncer.ini" "$PGB_PORT" scram-sha-256 "$RUN/userlist_scram.txt"
      start_pgbouncer pgbouncer "$RUN/pgbouncer/pgbouncer.ini" "$PGB_PORT"
      meta pgbouncer_version "$("$PGBOUNCER" --version | head -n1)"
      say "PgBouncer pid ${PID[pgbouncer]} on 127.0.0.1:$PGB_PORT"
      ;;
    postgres) ;;
    *) die "unknown target $t (BENCH_TARGETS: postgres pgbouncer pgsilo)" ;;
  esac
done
# Each process's session and scheduler autogroup: poolers must not share pgbench's (the
# autogroup decides how the kernel shares CPU between them and PostgreSQL).
sched_of() {  # pid -> "session S, autogroup /autogroup-N"
  local sid ag
  sid=$(awk '{print $6}' "/proc/$1/stat" 2>/dev/null || echo ?)
  ag=$(cut -d' ' -f1 "/proc/$1/autogroup" 2>/dev/null || echo ?)
  printf 'session %s, %s' "$sid" "$ag"
}
meta sched_bench "$(sched_of $$) (this script and pgbench)"
meta sched_postgres "$(sched_of "$(head -n1 "$RUN/pg/postmaster.pid")")"
[ -n "${PID[pgsilo]:-}" ] && meta sched_pgsilo "$(sched_of "${PID[pgsilo]}")"
[ -n "${PID[pgbouncer]:-}" ] && meta sched_pgbouncer "$(sched_of "${PID[pgbouncer]}")"
[ -n "${PID[pgsilo]:-}" ] && meta pgsilo_cores "$(cores_of "${PID[pgsilo]}")"
[ -n "${PID[pgbouncer]:-}" ] && meta pgbouncer_cores "$(cores_of "${PID[pgbouncer]}")"

# --- measuring -------------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null || true; }
POSTMASTER=$(head -n1 "$RUN/pg/postmaster.pid")
SEQ=0
now_us() { date +%s%6N; }
# Established connections whose server side is 127.0.0.1:$1 (clients of that target).
conns_to() {
  if [ -S "$RUN/usock/.s.PGSQL.$1" ]; then
    ss -Hxn state connected 2>/dev/null | grep -c "$RUN/usock/.s.PGSQL.$1 " || true
  else
    ss -Htn state established "( sport = :$1 )" 2>/dev/null | wc -l
  fi
}

# One pgbench run. The measured window starts once every client is connected (logins,
# with libpq's PBKDF2 for SCRAM, take seconds at 1000 clients and are not the
# per-transaction cost) and lasts BENCH_SECONDS; pgbench gets -T long enough for both.
# TPS, latencies and CPU per transaction all come from that window (transactions counted
# in pgbench's log by completion time). With -C, where connecting is the point, the
# window is the whole run.
run_pgbench() {  # round workload mode clients target
  local round=$1 workload=$2 mode=$3 clients=$4 target=$5
  local port jobs pid name log prefix rc args allow runfor
  SEQ=$((SEQ + 1))
  port=$(target_port "$target")
  jobs=$(( clients < JOBS ? clients : JOBS ))
  name=$(printf '%03d-%s-%s-%s-c%s' "$SEQ" "$target" "$workload" "$mode" "$clients")
  log=$RUN/pgbench/$name.out
  prefix=$RUN/pgbench/$name.log
  # Time allowed for connecting: 30 ms per client (libpq's SCRAM key derivation, a
  # backend fork when direct: 1000 clients took 8-21 s here on a busy machine), plus 1 s.
  allow=$(( (clients * 30 + 999) / 1000 + 1 ))
  [ "$workload" = select-connect ] && allow=0
  # 2 s to spare: pgbench must still be running when the window closes (its CPU is read
  # from /proc then); it is stopped right after.
  runfor=$((SECS + allow + 2))
  local secs=$SECS
  # Cold start: the window is the fresh pooler's first COLD_SECS, connecting included.
  if [ "$workload" = cold-start ]; then allow=0; secs=$COLD_SECS; runfor=$((COLD_SECS + 1)); fi
  args=(-h "$(target_host "$target")" -p "$port" -U "$USER_NAME" -n -M "$mode" -c "$clients" -j "$jobs" -T "$runfor" -l "--log-prefix=$prefix")
  case $workload in
    select) args+=(-S) ;;
    select-connect) args+=(-S -C) ;;
    cold-start) args+=(-S) ;;
    tpcb) ;;
  esac
  pid=
  [ "$target" != postgres ] && pid=${PID[$target]:-}
  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    say "run $SEQ: $target is no longer running; skipped"
    echo "$round,$SEQ,$workload,$mode,$clients,$jobs,$target,pooler-died,,,,,,,,,,,,,,,,,,,,,\"$target exited earlier; see $RUN/logs/$target.log\"" >>"$CSV"
    return
  fi
  printf 'bench: run %3d  %-9s %-14s %-8s c=%-4s ' "$SEQ" "$target" "$workload" "$mode" "$clients" >&2
  local base s0 s1 t0 t1 tl hwm= bpid bench_pid= stopped=0 note= i
  base=$(conns_to "$port")
  [ -n "$pid" ] && { echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; }  # VmHWM := current RSS
  tl=$(now_us)
  PGSSLMODE=$(target_sslmode "$target") PGPASSWORD=$PASSWORD timeout --kill-after=10 $((runfor + 120)) "${OTHERS_PIN[@]}" pgbench "${args[@]}" "$DB" >"$log" 2>&1 &
  bpid=$!
  for i in $(seq 1 100); do
    bench_pid=$(pgrep -P "$bpid" -x pgbench || true)
    [ -n "$bench_pid" ] && break
    sleep 0.01
  done
  if [ "$workload" != select-connect ] && [ "$workload" != cold-start ]; then
    # Until every client is connected (or pgbench gives up, or the allowance is gone).
    while kill -0 "$bpid" 2>/dev/null && [ "$(conns_to "$port")" -lt $((base + clients)) ] \
      && [ $(( $(now_us) - tl )) -lt $(( allow * 1000000 )) ]; do
      sleep 0.05
    done
    if kill -0 "$bpid" 2>/dev/null && [ "$(conns_to "$port")" -lt $((base + clients)) ]; then
      note="not all clients connected within ${allow} s; measured from then on"
    fi
  fi
  # Each snapshot carries the moment it was taken: the window's bounds.
  # The kernel's count of the pooler's system calls and context switches over the window
  # (perf stat; counts are stable where times are not).
  local perf_pid= perf_out=$RUN/pgbench/$name.perf
  if [ -n "$pid" ] && [ "$PERF" = 1 ]; then
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pid" -o "$perf_out" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  s0=$("$PY" "$TOOLS/bench.py" snap "$POSTMASTER" "${pid:--}" "${bench_pid:--}")
  t0=${s0##* }
  while kill -0 "$bpid" 2>/dev/null && [ $(( $(now_us) - t0 )) -lt $(( secs * 1000000 - 30000 )) ]; do sleep 0.02; done
  s1=$("$PY" "$TOOLS/bench.py" snap "$POSTMASTER" "${pid:--}" "${bench_pid:--}")
  t1=${s1##* }
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true; fi
  [ -n "$pid" ] && hwm=$(status_kib "$pid" VmHWM)
  # Whatever pgbench still has to run (most of the connect allowance, at many clients) is
  # not measured: stop it once its log has moved well past the window, so the window's
  # lines are flushed (pgbench buffers its log). Runs with little left finish by themselves.
  if [ "$allow" -gt 3 ] && kill -0 "$bpid" 2>/dev/null; then
    sleep 1
    if kill -0 "$bpid" 2>/dev/null; then kill -TERM "$bpid" 2>/dev/null || true; stopped=1; fi
  fi
  rc=0
  wait "$bpid" || rc=$?
  local tps tx failed conn aborted status n lfail avg p50 p99 p999 max cpu_s cpu_us pg_us bench_us busy other window
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$log" | head -n1)
  conn=$(sed -n 's/^initial connection time = \([0-9.]*\) ms.*/\1/p' "$log" | head -n1)
  [ -z "$conn" ] && [ "$workload" != select-connect ] && conn=$(( (t0 - tl) / 1000 ))
  aborted=$(grep -c 'aborted in command\|aborted while\|client [0-9]* aborted' "$log" || true)
  local keep=; [ "$KEEP_LOGS" = 1 ] && keep=--keep
  read -r n lfail avg p50 p99 p999 max < <("$PY" "$TOOLS/bench.py" latency "$prefix" --from "$t0" --to "$t1" $keep)
  local sc_tx= cs_tx=
  if [ -n "$perf_pid" ] && [ -s "$perf_out" ] && [ "${n:-0}" -gt 0 ]; then
    read -r sc_tx cs_tx < <(awk -F, -v n="$n" '$3 == "raw_syscalls:sys_enter" {s = $1} $3 == "context-switches" {c = $1}
      END {if (s != "" && s !~ /not/) printf "%.2f ", s / n; else printf "- "; if (c != "" && c !~ /not/) printf "%.2f\n", c / n; else print "-"}' "$perf_out")
    [ "$sc_tx" = - ] && sc_tx=; [ "$cs_tx" = - ] && cs_tx=
  fi
  tx=$n
  window=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e6}')
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=timeout
    note="pgbench did not finish within $((runfor + 120)) s and was killed (hung)"
  elif { [ "$rc" != 0 ] && [ "$stopped" = 0 ]; } || [ "${aborted:-0}" != 0 ] || [ "${tx:-0}" = 0 ]; then
    status=failed
    # Clients that aborted also left: "not all connected" says nothing more then.
    [ "${aborted:-0}" != 0 ] && note=
    if [ "$stopped" = 1 ]; then
      note="$aborted of $clients clients aborted${note:+; $note}"
    else
      note="pgbench exit $rc, $aborted of $clients clients aborted${note:+; $note}"
    fi
    local first
    first=$(grep -m1 -E 'ERROR|FATAL|error|could not' "$log" | tr -d '"\r' | cut -c1-200 || true)
    [ -n "$first" ] && note="$note: $first"
  else
    status=ok
  fi
  tps=$(awk -v n="${tx:-0}" -v w="$window" 'BEGIN {if (w > 0) printf "%.1f", n / w}')
  # CPU split of the window: the pooler, PostgreSQL, pgbench, and anything else on the
  # machine (user+nice+system time of other processes, kernel threads excluded: noise
  # from outside the benchmark).
  local split
  split=$(awk -v a="$s0" -v b="$s1" -v n="${tx:-0}" -v hz="$CLK_TCK" -v pooler="$pid" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    total = y[1] - x[1]; busy = y[2] - x[2]; pool = y[3] - x[3]; pg = y[4] - x[4]; kern = y[5] - x[5]; bench = y[6] - x[6]
    # pgbench gone before the window closed (it failed): its share is unknown.
    known = (x[6] >= 0 && y[6] >= 0)
    other = busy - pool - pg - bench - kern; if (other < 0) other = 0
    us = (n > 0) ? 1e6 / hz / n : 0
    printf "%s,%s,%s,%s,%.0f,%s", (pooler != "" ? sprintf("%.2f", pool / hz) : ""), \
      (pooler != "" && n > 0 ? sprintf("%.2f", pool * us) : ""), (n > 0 ? sprintf("%.2f", pg * us) : ""), \
      (n > 0 && known ? sprintf("%.2f", bench * us) : ""), (total > 0 ? 100 * busy / total : 0), \
      (total > 0 && known ? sprintf("%.0f", 100 * other / total) : "")
  }')
  IFS=, read -r cpu_s cpu_us pg_us bench_us busy other <<<"$split"
  [ "$avg" = nan ] && avg=; [ "$p50" = nan ] && p50=; [ "$p99" = nan ] && p99=; [ "$p999" = nan ] && p999=; [ "$max" = nan ] && max=
  printf '%-7s tps=%-7.0f p99=%-7s pooler %s us/tx, machine busy %s%% (other %s%%)\n' "$status" "${tps:-0}" "${p99:-–}" "${cpu_us:-–}" "$busy" "${other:-?}" >&2
  [ -n "$note" ] && say "         $note"
  echo "$round,$SEQ,$workload,$mode,$clients,$jobs,$target,$status,$tps,$tx,$lfail,$avg,$p50,$p99,$p999,$max,$conn,$window,$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$log" | head -n1),$cpu_s,$cpu_us,$pg_us,$bench_us,$hwm,$busy,$other,$sc_tx,$cs_tx,\"${note//\"/}\"" >>"$CSV"
  # A pooler that died takes no further runs; say so now.
  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    say "$target (pid $pid) exited during run $SEQ:"; tail -5 "$RUN/logs/$target.log" >&2 || true
  fi
}

# Warm the cache and open the poolers' server connections.
if [ "$WARMUP" -gt 0 ]; then
  for t in $TARGETS; do
    say "warm-up: $WARMUP s of -S against $t"
    PGPASSWORD=$PASSWORD pgbench -h 127.0.0.1 -p "$(target_port "$t")" -U "$USER_NAME" -n -S -c "$POOL" -j 2 -T "$WARMUP" "$DB" \
      >"$RUN/logs/warmup-$t.log" 2>&1 || say "warm-up against $t failed (see $RUN/logs/warmup-$t.log)"
  done
fi

CONFIGS=()
for m in $MODES; do for c in $CLIENTS; do CONFIGS+=("select $m $c"); done; done
for e in $EXTRA; do
  case $e in
    connect) CONFIGS+=("select-connect simple 20") ;;
    tpcb) CONFIGS+=("tpcb simple 20") ;;   # last: it writes
    *) die "unknown BENCH_EXTRA item $e (connect, tpcb)" ;;
  esac
done
read -r -a TLIST <<<"$TARGETS"
NT=${#TLIST[@]}
say "${#CONFIGS[@]} configurations × $NT targets × $ROUNDS round(s), $SECS s each"
ci=0
for round in $(seq 1 "$ROUNDS"); do
  for cfg in "${CONFIGS[@]}"; do
    read -r w m c <<<"$cfg"
    for k in $(seq 0 $((NT - 1))); do
      run_pgbench "$round" "$w" "$m" "$c" "${TLIST[$(((ci + k) % NT))]}"
    done
    ci=$((ci + 1))
  done
done

# --- cold start: a pooler restarted, under load from its first moment -------------------
# PostgreSQL stays warm, as when a pooler restarts in production; the pooler opens its
# server connections while the clients wait.
restart_pooler() {  # target
  stop_pooler "$1"
  case $1 in
    pgsilo) start_pgsilo pgsilo "$RUN/pgsilo.toml" "$SILO_PORT" ;;
    pgbouncer) start_pgbouncer pgbouncer "$RUN/pgbouncer/pgbouncer.ini" "$PGB_PORT" ;;
  esac
}
COLD_TARGETS=()
for t in pgbouncer pgsilo; do case " $TARGETS " in *" $t "*) COLD_TARGETS+=("$t") ;; esac; done
if [ "$COLD_ROUNDS" -gt 0 ] && [ ${#COLD_TARGETS[@]} -gt 0 ]; then
  say "cold start: ${#COLD_TARGETS[@]} poolers × $COLD_ROUNDS round(s), the first $COLD_SECS s each"
  for round in $(seq 1 "$COLD_ROUNDS"); do
    for k in $(seq 0 $((${#COLD_TARGETS[@]} - 1))); do
      t=${COLD_TARGETS[$(((round + k) % ${#COLD_TARGETS[@]}))]}
      restart_pooler "$t"
      run_pgbench "$round" cold-start simple 20 "$t"
    done
  done
fi

stop_pooler pgsilo
stop_pooler pgbouncer

# --- the front door: TLS both ways and Unix-socket clients ------------------------------
FRONT_TARGETS=()
for f in $FRONT; do
  case $f in tls|unix) ;; *) die "unknown BENCH_FRONT item $f (tls, unix)" ;; esac
  for p in pgbouncer pgsilo; do
    case " $TARGETS " in *" $p "*) FRONT_TARGETS+=("$p-$f") ;; esac
  done
done
if [ ${#FRONT_TARGETS[@]} -gt 0 ]; then
  [ -x "$PGBOUNCER" ] || FRONT_TARGETS=($(printf '%s\n' "${FRONT_TARGETS[@]}" | grep -v pgbouncer || true))
  for t in "${FRONT_TARGETS[@]}"; do
    start_front "$t"
    PGSSLMODE=$(target_sslmode "$t") PGPASSWORD=$PASSWORD pgbench -h "$(target_host "$t")" -p "$(target_port "$t")" \
      -U "$USER_NAME" -n -S -c "$POOL" -j 2 -T "$WARMUP" "$DB" >"$RUN/logs/warmup-$t.log" 2>&1 \
      || say "warm-up against $t failed (see $RUN/logs/warmup-$t.log)"
  done
  FRONT_CONFIGS=("select simple 20" "select extended 20" "select-connect simple 20")
  NF=${#FRONT_TARGETS[@]}
  say "front door: ${#FRONT_CONFIGS[@]} configurations × $NF targets × $ROUNDS round(s)"
  for round in $(seq 1 "$ROUNDS"); do
    for cfg in "${FRONT_CONFIGS[@]}"; do
      read -r w m c <<<"$cfg"
      for k in $(seq 0 $((NF - 1))); do
        run_pgbench "$round" "$w" "$m" "$c" "${FRONT_TARGETS[$(((ci + k) % NF))]}"
      done
      ci=$((ci + 1))
    done
  done
  for t in "${FRONT_TARGETS[@]}"; do stop_pooler "$t"; done
fi

# --- memory per idle client ------------------------------------------------------------
mem_run() {  # target
  local t=$1 name=mem-$1 port pid out ready before after hwm fds i
  case $t in
    pgsilo)
      port=$MEM_SILO_PORT
      write_pgsilo_conf "$RUN/mem-pgsilo.toml" "$port" trust "$RUN/userlist_plain.txt"
      start_pgsilo "$name" "$RUN/mem-pgsilo.toml" "$port"
      ;;
    pgbouncer)
      port=$MEM_PGB_PORT
      write_pgbouncer_ini "$RUN/pgbouncer/mem.ini" "$port" trust "$RUN/userlist_plain.txt"
      start_pgbouncer "$name" "$RUN/pgbouncer/mem.ini" "$port"
      ;;
    *) return 0 ;;
  esac
  pid=${PID[$name]}
  open_clients() {  # count -> sets ready
    out=$RUN/logs/$name-opener-$1.out
    "$OPENER" 127.0.0.1 "$port" "$USER_NAME" "$DB" "$1" 4 >"$out" 2>"$RUN/logs/$name-opener-$1.err" &
    OPENER_PID=$!
    ready=
    for i in $(seq 1 3000); do
      ready=$(grep -m1 '^READY' "$out" 2>/dev/null || true)
      [ -n "$ready" ] && break
      kill -0 "$OPENER_PID" 2>/dev/null || break
      sleep 0.1
    done
  }
  # One client first: the first login opens a server connection and caches its settings.
  open_clients 1
  stop_pid "$OPENER_PID" TERM; OPENER_PID=
  sleep 1
  before=$(status_kib "$pid" VmRSS)
  say "memory: $IDLE idle clients to $t (RSS before: ${before} KiB)"
  open_clients "$IDLE"
  sleep 2
  after=$(status_kib "$pid" VmRSS)
  hwm=$(status_kib "$pid" VmHWM)
  fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
  local ok failed secs note
  ok=$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' <<<"$ready"); failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$ready")
  secs=$(sed -n 's/.*secs=\([0-9.]*\).*/\1/p' <<<"$ready")
  note=$(sed -n 's/.*first_error=//p' <<<"$ready" | tr -d '",')
  [ -z "$ready" ] && note="the opener did not finish; see $RUN/logs/$name-opener-$IDLE.err"
  say "memory: $t: ${ready:-no READY}; RSS after: $after KiB; $fds fds"
  echo "$t,$IDLE,${ok:-0},${failed:-},${secs:-},$before,$after,$hwm,$fds,\"$note\"" >>"$MEMCSV"
  stop_pid "$OPENER_PID" TERM; OPENER_PID=
  stop_pooler "$name"
}

if [ "$IDLE" -gt 0 ]; then
  for t in $TARGETS; do mem_run "$t"; done
fi

meta load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
meta date_end "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
meta elapsed "$(( $(date +%s) - started ))"
"$PY" "$TOOLS/bench.py" report "$OUT"
say "report: $OUT/report.md; raw numbers: $CSV, $MEMCSV; logs: $RUN/logs"
