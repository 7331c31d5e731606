#!/usr/bin/env bash
# Two pgsilo builds side by side, as deployed: each in a session of its own (setsid), in
# front of one throwaway PostgreSQL 15 (scale 10, fsync off), transaction mode, pool 20.
# Alternating rounds of pgbench (CLIENTS clients, default 20; 2 threads) per workload; per round: TPS and
# the pooler's CPU per transaction (utime+stime from /proc, and utime alone). Prints the load average
# before and after: run it on a quiet machine (no build, test or benchmark meanwhile).
#
#   benches/compare_builds.sh OLD_BINARY NEW_BINARY
#   ROUNDS=5 DUR=8 CLIENTS=20 WORKLOADS="prepared simple set set-startup" benches/compare_builds.sh ...
#   COUNT=1 ...: also count, per transaction, what the kernel sees of each pooler over the
#   round (perf stat: system calls, context switches, io_uring submissions, and malloc
#   calls when a libc uprobe `probe_libc:malloc` exists: `perf probe -x <libc> -a malloc`).
#   Counting slows each pooler (a uprobe traps on every malloc): take times from a run
#   without COUNT.
#   Counts hold on a busy machine where times do not.
#
# Workloads: prepared (pgbench -S -M prepared), simple (-S -M simple), set (a transaction
# of one `SET datestyle TO iso`), set-startup (the same from a client that connected with
# DateStyle=Postgres,MDY, whose ReadyForQuery pgsilo holds while it reads settings back).
# Run as root (the cluster runs as postgres).
set -euo pipefail
OLD=$(realpath "$1") NEW=$(realpath "$2")
ROUNDS=${ROUNDS:-5} DUR=${DUR:-8} CLIENTS=${CLIENTS:-20} WORKLOADS=${WORKLOADS:-"prepared simple set set-startup"}
# shellcheck source=tools/throwaway_pg.sh
. "$(dirname "$0")/tools/throwaway_pg.sh"
W=$(mktemp -d /tmp/pgsilo-compare.XXXX)
PGP=$((20000 + RANDOM % 5000))
throwaway_pg "$W" $PGP "max_connections = 200" "shared_buffers = 256MB"
$BIN/pgbench -h 127.0.0.1 -p $PGP -U postgres -i -s 10 -q postgres >/dev/null 2>&1
echo '"postgres" ""' >"$W/users.txt"
echo "SET datestyle TO iso;" >"$W/set.sql"

# start NAME BINARY PORT: a pooler in a session of its own, waiting until it listens.
start() {
  cat >"$W/$1.toml" <<T
[pgsilo]
listen_addr = "127.0.0.1"
listen_port = $3
auth_type = "trust"
auth_file = "$W/users.txt"
pool_mode = "transaction"
default_pool_size = 20
max_client_conn = $((CLIENTS + 100))
takeover_socket = ""
log_connections = false
log_disconnections = false
[databases.postgres]
host = "127.0.0.1"
port = $PGP
T
  setsid "$2" "$W/$1.toml" >"$W/$1.log" 2>&1 </dev/null &
  echo $! >"$W/$1.pid"
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$3") 2>/dev/null && return
    sleep 0.1
  done
  echo "$1 did not start:" >&2
  cat "$W/$1.log" >&2
  exit 1
}
start old "$OLD" $((PGP + 1))
start new "$NEW" $((PGP + 2))
port_of() { if [ "$1" = old ]; then echo $((PGP + 1)); else echo $((PGP + 2)); fi; }
# utime+stime, and utime alone: user space is where pgsilo's own work shows.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$(cat "$W/$1.pid")/stat"; }
user_ticks() { awk '{print $14}' "/proc/$(cat "$W/$1.pid")/stat"; }

# round TARGET WORKLOAD: one pgbench run; prints TPS and pooler CPU per transaction.
round() {
  local args opts=""
  case $2 in
    prepared) args=(-S -M prepared) ;;
    simple) args=(-S -M simple) ;;
    set) args=(-f "$W/set.sql") ;;
    set-startup) args=(-f "$W/set.sql"); opts="-c DateStyle=Postgres,MDY" ;;
    *) echo "unknown workload $2" >&2; exit 1 ;;
  esac
  local c0 c1 out pp= counts=
  if [ "${COUNT:-0}" = 1 ]; then
    perf stat -x, -e "$EVENTS" -p "$(cat "$W/$1.pid")" -o "$W/perf.out" >/dev/null 2>&1 &
    pp=$!
  fi
  c0=$(cpu_ticks "$1") u0=$(user_ticks "$1")
  out=$(PGOPTIONS="$opts" $BIN/pgbench -h 127.0.0.1 -p "$(port_of "$1")" -U postgres -n -c "$CLIENTS" -j 2 -T "$DUR" "${args[@]}" postgres 2>&1)
  c1=$(cpu_ticks "$1") u1=$(user_ticks "$1")
  if [ -n "$pp" ]; then
    kill -INT "$pp" 2>/dev/null || true
    wait "$pp" 2>/dev/null || true
    counts=$(awk -F, '$3 ~ /:|switches/ {sub(/^.*:/, "", $3); printf "%s=%s ", $3, $1}' "$W/perf.out")
  fi
  awk -v t="$1" -v w="$2" -v c=$((c1 - c0)) -v u=$((u1 - u0)) -v k="$(getconf CLK_TCK)" -v counts="$counts" '
    /^tps = / { tps = $3 }
    /^number of transactions actually processed/ { n = $NF }
    END {
      printf "%-12s %-4s tps=%9.0f cpu_us_per_tx=%6.1f user_us_per_tx=%5.1f", w, t, tps, c / k * 1e6 / n, u / k * 1e6 / n
      m = split(counts, kv, " ")
      for (i = 1; i <= m; i++) { split(kv[i], p, "="); if (p[2] ~ /^[0-9]+$/) printf " %s/tx=%.2f", p[1], p[2] / n }
      printf "\n"
    }' <<<"$out"
}

EVENTS=raw_syscalls:sys_enter,context-switches
if [ "${COUNT:-0}" = 1 ]; then
  known=$(perf list 2>/dev/null || true)
  grep -q 'io_uring:io_uring_submit_req' <<<"$known" && EVENTS=$EVENTS,io_uring:io_uring_submit_req
  grep -q 'probe_libc:malloc ' <<<"$known" && EVENTS=$EVENTS,probe_libc:malloc
fi
echo "load before: $(cat /proc/loadavg)"
for wl in $WORKLOADS; do
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then round old "$wl"; round new "$wl"; else round new "$wl"; round old "$wl"; fi
  done
done
echo "load after: $(cat /proc/loadavg)"
