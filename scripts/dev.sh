#!/usr/bin/env bash
# Local playground: a throwaway PostgreSQL plus the two example tenants from config/.
#   scripts/dev.sh up | status | down | smoke
# Everything lives under target/dev/ and is removed by `down`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEV=${PGSILO_DEV_DIR:-$ROOT/target/dev}
PGPORT=${PGSILO_DEV_PGPORT:-54320}
BIN=${PGSILO_BIN:-$ROOT/target/release/pgsilo}
TENANTS=(tenant_a tenant_b)

say() { printf '%s\n' "$*"; }
die() { printf 'dev.sh: %s\n' "$*" >&2; exit 1; }

pg_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] || die "no PostgreSQL server found; install it with: apt-get install postgresql"
  echo "$d"
}

# PostgreSQL refuses to run as root: run its tools as the postgres user then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    local u=postgres
    id -u postgres >/dev/null 2>&1 || u=nobody
    setpriv --reuid="$u" --regid="$(id -g "$u")" --clear-groups -- "$@"
  else
    "$@"
  fi
}

pg_up() {
  local bin; bin=$(pg_bindir)
  mkdir -p "$DEV"
  if [ ! -f "$DEV/pg/PG_VERSION" ]; then
    mkdir -p "$DEV/pg"
    [ "$(id -u)" = 0 ] && chown -R "$(id -u postgres 2>/dev/null || echo nobody)" "$DEV" "$DEV/pg"
    as_pg "$bin/initdb" -D "$DEV/pg" -U postgres --auth=trust --no-sync -E UTF8 >"$DEV/initdb.log" 2>&1 \
      || { cat "$DEV/initdb.log"; die "initdb failed"; }
    cat >>"$DEV/pg/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DEV'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
password_encryption = 'scram-sha-256'
CONF
    cat >"$DEV/pg/pg_hba.conf" <<HBA
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
HBA
  fi
  if ! as_pg "$bin/pg_ctl" -D "$DEV/pg" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$DEV/pg" -l "$DEV/postgres.log" -w start >/dev/null || { tail -20 "$DEV/postgres.log"; die "PostgreSQL did not start"; }
  fi
  local psql=("$bin/psql" -X -q -h "$DEV" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1)
  # Roles get the same SCRAM verifiers as the userlists, so pgsilo logs in by passthrough.
  local va vb
  va=$(sed -n 's/^"user_a" "\(.*\)"$/\1/p' "$ROOT/config/userlist_tenant_a.txt")
  vb=$(sed -n 's/^"user_b" "\(.*\)"$/\1/p' "$ROOT/config/userlist_tenant_b.txt")
  "${psql[@]}" -d postgres <<SQL
SELECT 'CREATE ROLE user_a LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'user_a') \gexec
SELECT 'CREATE ROLE user_b LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'user_b') \gexec
ALTER ROLE user_a PASSWORD '$va';
ALTER ROLE user_b PASSWORD '$vb';
SELECT 'CREATE DATABASE tenant_a_db OWNER user_a' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tenant_a_db') \gexec
SELECT 'CREATE DATABASE tenant_b_db OWNER user_b' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tenant_b_db') \gexec
REVOKE CONNECT ON DATABASE tenant_a_db FROM PUBLIC;
REVOKE CONNECT ON DATABASE tenant_b_db FROM PUBLIC;
SQL
  say "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT (data in $DEV/pg)"
}

pg_down() {
  local bin; bin=$(pg_bindir)
  if [ -f "$DEV/pg/PG_VERSION" ]; then
    as_pg "$bin/pg_ctl" -D "$DEV/pg" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

port_of() { sed -n 's/^listen_port *= *\([0-9]*\).*/\1/p' "$ROOT/config/$1.toml"; }

wait_port() {
  local port=$1 i
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

tenants_up() {
  [ -x "$BIN" ] || die "$BIN is missing: run make build"
  local t pid
  for t in "${TENANTS[@]}"; do
    if [ -f "$DEV/$t.pid" ] && kill -0 "$(cat "$DEV/$t.pid")" 2>/dev/null; then continue; fi
    "$BIN" --check "$ROOT/config/$t.toml" >/dev/null || die "config/$t.toml is invalid"
    nohup "$BIN" "$ROOT/config/$t.toml" >"$DEV/$t.log" 2>&1 &
    pid=$!
    echo "$pid" >"$DEV/$t.pid"
    wait_port "$(port_of "$t")" || { cat "$DEV/$t.log"; die "$t did not start"; }
    say "$t: pgsilo pid $pid on 127.0.0.1:$(port_of "$t") (log $DEV/$t.log)"
  done
}

tenants_down() {
  local t pid i
  for t in "${TENANTS[@]}"; do
    [ -f "$DEV/$t.pid" ] || continue
    pid=$(cat "$DEV/$t.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -INT "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DEV/$t.pid"
  done
}

status() {
  local t pid
  for t in "${TENANTS[@]}"; do
    if [ -f "$DEV/$t.pid" ] && kill -0 "$(cat "$DEV/$t.pid")" 2>/dev/null; then
      pid=$(cat "$DEV/$t.pid")
      say "$t: running, pid $pid, port $(port_of "$t"), cores $(grep Cpus_allowed_list /proc/"$pid"/task/*/status 2>/dev/null | awk '{print $2}' | sort -u | paste -sd' ')"
    else
      say "$t: stopped"
    fi
  done
  if [ -f "$DEV/pg/postmaster.pid" ]; then say "postgresql: running on 127.0.0.1:$PGPORT"; else say "postgresql: stopped"; fi
}

# The seed's isolation checks, as a user would run them.
smoke() {
  local bin; bin=$(pg_bindir)
  local psql=("$bin/psql" -X -A -t -h 127.0.0.1)
  local out fails=0
  out=$(PGPASSWORD=pass_a "${psql[@]}" -p 6432 -U user_a -d tenant_a_db -c "select 'tenant A says hello from ' || current_database()" 2>&1) \
    && say " [PASS] Tenant A reaches tenant_a_db on 6432: $out" || { say " [FAIL] Tenant A query: $out"; fails=1; }
  out=$(PGPASSWORD=pass_b "${psql[@]}" -p 6433 -U user_b -d tenant_b_db -c "select 'tenant B says hello from ' || current_database()" 2>&1) \
    && say " [PASS] Tenant B reaches tenant_b_db on 6433: $out" || { say " [FAIL] Tenant B query: $out"; fails=1; }
  out=$(PGPASSWORD=pass_a "${psql[@]}" -p 6432 -U user_a -d tenant_b_db -c "select 1" 2>&1) && { say " [FAIL] Tenant A reached tenant_b_db"; fails=1; } \
    || { echo "$out" | grep -q "no such database" && say " [PASS] Tenant A blocked from Tenant B DB (Database not allowed)" || { say " [FAIL] unexpected: $out"; fails=1; }; }
  out=$(PGPASSWORD=pass_a "${psql[@]}" -p 6433 -U user_a -d tenant_b_db -c "select 1" 2>&1) && { say " [FAIL] user_a logged in on tenant B"; fails=1; } \
    || { echo "$out" | grep -q "password authentication failed" && say " [PASS] Tenant A User blocked on Tenant B Port (Authentication failed)" || { say " [FAIL] unexpected: $out"; fails=1; }; }
  return $fails
}

case "${1:-}" in
  up) pg_up; tenants_up ;;
  down) tenants_down; pg_down; rm -rf "$DEV"; say "stopped; $DEV removed" ;;
  status) status ;;
  smoke) smoke ;;
  *) die "usage: $0 up|status|down|smoke" ;;
esac
